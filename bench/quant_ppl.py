"""Perplexity of a model in float and quantized forms, on tinyshakespeare's validation split.

The validation split is the last 10% of the text (data.split_train_val on the token ids). It is cut
into `--windows` consecutive, non-overlapping windows of `--window` tokens; each window is one
forward pass without a cache, and every position but the first is scored (cross-entropy of its
token given the window before it). Perplexity = exp(mean cross-entropy over all scored positions).
Every form sees the same windows; the table gives each one's ratio to fp32.

    python bench/quant_ppl.py                                   # SmolLM2-135M, 8 windows of 1024
    python bench/quant_ppl.py --windows 4 --forms fp32,int8,int4-g32
    python bench/quant_ppl.py --forms fp32,int4-g32 --files weights/smollm2-135m-keepq.safetensors   # + checkpoints
      (e.g. one from `python -m minillm.convert X.gguf --keep-quant`), scored on the same windows
"""

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from minillm.checkpoint import load_model
from minillm.data import read_text, resolve_text_path, split_train_val
from minillm.quantize import quantize_model

# name -> quantize_model(bits, group_size, embedding_bits); int4 keeps the embedding/head in int8
# unless the name ends in "-all"
FORMS = {"fp32": None, "bf16": None, "int8": (8, None, 8), "int4-g32": (4, 32, 8), "int4-g64": (4, 64, 8),
         "int4-g128": (4, 128, 8), "int4-g32-all": (4, 32, 4)}


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for w in windows:  # (T,) each
        logits = model(w[None, :-1]).float()  # (1, T-1, vocab)
        nll += F.cross_entropy(logits[0], w[1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="weights/smollm2-135m.safetensors")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, from {list(FORMS)}")
    ap.add_argument("--files", default="", help="comma-separated checkpoints (quantized or not) to score too")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

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
        ppl = perplexity(model, windows)
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


if __name__ == "__main__":
    main()
