"""Diversity and quality of decoding methods: plain sampling, top-p, greedy and contrastive decoding.

Redoes the first experiment of the seed article (../shared/docs/seeds/000_32a88b6b5a7b5689.txt) without its flaws:
  * it scored prompt + continuation; we score the continuation only;
  * 5 prompts, one sample each, no seed, no spread; we use its 5 prompts plus 20 of ours (or 10
    openings of code, --prompt-set code, for code models), several seeds, and print mean ± std
    over seeds (std of the corpus-level metric across seeds); the article's own per-text means are
    printed too, beside its numbers;
  * diversity alone rewards noise (uniformly random words maximise distinct-n), so every row also
    carries a quality number: the expert's perplexity of the continuation given the prompt, and
    the table has greedy (the degenerate end) and top-p next to plain sampling (the noisy end);
  * its contrastive loop re-ran both models over the whole sequence every token; ours is
    minillm.contrastive (a KV cache per model), with the settings printed beside the numbers.
Every method runs through minillm.methods.stream (the dispatch sample.py uses), on models with the
speed layer on (speed.speed_up, as sample.py runs them; same numbers as model.py).

Metrics (minillm/eval/text_metrics.py): n-gram entropy n = 1..3 (bits, corpus-pooled), distinct-1/2
(distinct / all n-grams, corpus-pooled), rep-2 and rep-4 (SimCTG, %, within each text), on
whitespace words. Expert perplexity: exp(mean NLL) over all continuation tokens of the corpus,
each scored by one uncached float32 forward of prompt + continuation, prompt tokens not counted.
EOS does not stop generation (every continuation has exactly --max-new-tokens tokens, as in Li et
al.'s setup), so lengths are equal across methods. Deterministic methods (temperature 0) run once:
their ± is 0 by construction and printed as "·".

    python -m bench.decoding --expert weights/shakespeare-char-big.safetensors \\
        --amateur weights/shakespeare-char-baby256.safetensors --reference-text ../shared/data/tinyshakespeare/input.txt
    python -m bench.decoding --expert weights/smollm2-135m.safetensors \\
        --amateur weights/smollm2-135m-first8.safetensors --max-new-tokens 64 --seeds 3
    python -m bench.decoding --expert weights/qwen2.5-coder-1.5b-keepq.safetensors \\
        --amateur weights/qwen2.5-coder-0.5b-keepq.safetensors --prompt-set code \\
        --methods greedy,top-p,cd,cd-li,cd-li-t1 --max-new-tokens 64 --plot bench/out/decoding-qwen.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import describe
from bench.prompts import ARTICLE_PROMPTS, PROMPT_SETS
from minillm import checkpoint
from minillm.methods import Method, load_partner, stream
from minillm.sampling import SamplingParams
from minillm.speed import speed_up
from minillm.eval.text_metrics import distinct_n, ngram_entropy, rep_n

# The seed article's results (5 prompts, one sample each, 50 tokens, per-text means over prompt + continuation;
# GPT-2-large expert, GPT-2 amateur): naive sampling and its contrastive decoding.
ARTICLE_RESULTS = {
    "article: naive sampling": {"ent-1": 4.990, "ent-2": 5.175, "ent-3": 5.144, "distinct-1": 0.895, "distinct-2": 0.995},
    "article: contrastive": {"ent-1": 5.183, "ent-2": 5.350, "ent-3": 5.314, "distinct-1": 0.903, "distinct-2": 1.000},
}


@dataclass
class Setting:
    name: str  # the row's name in the table
    settings: str  # printed next to the numbers
    method: Method  # what minillm.methods.stream runs

    @property
    def deterministic(self) -> bool:
        return self.method.params.greedy


SETTINGS = {
    "sample": Setting("sample", "T=1, no truncation", Method("sample", SamplingParams(temperature=1.0))),
    "top-p": Setting("top-p", "T=1, top_p=0.95", Method("sample", SamplingParams(temperature=1.0, top_p=0.95))),
    "greedy": Setting("greedy", "T=0 (argmax)", Method("greedy", SamplingParams(temperature=0))),
    "cd": Setting("cd", "greedy; obrien α=0.1 β=0.5 (amateur weight 1/3); amateur sees full prompt",
                  Method("contrastive", SamplingParams(temperature=0), alpha=0.1, beta=0.5, objective="obrien",
                         amateur_context="full")),
    "cd-li": Setting("cd-li", "greedy; li α=0.1 τ=0.5 (amateur weight 2); amateur sees last prompt token",
                     Method("contrastive", SamplingParams(temperature=0), alpha=0.1, objective="li",
                            amateur_temperature=0.5, amateur_context="last_prompt_token")),
    "cd-li-t1": Setting("cd-li-t1", "greedy; li α=0.1 τ=1.0 (amateur weight 1, Li et al.'s OPT setting); amateur "
                        "sees last prompt token",
                        Method("contrastive", SamplingParams(temperature=0), alpha=0.1, objective="li",
                               amateur_temperature=1.0, amateur_context="last_prompt_token")),
    "cd-sample": Setting("cd-sample", "T=1 on obrien scores α=0.1 β=0.5; amateur sees full prompt",
                         Method("contrastive", SamplingParams(temperature=1.0), alpha=0.1, beta=0.5,
                                objective="obrien", amateur_context="full")),
}


@dataclass
class Run:
    """One method, one seed: one continuation per prompt and what was measured on them."""
    texts: list[str]
    nll: float  # summed over all continuation tokens
    n_tokens: int
    seconds: float
    head_sizes: list[int] = field(default_factory=list)
    differs: int = 0

    def metrics(self) -> dict[str, float]:
        m = {f"ent-{n}": ngram_entropy(self.texts, n) for n in (1, 2, 3)}
        m |= {f"distinct-{n}": distinct_n(self.texts, n) for n in (1, 2)}
        m |= {f"rep-{n}": rep_n(self.texts, n) for n in (2, 4)}
        m["expert ppl"] = math.exp(self.nll / self.n_tokens)
        return m

    def per_text(self) -> dict[str, float]:
        """The seed article's way: each metric on each text alone, then the mean over texts."""
        m = {f"ent-{n}": statistics.fmean(ngram_entropy([t], n) for t in self.texts) for n in (1, 2, 3)}
        return m | {f"distinct-{n}": statistics.fmean(distinct_n([t], n) for t in self.texts) for n in (1, 2)}


