"""What one decode step costs, piece by piece: the weight matmuls per format, few-row matmuls, GQA attention.

All three use random weights of real models' shapes (no checkpoint needed) and time the ways
against each other, alternated within each repeat (the machine drifts), reporting medians.

`bound`: the floor under decode speed. A decode step of SmolLM2-135M multiplies one row by 211
matrices (30 layers x q, k, v, o, gate, up, down + the 49152 x 576 head); this times exactly those
products and nothing else (no attention, norms, RoPE, cache, Python), so 1000 / (ms per step) is a
ceiling on tokens/s for that format on this machine:

    fp32, bf16      F.linear(x, W)                       (what transformers runs)
                    our kernel: minillm/kernels/rows.cpp (what our float models run on AVX-512 VNNI CPUs)
    int8            per-channel int8 (quantized.py's Int8Linear), with each kernel:
                    torch's  aten._weight_int8pack_mm (bf16 activations)
                    ours     minillm/kernels/vnni.cpp (AVX-512 VNNI; what int8 layers use there)
    int4 g32        (210 matrices) + the int8 head (as minillm.quantize does), with each kernel:
                    torch's  aten._weight_int4pack_mm_for_cpu (+ torch's int8 for the head)
                    ours     minillm/kernels/vnni.cpp (+ ours for the head)
    int4 g32 fused  the same with q|k|v and gate|up as one matrix each: 4 int4 calls per layer, not 7
                    (with our kernel: what speed.speed_up runs, kernels.StackedInt4)

`prefill`: the floor under a prompt read, fp32: the 210 layer matrices of SmolLM2-135M times
--tokens rows (512) and the head times the last row (what a prefill with last_only multiplies),
nothing else; ms and the GEMM's GFLOP/s; the same with q|k|v and gate|up stacked (what the speed
layer runs), stacked and stored transposed (x @ Wt with Wt = W^T contiguous: MKL's product without the
transposed operand), stacked through oneDNN on W prepacked for that many rows (speed.prepack's reorder);
and one large square product, the GEMM library's best rate on this machine. A prefill can be no faster than the matmuls with
fp32 weights and PyTorch's CPU GEMM (transformers uses the same one). Then the rest of a layer (where
our kernels build): causal attention, RMSNorm, RoPE and silu(gate) * up, model.py's operations against
the speed layer's kernels.

`few-rows`: what M = 1..9 rows cost against one row (M = k+1 is a speculative verification of k
drafts), per format (fp32, bf16, int4 g32) on the matrices of a decode step of Qwen2.5-Coder-1.5B
(2 of its 28 layers by default, + the 151936 x 1536 head) and of SmolLM2-135M (all 211). Every
(way, M) is timed in each repeat, interleaved; cells are ms per pass and the ratio to the same
way's M = 1 (the M = 1 cell: the ratio to nn.Linear's). The ways, float formats (speed.FewRowLinear
takes the one speed.few_row_route names, printed first):

    nn.Linear             F.linear(x, W): PyTorch's CPU GEMM (MKL for fp32), the reference
    oneDNN                oneDNN's matmul (torch.ops.mkldnn._linear_pointwise) on W as it is
    oneDNN, W prepacked   the same on W reordered once for it (speed.prepack; torch.compile's
                          freezing does this): a second copy of every weight
    ours                  minillm/kernels/rows.cpp: W as it is, read once for all the rows (AVX-512
                          VNNI CPUs, where the kernels build)

int4 (g32, the head too), two kernels: BEFORE, aten._weight_int4pack_mm_for_cpu, which takes the rows
in blocks of 4 (BLOCK_M), dequantizing every weight block again for each block of rows; AFTER, ours
(minillm/kernels/vnni.cpp, what int4 models use on CPUs with AVX-512 VNNI): x rounded to int8
per 32 inputs, int8 dot products, up to 16 rows per pass.

`gqa`: one decode step of grouped-query attention, three ways, SmolLM2-135M's shape (9 query heads,
3 K/V heads, hd 64), one layer, per (dtype, cached length S); ratios to `repeat`:

    repeat   k, v repeated to every query head (repeat_interleave), then SDPA: copies the whole
             cache, every layer, every token (what model.py did before it used enable_gqa)
    gqa      model.py's Attention.attend, the reference: SDPA with enable_gqa=True
    ours     the speed layer's (minillm.speed.GQADecodeAttention, installed by speed_up): our few-query
             kernel (kernels/attention.cpp) where it builds; elsewhere the 3 query heads sharing a K/V
             head become 3 query rows of one SDPA call of that head (when T == 1 and there is no mask)

    python -m bench.step_cost bound
    python -m bench.step_cost prefill
    python -m bench.step_cost few-rows --threads 1
    python -m bench.step_cost gqa --threads 1
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.model import Attention
from minillm.quantize import quantize_int4, quantize_int8
from minillm.kernels import use_kernel, vnni
from minillm.quantized import Int4Linear, Int8Linear
from minillm.speed import few_row_route, speed_up

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


def int4(n: int, k: int, kernel: str):
    """An (n, k) int4 g32 matrix as `kernel` multiplies it: a function of x."""
    lin = Int4Linear(k, n, bias=False, group_size=32)
    lin.set_codes(*quantize_int4(torch.randn(n, k), 32))
    if kernel == "our":
        use_kernel(lin)
    return lin


def int8(n: int, k: int, kernel: str):
    """An (n, k) int8 per-row matrix as `kernel` multiplies it: a function of x."""
    lin = Int8Linear(k, n, bias=False)
    q, lin.scales = quantize_int8(torch.randn(n, k))
    lin.set_codes(q)
    if kernel == "our":
        use_kernel(lin)
    return lin


def int4_kernels() -> list[str]:
    """The int4/int8 kernels that run here: torch's, and ours where it builds (minillm/kernels)."""
    return ["torch's"] + (["our"] if vnni() is not None else [])


