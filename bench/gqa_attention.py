"""One decode step of grouped-query attention, three ways, SmolLM2-135M's shape (9 query heads, 3 K/V heads, hd 64).

    repeat   k, v repeated to every query head (repeat_interleave), then SDPA: copies the whole
             cache, every layer, every token (what model.py did before it used enable_gqa)
    gqa      model.py's Attention.attend, the reference: SDPA with enable_gqa=True
    fold     the speed layer's (minillm.speed.GQADecodeAttention, installed by speed_up): the 3 query
             heads sharing a K/V head become 3 query rows of that head (when T == 1 and there is no mask)

Medians of `--repeats` calls per (dtype, cached length S), one layer; ratios to `repeat`.

    python bench/gqa_attention.py --threads 1
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from minillm.config import ModelConfig
from minillm.model import Attention
from minillm.speed import speed_up


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--lengths", default="64,512,2048")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    nh, nkv, hd = 9, 3, 64
    cfg = ModelConfig(family="llama", n_head=nh, n_kv_head=nkv, n_embd=nh * hd, attn_impl="sdpa")
    ref, fast = Attention(cfg, 0).eval(), speed_up(Attention(cfg, 0).eval())  # fast: a GQADecodeAttention
    print(f"threads {args.threads}, load average {open('/proc/loadavg').read().split()[0]}\n")
    print("| dtype | S | repeat us | gqa us | fold us | repeat/gqa | repeat/fold | max diff |\n|---|---|---|---|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        for S in (int(s) for s in args.lengths.split(",")):
            q, k, v = torch.randn(1, nh, 1, hd, dtype=dt), torch.randn(1, nkv, S, hd, dtype=dt), torch.randn(1, nkv, S, hd, dtype=dt)
            ways = {
                "repeat": lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)),
                "gqa": lambda: ref.attend(q, k, v, None),
                "fold": lambda: fast.attend(q, k, v, None),
            }
            times = {name: [] for name in ways}
            for _ in range(10):
                [f() for f in ways.values()]
            for _ in range(args.repeats):  # interleaved
                for name, f in ways.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
            diff = max((ways["repeat"]() - ways[w]()).abs().max().item() for w in ("gqa", "fold"))
            print(f"| {str(dt).removeprefix('torch.')} | {S} | {med['repeat']:.0f} | {med['gqa']:.0f} | {med['fold']:.0f} "
                  f"| {med['repeat'] / med['gqa']:.2f}x | {med['repeat'] / med['fold']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
