"""Greedy decode speed with the KV cache vs without (full recompute of the prefix every token), CPU.

Measured: for each context length L, a random prompt of L - N tokens is processed once (untimed:
prefill into the cache, or one full forward), then N greedy tokens are decoded and timed, so the
last step sees position L - 1. Cached: each step feeds one token at start_pos and reads the cache.
Uncached: each step runs forward(whole sequence so far, last_only=True). Batch 1, eval mode,
torch.inference_mode, fp32. The two ways take turns, `--repeats` times per (model, L); reported are
median tokens/s and the median over repeats of the per-repeat ratio cached/uncached, which should
grow with L (uncached work per token grows with L, cached work barely). "same tokens" checks that
both ways picked identical greedy ids.

Default model: preset "shakespeare" (6 layers, 384 wide, 10.7M params) with random weights, both
families; `--model PATH` measures a trained minillm checkpoint instead.

    python bench/decode.py                          # gpt2 + llama, L = 64, 256, 1024
    python bench/decode.py --repeats 1 --lengths 64,256
    python bench/decode.py --model weights/shakespeare-char.safetensors
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from minillm.config import preset
from minillm.kv_cache import KVCache
from minillm.model import Transformer


def decode_cached(model, prompt, n):
    """Prefill (untimed), then n one-token steps: returns (new token ids, seconds for the n steps)."""
    cache = KVCache.for_model(model, max_len=prompt.shape[1] + n)
    tok = model(prompt, cache=cache, start_pos=0, last_only=True).argmax(-1)  # (1, 1)
    pos, out = prompt.shape[1], []
    t0 = time.perf_counter()
    for _ in range(n):
        tok = model(tok, cache=cache, start_pos=pos, last_only=True).argmax(-1)
        pos += 1
        out.append(tok.item())
    return out, time.perf_counter() - t0


def decode_uncached(model, prompt, n):
    """One full forward (untimed), then n steps that each re-run the whole sequence."""
    seq = torch.cat([prompt, model(prompt, last_only=True).argmax(-1)], dim=1)
    out = []
    t0 = time.perf_counter()
    for _ in range(n):
        tok = model(seq, last_only=True).argmax(-1)
        seq = torch.cat([seq, tok], dim=1)
        out.append(tok.item())
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="64,256,1024", help="context positions L reached at the last step")
    ap.add_argument("--new", type=int, default=32, help="N: timed decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", default="gpt2,llama", help="random-init models to measure")
    ap.add_argument("--model", help="a minillm checkpoint (.safetensors) to measure instead")
    ap.add_argument("--out", default="bench/out/decode.png")
    args = ap.parse_args()
    lengths, n = [int(s) for s in args.lengths.split(",")], args.new

    torch.manual_seed(0)
    if args.model:
        from minillm.checkpoint import load_model  # lazy: only this option needs it
        models = {Path(args.model).stem: load_model(args.model).model}
    else:
        models = {f: Transformer(preset("shakespeare", family=f, vocab_size=65, dropout=0.0,
                                        block_size=max(lengths + [1024]))) for f in args.families.split(",")}
    gen = torch.Generator().manual_seed(1337)
    cases = []  # (model name, L, prompt)
    for name, m in models.items():
        m.eval()
        print(f"{name}: {m.num_params():,} parameters, {m.config.family}, block_size {m.config.block_size}")
        for L in lengths:
            if not n < L <= m.config.block_size:
                print(f"  skipping L={L}: needs {n} < L <= block_size")
                continue
            cases.append((name, L, torch.randint(m.config.vocab_size, (1, L - n), generator=gen)))

    res = {(name, L): {"c": [], "u": [], "same": True} for name, L, _ in cases}
    with torch.inference_mode():
        for name, _, prompt in cases[:1]:  # warm-up
            decode_cached(models[name], prompt, 4), decode_uncached(models[name], prompt, 4)
        for rep in range(args.repeats):
            for name, L, prompt in cases:
                r = res[(name, L)]
                ways = [("c", decode_cached), ("u", decode_uncached)][::1 if rep % 2 == 0 else -1]
                toks = {}
                for key, fn in ways:  # alternate which way goes first
                    toks[key], secs = fn(models[name], prompt, n)
                    r[key].append(secs)
                r["same"] &= toks["c"] == toks["u"]

    print(f"\nbatch 1, N = {n} timed steps per measurement, {args.repeats} repeats, threads {torch.get_num_threads()}\n")
    print("| model | L | prompt | cached tok/s | uncached tok/s | cached/uncached | same tokens |")
    print("|---|---|---|---|---|---|---|")
    plot = {}
    for (name, L), r in res.items():
        c, u = n / statistics.median(r["c"]), n / statistics.median(r["u"])
        ratio = statistics.median(us / cs for cs, us in zip(r["c"], r["u"]))
        plot.setdefault(name, []).append((L, c, u, ratio))
        print(f"| {name} | {L} | {L - n} | {c:,.1f} | {u:,.1f} | {ratio:.1f}x | {'yes' if r['same'] else 'NO'} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, pts) in enumerate(plot.items()):
        Ls, c, u, ratio = zip(*pts)
        ax1.plot(Ls, c, "o-", color=f"C{i}", label=f"{name} cached")
        ax1.plot(Ls, u, "s--", color=f"C{i}", label=f"{name} uncached")
        ax2.plot(Ls, ratio, "o-", color=f"C{i}", label=name)
    ax1.set(xscale="log", yscale="log", xlabel="context position L", ylabel="decode tokens/s", title="decode speed")
    ax2.set(xscale="log", xlabel="context position L", ylabel="cached / uncached", title="KV-cache speed-up")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both"), ax.legend()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(), fig.savefig(args.out, dpi=100)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