def bound(args) -> None:
    fp32 = [torch.randn(n, k) for n, k in SMOLLM2]
    bf16 = [w.bfloat16() for w in fp32]
    i8 = {kernel: [int8(n, k, kernel) for n, k in SMOLLM2] for kernel in int4_kernels()}
    i4 = {kernel: [int4(n, k, kernel) for n, k in LAYER * 30] + i8[kernel][-1:] for kernel in int4_kernels()}
    i4f = {kernel: [int4(n, k, kernel) for n, k in FUSED * 30] + i8[kernel][-1:] for kernel in int4_kernels()}
    x = {k: torch.randn(1, k) for k in (576, 1536)}
    xb = {k: v.bfloat16() for k, v in x.items()}

    def run_float(ws, xs):
        for w in ws:
            F.linear(xs[w.shape[1]], w)

    def run(layers):
        for lin in layers:
            lin(xb[lin.in_features])

    ways = {"fp32": lambda: run_float(fp32, x), "bf16": lambda: run_float(bf16, xb)}
    if vnni() is not None:  # the float route speed.FewRowLinear takes here
        ways["fp32, our kernel"] = lambda: [vnni().rows_mm(x[w.shape[1]], w) for w in fp32]
        ways["bf16, our kernel"] = lambda: [vnni().rows_mm(xb[w.shape[1]], w) for w in bf16]
    for kernel in i8:
        ways[f"int8, {kernel} kernel"] = functools.partial(run, i8[kernel])
    for kernel in i4:
        ways[f"int4 g32 (+ int8 head), {kernel} kernel"] = functools.partial(run, i4[kernel])
        ways[f"int4 g32 fused (+ int8 head), {kernel} kernel"] = functools.partial(run, i4f[kernel])
    ms = medians(ways, args.repeats, warmups=1)
    print(f"SmolLM2-135M's decode matmuls, 1 row, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| weights | ms per token | ceiling tok/s |\n|---|---|---|")
    for name, t in ms.items():
        print(f"| {name} | {t:.2f} | {1000 / t:.1f} |")


