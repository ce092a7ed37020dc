"""Speculative decoding against plain cached decoding: how much faster, and is its greedy output plain greedy?

`speed`: time per k, acceptance, tokens per target call. Redoes the second experiment of the seed
article (../shared/docs/seeds/000_32a88b6b5a7b5689.txt) fairly:
  * its plain baseline re-ran the model over the whole sequence for every token; ours is plain
    cached decoding (minillm.methods.stream with method "sample"/"greedy": generate.stream_tokens),
    the same model, dtype, speed layer (speed.speed_up, as sample.py) and threads as the speculative
    run (method "speculative": minillm.speculative.speculative_stream, a cache per model);
  * it averaged the baseline over all k into one number and timed each k once; we time plain and
    speculative back to back for every k (paired, so load drift on a shared CPU hits both alike),
    draw the median plain time as the line (and each k's own plain time as a tick), and report the paired ratio plain/speculative per k;
  * it reported time only; we also report the acceptance rate (accepted drafts / proposed), mean
    drafts accepted per target call and new tokens per target call, and at temperature 0 we check
    that the output is token for token the plain greedy output (speculative decoding is exact);
  * beside each k, the speedup Leviathan et al. (2023) predict from the measured alpha (1 - total
    variation between target and draft, SpecStats.empirical_alpha) and cost ratio c (a draft call's
    time over a plain step's): (1 - alpha^(k+1)) / ((1 - alpha)(c k + 1)). Their formula prices a
    verify call of k+1 tokens like one plain step; the "verify/plain step" column says how far
    that holds on this machine.
Per k and temperature: every prompt generates --max-new-tokens tokens (EOS does not stop), seed
1000*k + prompt index for both ways; one untimed warm-up generation first. The bar chart (one panel
per temperature: speculative seconds per k, plain median as a dashed line) goes to bench/out/.

`exactness`: where greedy speculative output parts from plain greedy output, and how close the
target's top two logits are there. At temperature 0 the two agree exactly when the target's logits
for a position are the same whether it reads that position in a verify call of k+1 rows or in a
one-row decode step. In float32 that held in every `speed` run here; in bf16 (and the int4 kernel's
bf16 activations) the two calls round differently, and where the top two logits lie within a
rounding step of each other the argmax can flip. Per prompt: "identical", or the first differing
token and the top-2 logits there from an uncached forward of the whole sequence (a third way to
compute the same logits, rounding differently again).

    python -m bench.speculative speed --target weights/shakespeare-char-big.safetensors \\
        --draft weights/shakespeare-char-baby256.safetensors
    python -m bench.speculative speed --target weights/smollm2-135m.safetensors \\
        --draft weights/smollm2-135m-first4.safetensors --max-new-tokens 48 --prompts 3 --threads 1
    python -m bench.speculative exactness --target weights/qwen2.5-coder-1.5b-bf16.safetensors \\
        --draft weights/qwen2.5-coder-0.5b-int4.safetensors --prompt-set code --prompts 5 --k 4
    python -m bench.speculative speed --target weights/qwen2.5-coder-1.5b.safetensors --dtype bfloat16 \\
        --draft lookup --batch-invariant 5 --prompt-set code --ks 4 --temperatures 0 --max-new-tokens 48

`--draft lookup` drafts by prompt lookup (no draft model). `--batch-invariant ROWS` runs the
speculative side with the target in speed.batch_invariant mode, and plain decoding twice: without
the mode (the speedup's baseline) and with it (what "identical" then compares with; its time over
plain's is the mode's cost); "without the mode: identical" says whether speculative output also
equals plain greedy output of the target as it runs by default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import describe
from bench.prompts import PROMPT_SETS
from minillm import checkpoint
from minillm.flags import integer
from minillm.methods import Method, load_partner, stream
from minillm.sampling import SamplingParams
from minillm.speculative import SpecStats
from minillm.speed import batch_invariant, compile_decode, few_row_route, prepack, speed_up

OUT_DIR = Path(__file__).resolve().parent / "out"


@dataclass
class Row:
    temperature: float
    k: int
    plain_s: float
    spec_s: float
    stats: SpecStats
    identical: bool | None  # temperature 0 only
    exact_s: float | None = None  # --batch-invariant: plain decoding in that mode (what identical compares with)
    identical_to_default: bool | None = None  # --batch-invariant: speculative vs plain without the mode

    @property
    def speedup(self) -> float:
        return self.plain_s / self.spec_s


def timed(fn) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = list(fn())
    return out, time.perf_counter() - t0


def measure(target, draft, prompts: list[list[int]], n: int, k: int, temperature: float, lookup: bool = False,
            exact_rows: int | None = None) -> Row:
    """Plain and speculative back to back per prompt. With exact_rows the target runs speculative in
    speed.batch_invariant mode, and plain both ways: without it (the speedup's baseline) and with it
    (the output speculative must equal; its time over plain's is the mode's cost)."""
    params = SamplingParams(temperature=temperature)
    plain_m = Method("greedy" if params.greedy else "sample", params)
    spec_m = Method("speculative", params, k=k, draft_lookup=lookup)
    stats = SpecStats()  # accumulates over the prompts
    plain_s = spec_s = exact_s = 0.0
    identical = identical_default = True
    for i, p in enumerate(prompts):
        seed = 1000 * k + i
        run = lambda m, **kw: timed(lambda: stream(m, target, p, n, generator=torch.Generator().manual_seed(seed), **kw))
        plain, dt = run(plain_m)
        plain_s += dt
        want = plain  # what speculative output must equal: plain greedy in the mode speculative runs in
        if exact_rows:
            batch_invariant(target, exact_rows)
            want, dt = run(plain_m)
            exact_s += dt
        spec, dt = run(spec_m, partner=None if lookup else draft, stats=stats)
        spec_s += dt
        if exact_rows:
            batch_invariant(target, None)
        identical &= want == spec
        identical_default &= plain == spec
    stats.new_tokens = n * len(prompts)
    greedy = temperature == 0
    return Row(temperature, k, plain_s, spec_s, stats, identical if greedy else None,
               exact_s if exact_rows else None, identical_default if exact_rows and greedy else None)


def plot(rows: list[Row], temps: list[float], title: str, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4.5), squeeze=False)
    for ax, t in zip(axes[0], temps):
        rs = [r for r in rows if r.temperature == t]
        ks = [r.k for r in rs]
        bars = ax.bar(ks, [r.spec_s for r in rs], width=0.6, alpha=0.8, label="speculative")
        for b, r in zip(bars, rs):
            ax.annotate(f"{r.speedup:.2f}x\n{r.stats.acceptance_rate:.0%}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.axhline(statistics.median(r.plain_s for r in rs), color="red", ls="--", label="plain (KV cache), median")
        ax.plot(ks, [r.plain_s for r in rs], "k_", ms=22, mew=2, label="plain, timed beside this k")
        ax.set_xlabel("k (draft tokens per target call)"), ax.set_ylabel("seconds (all prompts)")
        ax.set_xticks(ks), ax.set_title(f"temperature {t:g}", fontsize=10), ax.legend(fontsize=8)
        ax.grid(axis="y", ls="--", alpha=0.5)
        ax.set_ylim(0, max(max(r.spec_s for r in rs), max(r.plain_s for r in rs)) * 1.25)
    fig.suptitle(textwrap.fill(title, 80 * len(temps)) + "\n(labels: paired speedup plain/speculative, acceptance rate)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    both = argparse.ArgumentParser(add_help=False)
    both.add_argument("--target", type=Path, required=True)
    both.add_argument("--draft", type=Path, required=True,
                      help="same tokenizer as the target; the word lookup: prompt lookup, no draft model")
    both.add_argument("--dtype", choices=["float32", "bfloat16"], help="the target's (and draft's) dtype (default: as stored)")
    both.add_argument("--batch-invariant", type=integer(1), metavar="ROWS",
                      help="speculative runs with the target in speed.batch_invariant(ROWS) mode; plain runs both "
                           "without it (the baseline) and with it (what the output must equal, and the mode's cost)")
    both.add_argument("--prompt-set", choices=list(PROMPT_SETS), default="article",
                      help="the seed article's 5 prompts (default), 20 general ones, or 10 openings of code (for code models)")
    both.add_argument("--prompts", type=int, default=None, help="use the first N of the set")
    both.add_argument("--threads", type=int, help="torch.set_num_threads (1 is steadier on a busy shared CPU)")
    both.add_argument("--prepack", action="store_true", help="speed.prepack(target): its fp32 weights reordered "
                      "once for oneDNN's few-row matmul (verify calls), a second copy of them in memory; only "
                      "where the few-row route is oneDNN's (MINILLM_FEW_ROWS=onednn, or CPUs without our kernel)")
    sp = sub.add_parser("speed", parents=[both], help="plain vs speculative time per k, acceptance, Leviathan's prediction")
    sp.add_argument("--ks", default="1,2,3,4,5,6,7,8,9,10")
    sp.add_argument("--temperatures", default="0,0.8")
    sp.add_argument("--max-new-tokens", type=int, default=100)
    sp.add_argument("--plot", type=Path, help="default: bench/out/speculative-<target>-<draft>.png")
    sp.add_argument("--compile-draft", action="store_true", help="the draft's one-token steps through compile_decode "
                    "(an int4, bf16 or float32 LLaMA-family draft: speed.OneCallStep, nothing to compile)")
    sp.add_argument("--compile-target", action="store_true",
                    help="the target's one-token steps (all of plain decoding; verification stays eager, except "
                         "for an int4, bf16 or float32 LLaMA-family target, whose verifications OneCallStep runs too)")
    ex = sub.add_parser("exactness", parents=[both], help="where greedy speculative parts from plain greedy")
    ex.add_argument("--k", type=int, default=4)
    ex.add_argument("--max-new-tokens", type=int, default=32)
    ex.set_defaults(compile_draft=False, compile_target=False)
    return ap.parse_args(argv)


def stem(path: Path) -> str:
    return path.name.removesuffix(".safetensors")


def load(args):
    """-> (target, draft or None for lookup, tokenizer), run as sample.py runs them: the speed layer
    on, compiled when asked."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t_l = checkpoint.load_model(args.target, dtype=dtype)
    target, draft = speed_up(t_l.model), None
    if str(args.draft) != "lookup":
        try:
            draft = speed_up(load_partner(str(args.draft), "draft", t_l, dtype=dtype).model)  # the one same-tokenizer rule
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if args.compile_draft and draft is not None:
        compile_decode(draft)
    if args.compile_target:
        compile_decode(target)
    if args.prepack:
        print(f"prepack: {prepack(target) / 2**20:.0f} MiB of reordered weights")
    return target, draft, t_l.tokenizer


def leviathan(alpha: float, c: float, k: int) -> tuple[float, float]:
    """Leviathan et al. (2023): expected tokens per target call (1 - a^(k+1)) / (1 - a), and the
    expected speedup over plain decoding, that over (c k + 1): a target call costs one plain step,
    a draft step c of one."""
    if alpha >= 1.0:
        return k + 1.0, (k + 1.0) / (c * k + 1)
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens, tokens / (c * k + 1)


def costs(r: Row, total: int) -> tuple[float, float]:
    """(c, v): a draft call's and a target (verify) call's mean time, each over a plain step's."""
    step = r.plain_s / total
    mean = lambda role: r.stats.seconds.get(role, 0.0) / max(r.stats.calls.get(role, 0), 1)
    return mean("draft") / step, mean("target") / step


def report(rows: list[Row], temps: list[float], total: int) -> None:
    print("\n| T | k | plain s | spec s | speedup (paired) | plain tok/s | spec tok/s | acceptance | mean accepted / call "
          "| tokens / target call | target calls | draft s / target s | alpha (1-TV) | c = draft/plain step "
          "| verify/plain step | Leviathan tokens/call | Leviathan speedup | identical to plain greedy "
          "| exact mode: plain s (cost) | without the mode: identical |")
    print("|" + "---|" * 20)
    yes_no = lambda b: "" if b is None else ("yes" if b else "**NO**")
    for r in rows:
        s = r.stats
        same = yes_no(r.identical)
        exact = "" if r.exact_s is None else f"{r.exact_s:.2f} ({r.exact_s / r.plain_s:.2f}x)"
        c, v = costs(r, total)
        tokens, speedup = leviathan(s.empirical_alpha, c, r.k)
        print(f"| {r.temperature:g} | {r.k} | {r.plain_s:.2f} | {r.spec_s:.2f} | {r.speedup:.2f}x | {total / r.plain_s:.1f} | "
              f"{total / r.spec_s:.1f} | {s.acceptance_rate:.1%} | {s.mean_accepted:.2f} | {s.tokens_per_target_call:.2f} | "
              f"{s.calls.get('target', 0)} | {s.seconds.get('draft', 0.0):.2f} / {s.seconds.get('target', 0.0):.2f} | "
              f"{s.empirical_alpha:.3f} | {c:.3f} | {v:.2f} | {tokens:.2f} | {speedup:.2f}x | {same} | {exact} "
              f"| {yes_no(r.identical_to_default)} |")
    print()
    for t in temps:
        rs = [r for r in rows if r.temperature == t]
        best = max(rs, key=lambda r: r.speedup)
        print(f"T={t:g}: plain median {statistics.median(r.plain_s for r in rs):.2f}s; best k={best.k}: "
              f"{best.speedup:.2f}x, acceptance {best.stats.acceptance_rate:.1%}, "
              f"{best.stats.tokens_per_target_call:.2f} tokens per target call")


def speed(args, target, draft, prompts: list[list[int]]) -> int:
    """Plain and speculative timed back to back per (temperature, k): the table, the chart."""
    ks = [int(k) for k in args.ks.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    n = args.max_new_tokens
    drafting = "prompt lookup" if draft is None else f"draft {stem(args.draft)} ({describe(draft, args.draft, args.compile_draft)})"
    exact = f", batch_invariant({args.batch_invariant})" if args.batch_invariant else ""
    title = (f"{stem(args.target)} ({describe(target, args.target, args.compile_target)}{exact}) + {drafting}: "
             f"{len(prompts)} {args.prompt_set} prompts x {n} new tokens, CPU, {torch.get_num_threads()} thread(s)")
    print(title)
    print(f"few-row route (speed.few_row_route): {few_row_route(next(target.parameters()).dtype)}")
    print(f"load before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", flush=True)

    t0 = time.perf_counter()  # warm-up (compiles, when asked)
    greedy = SamplingParams(temperature=0)
    list(stream(Method("speculative", greedy, k=4, draft_lookup=draft is None), target, prompts[0], min(n, 16), draft))
    list(stream(Method("greedy", greedy), target, prompts[0], min(n, 16)))
    if args.batch_invariant:  # probes each matrix's block size once
        list(stream(Method("greedy", greedy), batch_invariant(target, args.batch_invariant), prompts[0], min(n, 16)))
        batch_invariant(target, None)
    print(f"warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for t in temps:
        for k in ks:
            rows.append(measure(target, draft, prompts, n, k, t, draft is None, args.batch_invariant))
            r = rows[-1]
            print(f"  T={t:g} k={k}: plain {r.plain_s:.2f}s spec {r.spec_s:.2f}s", file=sys.stderr, flush=True)

    report(rows, temps, n * len(prompts))
    print(f"load after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    path = args.plot or OUT_DIR / f"speculative-{stem(args.target)}-{stem(args.draft)}.png"
    if plot(rows, temps, title, path):
        print(f"chart: {path}")
    bad = [r for r in rows if r.identical is False]
    if bad:
        print(f"error: temperature 0 output differs from plain greedy for k = {[r.k for r in bad]}", file=sys.stderr)
        return 1
    return 0


def exactness(args, target, draft, tok, texts: list[str]) -> int:
    """Greedy plain and speculative per prompt; where they part, the uncached forward's top two logits."""
    greedy, n = SamplingParams(temperature=0), args.max_new_tokens
    if args.batch_invariant:
        batch_invariant(target, args.batch_invariant)
    print(f"{stem(args.target)} + {'prompt lookup' if draft is None else 'draft ' + stem(args.draft)}, greedy, k = "
          f"{args.k}, {n} new tokens per prompt, few-row route {few_row_route(next(target.parameters()).dtype)}"
          f"{', batch_invariant(%d)' % args.batch_invariant if args.batch_invariant else ''}\n")
    print("| prompt | parts at new token | plain | speculative | uncached forward's top-2 logits |\n|---|---|---|---|---|")
    for text in texts:
        ids = tok.encode(text)
        plain = list(stream(Method("greedy", greedy), target, ids, n))
        spec = list(stream(Method("speculative", greedy, k=args.k, draft_lookup=draft is None), target, ids, n, draft))
        if plain == spec:
            print(f"| {text!r} | identical ({n} tokens) | | | |")
            continue
        i = next(i for i in range(n) if plain[i] != spec[i])
        with torch.inference_mode():
            top = target(torch.tensor([ids + plain[:i]]))[0, -1].float().topk(2)
        tops = ", ".join(f"{tok.decode([t])!r} {v:g}" for t, v in zip(top.indices.tolist(), top.values.tolist()))
        print(f"| {text!r} | {i} | {tok.decode([plain[i]])!r} | {tok.decode([spec[i]])!r} | {tops} |")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, draft, tok = load(args)
    texts = PROMPT_SETS[args.prompt_set][:args.prompts]
    if args.command == "exactness":
        return exactness(args, target, draft, tok, texts)
    return speed(args, target, draft, [tok.encode(t) for t in texts])


if __name__ == "__main__":
    sys.exit(main())