COLUMNS = ["ent-1", "ent-2", "ent-3", "distinct-1", "distinct-2", "rep-2", "rep-4", "expert ppl"]
ARTICLE_COLUMNS = ["ent-1", "ent-2", "ent-3", "distinct-1", "distinct-2"]


@torch.inference_mode()
def continuation_nll(model, prompt_ids: list[int], cont_ids: list[int]) -> float:
    """Sum of -log p_expert(cont_i | prompt, cont_<i), float32, one forward without a cache."""
    ids = torch.tensor([prompt_ids + cont_ids])
    logp = model(ids[:, :-1]).float().log_softmax(-1)[0, len(prompt_ids) - 1:]  # (len(cont), V)
    return -logp.gather(-1, torch.tensor(cont_ids).unsqueeze(-1)).sum().item()


def run_method(setting: Setting, expert, amateur, tok, prompts: list[str], n: int, seed: int) -> Run:
    texts, nll, count, t0 = [], 0.0, 0, time.perf_counter()
    heads, differs = [], 0
    for i, prompt in enumerate(prompts):
        p_ids, stats = tok.encode(prompt), setting.method.new_stats()
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        ids = list(stream(setting.method, expert, p_ids, n, amateur, gen, stats=stats))  # no eos_ids: EOS does not stop
        texts.append(tok.decode(ids))
        nll += continuation_nll(expert, p_ids, ids)
        count += len(ids)
        heads += getattr(stats, "head_sizes", [])  # contrastive only (CDStats)
        differs += getattr(stats, "differs_from_expert", 0)
    return Run(texts, nll, count, time.perf_counter() - t0, heads, differs)


