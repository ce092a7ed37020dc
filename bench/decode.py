"""Greedy decode speed with the KV cache vs without (full recompute of the prefix every token), CPU.

Measured: for each context length L, a random prompt of L - N tokens is read (prefill, not counted)
and N + 1 greedy tokens are decoded by the decoding core (generate.stream_tokens); the N steps after
the first token are timed (its Stats.decode_s), so the last step sees position L - 1. Cached: the
model as sample.py runs it (speed.speed_up), each step feeds one token after the KV cache. Uncached:
the same loop, the same model, but every call re-runs forward(whole sequence so far, last_only=True)
(NoCache below: the only thing that differs is the cache). Batch 1, eval mode, torch.inference_mode,
fp32. The two ways take turns, `--repeats` times per (model, L); reported are median tokens/s and the
median over repeats of the per-repeat ratio cached/uncached, which should grow with L (uncached work
per token grows with L, cached work barely). "same tokens" checks that both ways picked identical
greedy ids.

Default model: preset "shakespeare" (6 layers, 384 wide, 10.7M params) with random weights, both
families; `--model PATH` measures a trained minillm checkpoint instead.

    python -m bench.decode                          # gpt2 + llama, L = 64, 256, 1024
    python -m bench.decode --repeats 1 --lengths 64,256
    python -m bench.decode --model weights/shakespeare-char.safetensors
"""

import argparse
import statistics
from pathlib import Path

import torch

from minillm.config import preset
from minillm.generate import Stats, stream_tokens
from minillm.model import Transformer
from minillm.sampling import SamplingParams
from minillm.speed import speed_up

GREEDY = SamplingParams(temperature=0.0)


class NoCache:
    """`model` as the decoding core sees it, but with the KV cache taken away: each call runs the model
    over the whole sequence so far (kept here), and the core's cache only counts positions. Any other
    attribute (config, parameters, ...) is the model's."""

    def __init__(self, model):
        self.model = model
        self.seq = None  # (1, positions so far)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, cache, start_pos, last_only=False):
        self.seq = tokens if start_pos == 0 else torch.cat([self.seq[:, :start_pos], tokens], 1)
        cache.length = self.seq.size(1)  # what a real cache would now hold; the core reads only this
        return self.model(self.seq, last_only=last_only)


def decode(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Prefill (not counted), then n one-token steps -> (the n tokens they chose, seconds for them)."""
    stats = Stats()
    ids = list(stream_tokens(model, prompt, n + 1, GREEDY, stats=stats))
    return ids[1:], stats.decode_s


def build_models(args, lengths: list[int]) -> dict:
    torch.manual_seed(0)
    if args.model:
        from minillm.checkpoint import load_model  # lazy: only this option needs it
        models = {Path(args.model).stem: load_model(args.model).model}
    else:
        models = {f: Transformer(preset("shakespeare", family=f, vocab_size=65, dropout=0.0,
                                        block_size=max(lengths + [1024]))) for f in args.families.split(",")}
    for m in models.values():
        speed_up(m.eval())  # the routes sample.py takes by default
    return models


def make_cases(models: dict, lengths: list[int], n: int) -> list[tuple[str, int, list[int]]]:
    """(model name, L, random prompt of L - n tokens) for every L the model's context allows."""
    gen = torch.Generator().manual_seed(1337)
    cases = []
    for name, m in models.items():
        print(f"{name}: {m.num_params():,} parameters, {m.config.family}, block_size {m.config.block_size}")
        for L in lengths:
            if not n < L <= m.config.block_size:
                print(f"  skipping L={L}: needs {n} < L <= block_size")
                continue
            cases.append((name, L, torch.randint(m.config.vocab_size, (L - n,), generator=gen).tolist()))
    return cases


def measure(models: dict, cases: list, n: int, repeats: int) -> dict:
    """{(name, L): {"c": [cached seconds], "u": [uncached seconds], "same": bool}}, the ways alternating."""
    ways = {name: {"c": m, "u": NoCache(m)} for name, m in models.items()}
    res = {(name, L): {"c": [], "u": [], "same": True} for name, L, _ in cases}
    for name, _, prompt in cases[:1]:  # warm-up
        decode(ways[name]["c"], prompt, 4), decode(ways[name]["u"], prompt, 4)
    for rep in range(repeats):
        for name, L, prompt in cases:
            r, toks = res[(name, L)], {}
            for key in ("c", "u")[::1 if rep % 2 == 0 else -1]:  # alternate which way goes first
                toks[key], secs = decode(ways[name][key], prompt, n)
                r[key].append(secs)
            r["same"] &= toks["c"] == toks["u"]
    return res


def table(res: dict, n: int, repeats: int) -> dict:
    print(f"\nbatch 1, N = {n} timed steps per measurement, {repeats} repeats, threads {torch.get_num_threads()}\n")
    print("| model | L | prompt | cached tok/s | uncached tok/s | cached/uncached | same tokens |")
    print("|---|---|---|---|---|---|---|")
    plot = {}
    for (name, L), r in res.items():
        c, u = n / statistics.median(r["c"]), n / statistics.median(r["u"])
        ratio = statistics.median(us / cs for cs, us in zip(r["c"], r["u"]))
        plot.setdefault(name, []).append((L, c, u, ratio))
        print(f"| {name} | {L} | {L - n} | {c:,.1f} | {u:,.1f} | {ratio:.1f}x | {'yes' if r['same'] else 'NO'} |")
    return plot


def draw(plot: dict, out: str) -> None:
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
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(), fig.savefig(out, dpi=100)
    print(f"\nwrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="64,256,1024", help="context positions L reached at the last step")
    ap.add_argument("--new", type=int, default=32, help="N: timed decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", default="gpt2,llama", help="random-init models to measure")
    ap.add_argument("--model", help="a minillm checkpoint (.safetensors) to measure instead")
    ap.add_argument("--out", default="bench/out/decode.png")
    args = ap.parse_args(argv)
    lengths, n = [int(s) for s in args.lengths.split(",")], args.new
    models = build_models(args, lengths)
    res = measure(models, make_cases(models, lengths, n), n, args.repeats)
    draw(table(res, n, args.repeats), args.out)


if __name__ == "__main__":
    main()
