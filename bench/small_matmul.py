"""Why the speed layer (minillm.speed.FewRowLinear) computes few-row float32 matmuls as (W @ x^T)^T on CPU.

Times the 211 weight matrices of a SmolLM2-135M-shaped model (30 layers x q,k,v,o,gate,up,down + the
49152 x 576 head; random weights, so no checkpoint is needed) multiplied by x of M rows, both ways:
F.linear(x, W) (x @ W^T, what nn.Linear does) and (W @ x^T)^T. Both read every weight once; for
M = 2..8 PyTorch's CPU GEMM is much slower the first way. M = k+1 is what a speculative verification
of k drafts multiplies. Median of --repeats passes, the two ways alternated within each M. The last
column says which way FewRowLinear takes for that M (the second for 2 <= M <= FewRowLinear.FEW_ROWS).

    python bench/small_matmul.py              # 2 threads (torch's default here)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from minillm.speed import FewRowLinear

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,3,4,5,6,8,12,16,32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(n, k) for _ in range(30) for n, k in SHAPES] + [torch.randn(49152, 576)]
    ways = {"x @ W^T (F.linear)": lambda x, w: F.linear(x, w), "(W @ x^T)^T": lambda x, w: (w @ x.t()).t().contiguous()}
    print(f"{len(weights)} float32 matrices, {sum(w.numel() for w in weights) / 1e6:.1f}M weights, "
          f"{torch.get_num_threads()} threads; ms per pass over all of them (median of {args.repeats})\n")
    print("| rows M | " + " | ".join(ways) + " | ratio | FewRowLinear takes |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, k) for k in (576, 1536)}
            times = {name: [] for name in ways}
            for _ in range(args.repeats):
                for name, f in ways.items():
                    t0 = time.perf_counter()
                    for w in weights:
                        f(xs[w.shape[1]], w)
                    times[name].append((time.perf_counter() - t0) * 1000)
            med = [statistics.median(t) for t in times.values()]
            route = list(ways)[1 if 1 < m <= FewRowLinear.FEW_ROWS else 0]
            print(f"| {m} | {med[0]:.1f} | {med[1]:.1f} | {med[0] / med[1]:.2f}x | {route} |")


if __name__ == "__main__":
    main()