def reference_run(expert, tok, text_path: Path, n_prompts: int, prompt_chars: int, n: int, seed: int) -> Run:
    """Human text as a yardstick: n_prompts random excerpts of the last 10% of the file (the val
    split), a prompt_chars-character prompt followed by its true n-token continuation."""
    text = text_path.read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9):]
    gen = torch.Generator().manual_seed(seed)
    texts, nll, count = [], 0.0, 0
    for start in torch.randint(0, len(val) - 4 * (prompt_chars + n), (n_prompts,), generator=gen).tolist():
        p_ids = tok.encode(val[start:start + prompt_chars])
        ids = tok.encode(val[start + prompt_chars:start + 4 * (prompt_chars + n)])[:n]
        texts.append(tok.decode(ids))
        nll += continuation_nll(expert, p_ids, ids)
        count += len(ids)
    return Run(texts, nll, count, 0.0)


def fmt(values: list[float], col: str, deterministic: bool) -> str:
    digits = 2 if col.startswith(("ent", "rep", "expert")) else 3
    mean = statistics.fmean(values)
    if deterministic or len(values) == 1 or math.isnan(mean):  # nan: a text too short for the metric
        return f"{mean:.{digits}f} ± ·"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--expert", type=Path, required=True)
    ap.add_argument("--amateur", type=Path, required=True, help="same tokenizer as the expert")
    ap.add_argument("--methods", default="sample,top-p,greedy,cd,cd-li,cd-sample", help=f"from {list(SETTINGS)}")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prompt-set", choices=["general", "code"], default="general",
                    help="the article's 5 prompts + 20 general (default) or + 10 code openings")
    ap.add_argument("--prompts", type=int, default=None, help="use the first N of the set")
    ap.add_argument("--plot", type=Path, help="a PNG of 3-gram entropy, distinct-2 and expert ppl per method")
    ap.add_argument("--reference-text", type=Path, help="add a row for human text from this file's last 10%%")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (1 is steadier on a busy shared CPU)")
    ap.add_argument("--json", type=Path, help="write every number and text here")
    return ap.parse_args(argv)


def load(args):
    """-> (expert, amateur) Loaded, the amateur refused unless it has the expert's tokenizer; speed layer on."""
    expert_l = checkpoint.load_model(args.expert)
    try:
        amateur_l = load_partner(str(args.amateur), "amateur", expert_l)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for m in (expert_l, amateur_l):
        speed_up(m.model)  # as sample.py runs them
    return expert_l, amateur_l