def prefill(args) -> None:
    head, last = torch.randn(*HEAD), torch.randn(1, 576)
    x = {k: torch.randn(args.tokens, k) for k in (576, 1536)}
    square = [torch.randn(3072, 3072) for _ in range(2)]

    def matmuls(shapes, layout="as it is"):
        shapes = shapes * 30
        ws = [torch.randn(n, k) for n, k in shapes]
        product = F.linear
        if layout == "transposed":
            ws, product = [w.t().contiguous() for w in ws], torch.matmul
        elif layout == "oneDNN prepacked":
            ws = [torch.ops.mkldnn._reorder_linear_weight(w, args.tokens) for w in ws]
            product = lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

        def run():
            for (_, k), w in zip(shapes, ws):
                product(x[k], w)
            F.linear(last, head)
        return run, 2 * (args.tokens * sum(n * k for n, k in shapes) + head.numel())

    ways = {"as the model calls them (7 per layer)": matmuls(LAYER),
            "q, k, v and gate, up stacked (4 per layer)": matmuls(FUSED),
            "stacked, W stored transposed (x @ Wt)": matmuls(FUSED, "transposed"),
            "stacked, oneDNN on W prepacked": matmuls(FUSED, "oneDNN prepacked"),
            "one 3072 x 3072 x 3072 product (the library's best case here)":
                (lambda: square[0] @ square[1], 2 * 3072 ** 3)}
    ms = medians({name: run for name, (run, _) in ways.items()}, args.repeats, warmups=1)
    print(f"SmolLM2-135M's fp32 prefill matmuls, {args.tokens} tokens (the head on the last one), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| matmuls | ms | GFLOP | GFLOP/s |\n|---|---|---|---|")
    for name, (_, flop) in ways.items():
        print(f"| {name} | {ms[name]:.1f} | {flop / 1e9:.1f} | {flop / ms[name] / 1e6:.1f} |")
    if vnni() is not None:
        prefill_rest(args)


