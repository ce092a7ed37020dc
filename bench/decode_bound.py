"""The floor under decode speed: what one token's weight matmuls alone cost, per weight format.

A decode step of SmolLM2-135M multiplies one row by 211 matrices (30 layers x q, k, v, o, gate, up,
down + the 49152 x 576 head). This times exactly those products with random weights (no checkpoint
needed) and nothing else (no attention, norms, RoPE, cache, Python), so 1000 / (ms per step) is a
ceiling on tokens/s for that format on this machine:

    fp32, bf16      F.linear(x, W)                       (what transformers and our float models run)
    int8            aten._weight_int8pack_mm             (per-channel int8, bf16 activations)
    int4 g32        aten._weight_int4pack_mm_for_cpu     (210 matrices) + the int8 head (as minillm.quantize does)
    int4 g32 fused  the same with q|k|v and gate|up as one matrix each: 4 int4 calls per layer, not 7

Median of --repeats passes; formats alternate within each repeat (the machine drifts).

    python bench/decode_bound.py
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from minillm.quantize import _int4_mm, _pack_for_kernel, quantize_int4, quantize_int8

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
FUSED = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate|up, down
HEAD = (49152, 576)


def int4(n, k):
    q, s, z = quantize_int4(torch.randn(n, k), 32)
    return _pack_for_kernel(q), torch.stack((s, z), -1).transpose(0, 1).contiguous()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = LAYER * 30 + [HEAD]
    fp32 = [torch.randn(n, k) for n, k in shapes]
    bf16 = [w.bfloat16() for w in fp32]
    i8 = [quantize_int8(w) for w in fp32]
    i4 = [int4(n, k) for n, k in LAYER * 30]
    i4f = [int4(n, k) for n, k in FUSED * 30]
    head8 = i8[-1]
    x = {k: torch.randn(1, k) for k in (576, 1536)}
    xb = {k: v.bfloat16() for k, v in x.items()}

    def run_float(ws, xs):
        for w in ws:
            F.linear(xs[w.shape[1]], w)

    def run_int8():
        for q, s in i8:
            torch.ops.aten._weight_int8pack_mm(xb[q.shape[1]], q, s)

    def run_int4(packed):
        for p, sz in packed:
            _int4_mm(xb[sz.shape[0] * 32], p, 32, sz)
        torch.ops.aten._weight_int8pack_mm(xb[576], *head8)

    ways = {"fp32": lambda: run_float(fp32, x), "bf16": lambda: run_float(bf16, xb), "int8": run_int8,
            "int4 g32 (+ int8 head)": lambda: run_int4(i4), "int4 g32 fused (+ int8 head)": lambda: run_int4(i4f)}
    times = {name: [] for name in ways}
    with torch.inference_mode():
        for f in ways.values():
            f()  # warm-up
        for _ in range(args.repeats):
            for name, f in ways.items():
                t0 = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t0) * 1000)
    print(f"SmolLM2-135M's decode matmuls, 1 row, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| weights | ms per token | ceiling tok/s |\n|---|---|---|")
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"| {name} | {ms:.2f} | {1000 / ms:.1f} |")


if __name__ == "__main__":
    main()