def print_header(args, expert_l, amateur_l, n_prompts: int) -> None:
    for role, path, m in (("expert ", args.expert, expert_l), ("amateur", args.amateur, amateur_l)):
        print(f"{role} {path} ({m.config.family}, {m.config.n_layer} layers, {describe(m.model, path)})")
    print(f"{n_prompts} prompts (article's 5 + {n_prompts - 5} ours, set {args.prompt_set}), {args.max_new_tokens} new tokens each, EOS not "
          f"stopping, seeds 0..{args.seeds - 1} (sampling methods), CPU, threads {torch.get_num_threads()}, "
          f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("metrics on whitespace words of the continuations only; ent-n in bits (corpus-pooled), distinct-n = "
          "distinct/all n-grams (corpus-pooled), rep-n % (within-text, SimCTG), expert ppl = exp(mean NLL of the "
          "continuation tokens | prompt) under the expert; mean ± std over seeds\n", flush=True)


def collect(args, settings: list[Setting], expert, amateur, tok, prompts: list[str]) -> dict[str, dict]:
    """{row name: {settings, runs (one per seed), deterministic}}: the human reference first, if asked."""
    n, results = args.max_new_tokens, {}
    if args.reference_text:
        prompt_chars = 30
        refs = [reference_run(expert, tok, args.reference_text, len(prompts), prompt_chars, n, s)
                for s in range(args.seeds)]
        results["human (val text)"] = dict(settings=f"{len(prompts)} random excerpts of the val split: "
                                                    f"{prompt_chars}-char prompt + its true {n}-token continuation",
                                           runs=refs, deterministic=False)
    for m in settings:
        seeds = [0] if m.deterministic else list(range(args.seeds))
        runs = []
        for s in seeds:
            runs.append(run_method(m, expert, amateur, tok, prompts, n, s))
            print(f"  {m.name} seed {s}: {runs[-1].seconds:.1f}s", file=sys.stderr, flush=True)
        results[m.name] = dict(settings=m.settings, runs=runs, deterministic=m.deterministic)
    return results


def print_table(results: dict[str, dict], prompts: list[str]) -> None:
    head = "| method | settings | " + " | ".join(COLUMNS) + " | CD: mean \\|V_head\\| / % ≠ expert argmax |"
    print(head)
    print("|" + "---|" * (len(COLUMNS) + 3))
    for name, r in results.items():
        per_seed = [run.metrics() for run in r["runs"]]
        cells = [fmt([ps[c] for ps in per_seed], c, r["deterministic"]) for c in COLUMNS]
        heads = [h for run in r["runs"] for h in run.head_sizes]
        cd = (f"{statistics.fmean(heads):.2f} / {100 * sum(run.differs for run in r['runs']) / len(heads):.1f}%"
              if heads else "")
        print(f"| {name} | {r['settings']} | " + " | ".join(cells) + f" | {cd} |")
    print(f"\nload after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print_article_table(results)
    print(f"\nfirst continuation of prompt 0 ({prompts[0]!r}), seed 0:")
    for name, r in results.items():
        print(f"  {name:>16}: {r['runs'][0].texts[0][:160]!r}")


def print_article_table(results: dict[str, dict]) -> None:
    """The metrics the seed article's way (per-text means; it also counted the prompt, we do not),
    beside its own numbers."""
    print("\nthe seed article's way: each metric per text, mean over texts (mean over seeds); its own rows last\n")
    print("| method | " + " | ".join(ARTICLE_COLUMNS) + " |")
    print("|" + "---|" * (len(ARTICLE_COLUMNS) + 1))
    for name, r in results.items():
        per_seed = [run.per_text() for run in r["runs"]]
        print(f"| {name} | " + " | ".join(fmt([ps[c] for ps in per_seed], c, r["deterministic"]) for c in ARTICLE_COLUMNS)
              + " |")
    for name, values in ARTICLE_RESULTS.items():
        print(f"| {name} | " + " | ".join(f"{values[c]:.3f}" for c in ARTICLE_COLUMNS) + " |")


def plot(results: dict[str, dict], title: str, path: Path) -> bool:
    """Three panels, one bar per method (mean over seeds, std as error bar): 3-gram entropy,
    distinct-2 and the expert's perplexity (the quality side of the trade-off)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, col in zip(axes, ("ent-3", "distinct-2", "expert ppl")):
        values = [[run.metrics()[col] for run in results[n]["runs"]] for n in names]
        means = [statistics.fmean(v) for v in values]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(range(len(names)), means, yerr=errs, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(col + (" (lower: the expert finds the text likelier)" if col == "expert ppl" else ""), fontsize=9)
        ax.set_yscale("log" if col == "expert ppl" else "linear")
        ax.grid(axis="y", ls="--", alpha=0.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods.split(",") if m not in SETTINGS]
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; choose from {list(SETTINGS)}")
    settings = [SETTINGS[m] for m in args.methods.split(",")]
    expert_l, amateur_l = load(args)
    prompts = (ARTICLE_PROMPTS + PROMPT_SETS[args.prompt_set])[:args.prompts]
    print_header(args, expert_l, amateur_l, len(prompts))
    results = collect(args, settings, expert_l.model, amateur_l.model, expert_l.tokenizer, prompts)
    print_table(results, prompts)
    if args.plot and plot(results, f"{args.expert.name} vs amateur {args.amateur.name}: {len(prompts)} prompts "
                                   f"({args.prompt_set} set), {args.max_new_tokens} tokens, {args.seeds} seeds",
                          args.plot):
        print(f"chart: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({name: dict(settings=r["settings"], runs=[
            dict(metrics=run.metrics(), texts=run.texts, seconds=run.seconds) for run in r["runs"]])
            for name, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