def prefill_rest(args) -> None:
    """The rest of a prefill layer at SmolLM2's shapes: model.py's operations against the speed layer's
    kernels (kernels/attention.cpp, pointwise.cpp), one layer each, and x 30 for the whole prompt."""
    from minillm import kernels
    from minillm.model import RMSNorm, apply_rope
    T, nh, nkv, hd = args.tokens, 9, 3, 64
    q, k, v = torch.randn(1, T, nh, hd).transpose(1, 2), torch.randn(1, nkv, T, hd), torch.randn(1, nkv, T, hd)
    x, norm, cos, sin = torch.randn(1, T, 576), RMSNorm(576, 1e-5), torch.randn(T, hd // 2), torch.randn(T, hd // 2)
    gate, up = torch.randn(1, T, 1536), torch.randn(1, T, 1536)
    pairs = {
        "causal attention (SDPA, enable_gqa / kernels/attention.cpp)": (
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            lambda: kernels.causal_attention(q, k, v)),
        "RMSNorm x 2": (lambda: (norm(x), norm(x)),
                        lambda: (kernels.rms_norm(x, norm.weight, 1e-5), kernels.rms_norm(x, norm.weight, 1e-5))),
        "RoPE of q and k": (lambda: (apply_rope(q, cos, sin), apply_rope(k, cos, sin)),
                            lambda: (kernels.rope(q, cos, sin), kernels.rope(k, cos, sin))),
        "silu(gate) * up": (lambda: F.silu(gate) * up, lambda: kernels.swiglu(gate, up)),
    }
    ways = {(name, side): fn for name, fns in pairs.items() for side, fn in zip(("model.py", "ours"), fns)}
    ms = medians(ways, args.repeats * 6, warmups=2)
    print(f"\nThe rest of a layer, {T} tokens, SmolLM2-135M's shapes; ms per layer (x 30 layers)\n")
    print("| operation | model.py | ours | ours / model.py |\n|---|---|---|---|")
    for name in pairs:
        ref, ours = ms[name, "model.py"], ms[name, "ours"]
        print(f"| {name} | {ref:.3f} ({30 * ref:.1f}) | {ours:.3f} ({30 * ours:.1f}) | {ours / ref:.2f} |")


SHAPES = {  # hidden, intermediate, k/v width, vocab, layers: each model's config (GGUF / config.json)
    "qwen2.5-coder-1.5b": (1536, 8960, 256, 151936, 28),
    "smollm2-135m": (576, 1536, 192, 49152, 30),
}


def model_shapes(name: str, layers: int | None) -> list[tuple[int, int]]:
    """(out, in) of the weight matrices one decode step multiplies: q k v o gate up down per layer, the head."""
    d, f, kv, vocab, n_layer = SHAPES[name]
    return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)] * (layers or n_layer) + [(vocab, d)]


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def float_ways(shapes: list[tuple[int, int]], dtype: torch.dtype) -> dict[str, Callable]:
    """The ways to multiply few rows by float matrices, each mapping {in features: x} to the outputs."""
    ws = [torch.randn(n, k).to(dtype) for n, k in shapes]
    reordered = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in ws]
    ways = {"nn.Linear": lambda xs: [F.linear(xs[w.shape[1]], w) for w in ws],
            "oneDNN": lambda xs: [onednn(xs[w.shape[1]], w) for w in ws],
            "oneDNN, W prepacked": lambda xs: [onednn(xs[w.shape[1]], p) for w, p in zip(ws, reordered)]}
    if vnni() is not None:
        ways["ours (kernels/rows.cpp)"] = lambda xs: [vnni().rows_mm(xs[w.shape[1]], w) for w in ws]
        stacked = [torch.cat(ws[i:i + 3]) for i in range(0, len(ws) - 1, 7)] + [ws[i + 3] for i in range(0, len(ws) - 1, 7)] \
            + [torch.cat(ws[i + 4:i + 6]) for i in range(0, len(ws) - 1, 7)] + [ws[i + 6] for i in range(0, len(ws) - 1, 7)] \
            + ws[-1:]  # q|k|v, o, gate|up, down of each layer (in another order: the same work), the head
        ways["ours, q|k|v and gate|up stacked (speed.StackedLinear)"] = \
            lambda xs: [vnni().rows_mm(xs[w.shape[1]], w) for w in stacked]
    return ways


def int4_ways(shapes: list[tuple[int, int]]) -> dict[str, Callable]:
    """BEFORE: torch's kernel; AFTER: ours (minillm/kernels), where it builds."""
    ways = {}
    for kernel, way in zip(int4_kernels(), ("BEFORE: torch's kernel", "AFTER: our kernel")):
        packed = [int4(n, k, kernel) for n, k in shapes]
        ways[way] = lambda xs, packed=packed: [lin(xs[lin.in_features]) for lin in packed]
    return ways


def few_rows_table(name: str, fmt: str, args) -> None:
    """One (model, format): ms per pass over the matrices for each way and M, all interleaved per repeat."""
    shapes = model_shapes(name, args.layers if name.startswith("qwen") else None)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    ways = int4_ways(shapes) if fmt == "int4" else float_ways(shapes, dtype)
    ms = [int(r) for r in args.rows.split(",")]
    xs = {m: {k: torch.randn(m, k).to(dtype) for k in {k for _, k in shapes}} for m in ms}
    calls = {(way, m): functools.partial(f, xs[m]) for m in ms for way, f in ways.items()}
    t = medians(calls, args.repeats, warmups=1)
    print(f"\n{name}, {fmt}: {len(shapes)} matrices ({sum(n * k for n, k in shapes) / 1e6:.0f}M weights); "
          f"ms per pass (ratio to M = 1 of the same way; at M = 1: to nn.Linear's)\n")
    print("| way | " + " | ".join(f"M={m}" for m in ms) + " |\n|---|" + "---|" * len(ms))
    for way in ways:
        cells = [f"{t[way, m]:.1f} ({t[way, m] / t[way, ms[0]]:.2f})" for m in ms]
        cells[0] = f"{t[way, ms[0]]:.1f} ({t[way, ms[0]] / t[next(iter(ways)), ms[0]]:.2f})"
        print(f"| {way} | " + " | ".join(cells) + " |", flush=True)
    del ways, calls
    gc.collect()


