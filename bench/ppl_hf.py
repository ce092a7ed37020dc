"""transformers' perplexity of GGUF files, on the windows `python -m minillm.eval ppl` scores.

The reference row beside our checkpoints: transformers dequantizes the GGUF to float32 itself
(`from_pretrained(dir, gguf_file=...)`), tokenizes with its own tokenizer, and is scored here on the
same strided windows (minillm.eval.perplexity.window_spans: each token scored once, with at least
context - stride tokens before it) and the same text (tinyshakespeare's validation split, cut at
--max-chars). Columns as `minillm.eval ppl` prints them, so the two tables line up.

    python bench/ppl_hf.py --gguf ~/.cache/minillm/models/qwen2.5-coder-0.5b.gguf --max-chars 8000 --context 512
    python -m minillm.eval ppl --model weights/qwen2.5-coder-0.5b.safetensors --max-chars 8000 --context 512

(tests/test_eval.py holds ours equal to transformers' on such windows within 1e-5 relative; this
script prints the number for any GGUF transformers reads, e.g. for a table of every form of a model.)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from minillm.data import read_text, resolve_text_path
from minillm.eval.perplexity import eval_text, window_spans


@torch.inference_mode()
def hf_perplexity(model, ids: list[int], context: int, stride: int) -> tuple[float, int, int]:
    """(summed NLL, tokens scored, windows) of an HF causal LM on window_spans' windows."""
    seq, nll, scored = torch.tensor([ids]), 0.0, 0
    spans = window_spans(len(ids), context, stride)
    for begin, end, first in spans:
        logits = model(seq[:, begin:end]).logits[0].float()  # (T, V): row t predicts token t + 1
        nll += F.cross_entropy(logits[first - begin - 1:end - begin - 1], seq[0, first:end], reduction="sum").item()
        scored += end - first
    return nll, scored, len(spans)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, action="append", required=True, help="repeatable")
    ap.add_argument("--data", default=None, help="UTF-8 text (default: tinyshakespeare, its validation split)")
    ap.add_argument("--max-chars", type=int, default=None)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=None, help="default context // 2")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    text = eval_text(read_text(resolve_text_path(args.data)), "all" if args.data else "val", args.max_chars)
    stride = args.stride or args.context // 2
    if not 1 <= stride < args.context:
        raise SystemExit(f"error: --stride must be below --context ({args.context}) here, so that only the first token "
                         f"goes unscored and the bytes of the rest are the scored bytes")
    print("| model | runtime | context | stride | windows | tokens | bytes | ppl | nll/token | bits/byte | s |")
    print("|" + "---|" * 11)
    for path in args.gguf:
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        ids = tok.encode(text, add_special_tokens=False)
        nll, n, windows = hf_perplexity(model, ids, args.context, stride)
        n_bytes = len(tok.decode(ids[1:]).encode("utf-8"))  # every token but the first is scored
        print(f"| {path.name} | transformers {model.dtype} | {args.context} | {stride} | {windows} | {n:,} | {n_bytes:,} "
              f"| {math.exp(nll / n):.4f} | {nll / n:.4f} | {nll / math.log(2) / n_bytes:.4f} "
              f"| {time.perf_counter() - t0:.1f} |", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
