"""What one decode step costs, piece by piece: the weight matmuls per format, few-row matmuls, GQA attention.

All three use random weights of SmolLM2-135M's shapes (no checkpoint needed) and time the ways
against each other, alternated within each repeat (the machine drifts), reporting medians.

`bound`: the floor under decode speed. A decode step of SmolLM2-135M multiplies one row by 211
matrices (30 layers x q, k, v, o, gate, up, down + the 49152 x 576 head); this times exactly those
products and nothing else (no attention, norms, RoPE, cache, Python), so 1000 / (ms per step) is a
ceiling on tokens/s for that format on this machine:

    fp32, bf16      F.linear(x, W)                       (what transformers and our float models run)
    int8            aten._weight_int8pack_mm             (per-channel int8, bf16 activations)
    int4 g32        aten._weight_int4pack_mm_for_cpu     (210 matrices) + the int8 head (as minillm.quantize does)
    int4 g32 fused  the same with q|k|v and gate|up as one matrix each: 4 int4 calls per layer, not 7

`few-rows`: why the speed layer (minillm.speed.FewRowLinear) computes few-row float32 matmuls as
(W @ x^T)^T on CPU. The same 211 matrices times x of M rows, both ways: F.linear(x, W) (x @ W^T,
what nn.Linear does) and (W @ x^T)^T. Both read every weight once; for M = 2..8 PyTorch's CPU GEMM
is much slower the first way. M = k+1 is what a speculative verification of k drafts multiplies.
The last column says which way FewRowLinear takes for that M (the second for 2 <= M <= FEW_ROWS).

`gqa`: one decode step of grouped-query attention, three ways, SmolLM2-135M's shape (9 query heads,
3 K/V heads, hd 64), one layer, per (dtype, cached length S); ratios to `repeat`:

    repeat   k, v repeated to every query head (repeat_interleave), then SDPA: copies the whole
             cache, every layer, every token (what model.py did before it used enable_gqa)
    gqa      model.py's Attention.attend, the reference: SDPA with enable_gqa=True
    fold     the speed layer's (minillm.speed.GQADecodeAttention, installed by speed_up): the 3 query
             heads sharing a K/V head become 3 query rows of that head (when T == 1 and there is no mask)

    python -m bench.step_cost bound
    python -m bench.step_cost few-rows            # 2 threads (torch's default here)
    python -m bench.step_cost gqa --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.model import Attention
from minillm.quantize import quantize_int4, quantize_int8
from minillm.quantized import int4_mm, pack_for_kernel
from minillm.speed import FewRowLinear, speed_up

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
FUSED = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate|up, down
HEAD = (49152, 576)
SMOLLM2 = LAYER * 30 + [HEAD]  # the 211 matrices of one decode step


def medians(ways: dict[str, Callable[[], object]], repeats: int, warmups: int) -> dict[str, float]:
    """Median milliseconds of each way over `repeats`, the ways alternated within each repeat."""
    for _ in range(warmups):
        for f in ways.values():
            f()
    times = {name: [] for name in ways}
    for _ in range(repeats):
        for name, f in ways.items():
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def int4(n: int, k: int):
    q, s, z = quantize_int4(torch.randn(n, k), 32)
    return pack_for_kernel(q), torch.stack((s, z), -1).transpose(0, 1).contiguous()


def bound(args) -> None:
    fp32 = [torch.randn(n, k) for n, k in SMOLLM2]
    bf16 = [w.bfloat16() for w in fp32]
    i8 = [quantize_int8(w) for w in fp32]
    i4, i4f, head8 = [int4(n, k) for n, k in LAYER * 30], [int4(n, k) for n, k in FUSED * 30], i8[-1]
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
            int4_mm(xb[sz.shape[0] * 32], p, 32, sz)
        torch.ops.aten._weight_int8pack_mm(xb[576], *head8)

    ways = {"fp32": lambda: run_float(fp32, x), "bf16": lambda: run_float(bf16, xb), "int8": run_int8,
            "int4 g32 (+ int8 head)": lambda: run_int4(i4), "int4 g32 fused (+ int8 head)": lambda: run_int4(i4f)}
    ms = medians(ways, args.repeats, warmups=1)
    print(f"SmolLM2-135M's decode matmuls, 1 row, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| weights | ms per token | ceiling tok/s |\n|---|---|---|")
    for name, t in ms.items():
        print(f"| {name} | {t:.2f} | {1000 / t:.1f} |")


def few_rows(args) -> None:
    weights = [torch.randn(n, k) for n, k in SMOLLM2]
    print(f"{len(weights)} float32 matrices, {sum(w.numel() for w in weights) / 1e6:.1f}M weights, "
          f"{torch.get_num_threads()} threads; ms per pass over all of them (median of {args.repeats})\n")
    names = ["x @ W^T (F.linear)", "(W @ x^T)^T"]
    print("| rows M | " + " | ".join(names) + " | ratio | FewRowLinear takes |")
    print("|---|---|---|---|---|")
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        ways = {names[0]: lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                names[1]: lambda: [(w @ xs[w.shape[1]].t()).t().contiguous() for w in weights]}
        linear, transposed = medians(ways, args.repeats, warmups=0).values()
        route = names[1 if 1 < m <= FewRowLinear.FEW_ROWS else 0]
        print(f"| {m} | {linear:.1f} | {transposed:.1f} | {linear / transposed:.2f}x | {route} |")


def gqa(args) -> None:
    nh, nkv, hd = 9, 3, 64
    cfg = ModelConfig(family="llama", n_head=nh, n_kv_head=nkv, n_embd=nh * hd, attn_impl="sdpa")
    ref, fast = Attention(cfg, 0).eval(), speed_up(Attention(cfg, 0).eval())  # fast: a GQADecodeAttention
    print(f"threads {torch.get_num_threads()}, load average {open('/proc/loadavg').read().split()[0]}\n")
    print("| dtype | S | repeat us | gqa us | fold us | repeat/gqa | repeat/fold | max diff |\n|---|---|---|---|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        for S in (int(s) for s in args.lengths.split(",")):
            q, k, v = torch.randn(1, nh, 1, hd, dtype=dt), torch.randn(1, nkv, S, hd, dtype=dt), torch.randn(1, nkv, S, hd, dtype=dt)
            ways = {
                "repeat": lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)),
                "gqa": lambda: ref.attend(q, k, v, None),
                "fold": lambda: fast.attend(q, k, v, None),
            }
            us = {name: t * 1000 for name, t in medians(ways, args.repeats, warmups=10).items()}
            diff = max((ways["repeat"]() - ways[w]()).abs().max().item() for w in ("gqa", "fold"))
            print(f"| {str(dt).removeprefix('torch.')} | {S} | {us['repeat']:.0f} | {us['gqa']:.0f} | {us['fold']:.0f} "
                  f"| {us['repeat'] / us['gqa']:.2f}x | {us['repeat'] / us['fold']:.2f}x | {diff:.1e} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.step_cost", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bound", help="one token's weight matmuls alone, per weight format")
    b.add_argument("--repeats", type=int, default=9)
    b.add_argument("--threads", type=int, default=2)
    f = sub.add_parser("few-rows", help="few-row float32 matmuls, x @ W^T against (W @ x^T)^T")
    f.add_argument("--rows", default="1,2,3,4,5,6,8,12,16,32")
    f.add_argument("--repeats", type=int, default=7)
    f.add_argument("--threads", type=int, help="default: torch's")
    g = sub.add_parser("gqa", help="one grouped-query attention decode step, three ways")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--repeats", type=int, default=300)
    g.add_argument("--lengths", default="64,512,2048")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        {"bound": bound, "few-rows": few_rows, "gqa": gqa}[args.command](args)


if __name__ == "__main__":
    main()