def few_rows(args) -> None:
    print(f"{torch.get_num_threads()} threads, load average {open('/proc/loadavg').read().split()[0]}, "
          f"median of {args.repeats}; the speed layer's few-row route (probed here): "
          f"fp32 {few_row_route(torch.float32)}, bf16 {few_row_route(torch.bfloat16)}"
          + ("; ours multiplies bf16 on the AMX tile unit" if vnni() is not None and vnni().amx_bf16() else ""))
    for name in args.models.split(","):
        for fmt in args.formats.split(","):
            few_rows_table(name, fmt, args)


def gqa(args) -> None:
    nh, nkv, hd = 9, 3, 64
    cfg = ModelConfig(family="llama", n_head=nh, n_kv_head=nkv, n_embd=nh * hd, attn_impl="sdpa")
    ref, fast = Attention(cfg, 0).eval(), speed_up(Attention(cfg, 0).eval())  # fast: a GQADecodeAttention
    print(f"threads {torch.get_num_threads()}, load average {open('/proc/loadavg').read().split()[0]}\n")
    print("| dtype | S | repeat us | gqa us | ours us | repeat/gqa | repeat/ours | max diff |\n|---|---|---|---|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        for S in (int(s) for s in args.lengths.split(",")):
            q, k, v = torch.randn(1, nh, 1, hd, dtype=dt), torch.randn(1, nkv, S, hd, dtype=dt), torch.randn(1, nkv, S, hd, dtype=dt)
            ways = {
                "repeat": lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)),
                "gqa": lambda: ref.attend(q, k, v, None),
                "ours": lambda: fast.attend(q, k, v, None),
            }
            us = {name: t * 1000 for name, t in medians(ways, args.repeats, warmups=10).items()}
            diff = max((ways["repeat"]() - ways[w]()).abs().max().item() for w in ("gqa", "ours"))
            print(f"| {str(dt).removeprefix('torch.')} | {S} | {us['repeat']:.0f} | {us['gqa']:.0f} | {us['ours']:.0f} "
                  f"| {us['repeat'] / us['gqa']:.2f}x | {us['repeat'] / us['ours']:.2f}x | {diff:.1e} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.step_cost", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bound", help="one token's weight matmuls alone, per weight format")
    b.add_argument("--repeats", type=int, default=9)
    b.add_argument("--threads", type=int, default=2)
    pf = sub.add_parser("prefill", help="a prompt's fp32 weight matmuls alone (SmolLM2-135M)")
    pf.add_argument("--tokens", type=int, default=512)
    pf.add_argument("--repeats", type=int, default=5)
    pf.add_argument("--threads", type=int, default=2)
    f = sub.add_parser("few-rows", help="few-row matmuls per format and M, each way, ratio to M = 1")
    f.add_argument("--models", default=",".join(SHAPES))
    f.add_argument("--formats", default="fp32,bf16,int4")
    f.add_argument("--rows", default="1,2,3,4,5,6,7,8,9")
    f.add_argument("--layers", type=int, default=2, help="Qwen 1.5B layers per pass (+ the head; all 28 "
                   "are 6 GB in fp32); SmolLM2 always has all 30")
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
        {"bound": bound, "prefill": prefill, "few-rows": few_rows, "gqa": gqa}[args.command](args)


if __name__ == "__main__":
    main()
