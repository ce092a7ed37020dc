"""Prompt lookup (speculative decoding with no draft model) against plain cached greedy decoding, on
chat prompts whose answers restate their prompt: HumanEval problems (the answer rewrites the function
and its docstring) and edits of a HumanEval solution (the answer copies the code, renamed).

Both ways run minillm.methods.stream on the same model, speed layer (speed.speed_up, as sample.py;
--reference: none) and threads: plain is Method("greedy"), lookup is Method("speculative",
draft_lookup=True) at each --ks. Per prompt, plain and each k run back to back (paired, so load drift
on a shared CPU hits both alike), after one untimed warm-up generation; each stops at the tokenizer's
end-of-sequence token or --max-new-tokens. Time is the whole call (prompt read + decode), tok/s =
new tokens / that time. Printed per prompt and in total: tokens, plain tok/s, per k the lookup's
tok/s, the speedup, the acceptance (accepted / proposed drafts), new tokens per target call, the
share of target calls with no draft (no match), and whether the output is plain greedy's, token for
token.

    python -m bench.prompt_lookup --model /tmp/models/smollm2.safetensors --humaneval 4 --edits 2 --ks 4,8
"""

from __future__ import annotations

import argparse
import time

import torch

from minillm import checkpoint
from minillm.chat import render_chat
from minillm.eval.humaneval import chat_prompt, load_problems
from minillm.methods import Method, stream
from minillm.sampling import SamplingParams
from minillm.speed import speed_up

EDIT = ("Rename the function below to `solution` and give back the whole code, otherwise unchanged, in one "
        "```python code block.\n\n```python\n{code}\n```")


def edit_prompt(problem: dict, tok) -> str:
    """A chat turn asking to copy a HumanEval solution with one change (its answer restates the code)."""
    code = (problem["prompt"] + problem["canonical_solution"]).strip("\n")
    eos = tok.eos_tokens[0] if getattr(tok, "eos_tokens", None) else ""
    return render_chat(tok.chat_template, [{"role": "user", "content": EDIT.format(code=code)}],
                       getattr(tok, "bos_token", None) or "", eos)


def prompts(tok, humaneval: int, edits: int) -> list[tuple[str, list[int]]]:
    """(name, token ids): the first `humaneval` problems' chat prompts, then `edits` edit prompts."""
    problems = load_problems(max(humaneval, edits))
    out = [(p["task_id"], tok.encode(chat_prompt(p, tok))) for p in problems[:humaneval]]
    return out + [(f"edit {p['task_id']}", tok.encode(edit_prompt(p, tok))) for p in problems[:edits]]


def timed(method: Method, model, ids: list[int], n: int, eos: set[int]):
    stats = method.new_stats()
    t0 = time.perf_counter()
    out = list(stream(method, model, ids, n, eos_ids=eos, stats=stats))
    return out, time.perf_counter() - t0, stats


def run(model, tok, cases, ks: list[int], ngram: int, n: int) -> list[dict]:
    greedy = SamplingParams(temperature=0)
    plain = Method("greedy", greedy)
    lookups = {k: Method("speculative", greedy, k=k, draft_lookup=True, lookup_ngram=ngram) for k in ks}
    eos = set(tok.eos_ids)
    timed(plain, model, cases[0][1], min(n, 16), eos)  # warm-up, untimed
    rows = []
    for name, ids in cases:
        want, plain_s, _ = timed(plain, model, ids, n, eos)
        row = {"prompt": name, "prompt_tokens": len(ids), "tokens": len(want), "plain_s": plain_s, "k": {}}
        for k, method in lookups.items():
            got, s, st = timed(method, model, ids, n, eos)
            row["k"][k] = {"s": s, "identical": got == want, "proposed": st.drafts_proposed,
                           "accepted": st.drafts_accepted, "calls": st.calls.get("target", 0),
                           "plain_calls": st.plain_calls}
        rows.append(row)
        print(line(row, ks), flush=True)
    return rows


def line(r: dict, ks: list[int]) -> str:
    """One row of the table: a prompt, or the total (dicts summed)."""
    tps = lambda s: r["tokens"] / s if s else float("nan")
    cells = [f"{r['prompt']:<18}", f"{r['prompt_tokens']:>6}", f"{r['tokens']:>6}", f"{tps(r['plain_s']):>8.1f}"]
    for k in ks:
        c = r["k"][k]
        acc = c["accepted"] / c["proposed"] if c["proposed"] else float("nan")
        cells += [f"{tps(c['s']):>8.1f}", f"{r['plain_s'] / c['s']:>6.2f}x", f"{acc:>6.1%}",
                  f"{r['tokens'] / c['calls']:>6.2f}", f"{c['plain_calls'] / c['calls']:>6.1%}",
                  f"{'yes' if c['identical'] else 'NO':>4}"]
    return " | ".join(cells)


def total(rows: list[dict], ks: list[int]) -> dict:
    keys = ("s", "proposed", "accepted", "calls", "plain_calls")
    return {"prompt": "total", "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "tokens": sum(r["tokens"] for r in rows), "plain_s": sum(r["plain_s"] for r in rows),
            "k": {k: {**{x: sum(r["k"][k][x] for r in rows) for x in keys},
                      "identical": all(r["k"][k]["identical"] for r in rows)} for k in ks}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--humaneval", type=int, default=4, help="HumanEval problems as chat prompts (default 4)")
    ap.add_argument("--edits", type=int, default=2, help="edit prompts, from the first problems' solutions (default 2)")
    ap.add_argument("--ks", default="4,8", help="drafts per target call, comma-separated (default 4,8)")
    ap.add_argument("--ngram", type=int, default=3, help="longest n-gram the lookup matches (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reference", action="store_true", help="no speed layer")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = checkpoint.load_model(args.model)
    if not args.reference:
        speed_up(loaded.model)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"{args.model}: greedy, {torch.get_num_threads()} threads, lookup n <= {args.ngram}, "
          f"at most {args.max_new_tokens} new tokens (EOS stops)")
    head = ["prompt".ljust(18), "prompt", "tokens", "plain/s"]
    for k in ks:
        head += [f"k={k} /s", "speedup", "accept", "tok/call", "no draft", "same"]
    print(" | ".join(head))
    rows = run(loaded.model, loaded.tokenizer, prompts(loaded.tokenizer, args.humaneval, args.edits), ks,
               args.ngram, args.max_new_tokens)
    print(line(total(rows, ks), ks))


if __name__ == "__main__":
    main()
