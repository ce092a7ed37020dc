"""Perplexity on tinyshakespeare's validation split: per weight format (ours), and transformers on a GGUF.

`forms`: a model in float and quantized forms. The validation split is the last 10% of the text
(data.split_train_val on the token ids), cut into `--windows` consecutive, non-overlapping windows of
`--window` tokens; each window is one forward pass without a cache, and every position but the first
is scored (cross-entropy of its token given the window before it). Perplexity = exp(mean
cross-entropy over all scored positions). Every form sees the same windows; the table gives each
one's ratio to fp32. `--files` adds checkpoints (e.g. one from `python -m minillm.convert X.gguf
--keep-quant`), scored on the same windows.

`hf`: the reference row beside our checkpoints. transformers dequantizes each GGUF to float32 itself
(`from_pretrained(dir, gguf_file=...)`), tokenizes with its own tokenizer, and is scored on the
windows `python -m minillm.eval ppl` scores (minillm.eval.perplexity.window_spans: each token scored
once, with at least context - stride tokens before it) and the same text (cut at --max-chars).
Columns as `minillm.eval ppl` prints them, so the two tables line up (tests/test_eval.py holds ours
equal to transformers' on such windows within 1e-5 relative).

    python -m bench.perplexity forms                              # SmolLM2-135M, 8 windows of 1024
    python -m bench.perplexity forms --windows 4 --forms fp32,int8,int4-g32
    python -m bench.perplexity forms --forms fp32,int4-g32 --files weights/smollm2-135m-keepq.safetensors
    python -m bench.perplexity hf --gguf ~/.cache/minillm/models/qwen2.5-coder-0.5b.gguf --max-chars 8000 --context 512
    python -m minillm.eval ppl --model weights/qwen2.5-coder-0.5b.safetensors --max-chars 8000 --context 512
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.checkpoint import load_model
from minillm.data import read_text, resolve_text_path, split_train_val
from minillm.eval.perplexity import eval_text, window_spans
from minillm.quantize import quantize_model

# name -> quantize_model(bits, group_size, embedding_bits); int4 keeps the embedding/head in int8
# unless the name ends in "-all"
FORMS = {"fp32": None, "bf16": None, "int8": (8, None, 8), "int4-g32": (4, 32, 8), "int4-g64": (4, 64, 8),
         "int4-g128": (4, 128, 8), "int4-g32-all": (4, 32, 4)}


@torch.inference_mode()
def window_perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean cross-entropy) of our model over disjoint windows (W, T), every position but the first."""
    nll, n = 0.0, 0
    for w in windows:  # (T,) each
        logits = model(w[None, :-1]).float()  # (1, T-1, vocab)
        nll += F.cross_entropy(logits[0], w[1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


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


def forms(args) -> None:
    loaded = load_model(args.model)
    ids = torch.tensor(loaded.tokenizer.encode(read_text(resolve_text_path())))
    _, val = split_train_val(ids.numpy())
    val = torch.from_numpy(val.copy()).long()
    if len(val) < args.windows * args.window:
        sys.exit(f"error: the validation split has {len(val)} tokens, fewer than {args.windows} x {args.window}")
    windows = val[: args.windows * args.window].view(args.windows, args.window)
    print(f"{args.model}: val split {len(val):,} tokens; scoring {args.windows} windows x {args.window} tokens "
          f"({args.windows * (args.window - 1):,} predictions), threads {torch.get_num_threads()}\n")

    rows = []
    for form in args.forms.split(",") + [f for f in args.files.split(",") if f]:
        t0 = time.perf_counter()
        if form not in FORMS:  # a checkpoint file
            model = load_model(form).model
        elif form == "fp32":
            model = loaded.model
        elif form == "bf16":
            model = copy.deepcopy(loaded.model).to(torch.bfloat16)
        else:
            try:
                model = quantize_model(copy.deepcopy(loaded.model), *FORMS[form])
            except ValueError as e:
                rows.append((form, None, str(e)))
                continue
        ppl = window_perplexity(model, windows)
        rows.append((form, ppl, f"{time.perf_counter() - t0:.0f} s"))
        print(f"  {form}: {ppl:.4f}", flush=True)

    base = next((p for f, p, _ in rows if f == "fp32"), None)
    print("\n| form | perplexity | vs fp32 | note |\n|---|---|---|---|")
    for form, ppl, note in rows:
        if ppl is None:
            print(f"| {form} | - | - | {note} |")
        else:
            rel = f"{(ppl / base - 1) * 100:+.2f}%" if base else "-"
            print(f"| {form} | {ppl:.4f} | {rel} | {note} |")


def hf(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    text = eval_text(read_text(resolve_text_path(args.data)), "all" if args.data else "val", args.max_chars)
    stride = args.stride or args.context // 2
    if not 1 <= stride < args.context:
        sys.exit(f"error: --stride must be below --context ({args.context}) here, so that only the first token "
                 f"goes unscored and the bytes of the rest are the scored bytes")
    print("| model | runtime | context | stride | windows | tokens | bytes | ppl | nll/token | bits/byte | s |")
    print("|" + "---|" * 11)
    for path in args.gguf:
        path = path.expanduser()
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perplexity", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("forms", help="our model in float and quantized forms, on disjoint windows of the val split")
    f.add_argument("--model", default="weights/smollm2-135m.safetensors")
    f.add_argument("--windows", type=int, default=8)
    f.add_argument("--window", type=int, default=1024)
    f.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, from {list(FORMS)}")
    f.add_argument("--files", default="", help="comma-separated checkpoints (quantized or not) to score too")
    f.add_argument("--threads", type=int, default=2)
    h = sub.add_parser("hf", help="transformers on GGUF files, on the windows `python -m minillm.eval ppl` scores")
    h.add_argument("--gguf", type=Path, action="append", required=True, help="repeatable")
    h.add_argument("--data", default=None, help="UTF-8 text (default: tinyshakespeare, its validation split)")
    h.add_argument("--max-chars", type=int, default=None)
    h.add_argument("--context", type=int, default=1024)
    h.add_argument("--stride", type=int, default=None, help="default context // 2")
    h.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"forms": forms, "hf": hf}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
