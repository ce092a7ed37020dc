"""Run saved HumanEval answers again, under the harness as it is now: pass@1 before and after.

Generating answers is the slow part of HumanEval (minutes to hours on a CPU); running them is
seconds. When the rules that turn an answer into a program change (minillm.eval.humaneval:
extract_code, definitions, build_program) or the sandbox limits do, this re-runs the answers a
JSON file holds, without the model, and says which problems changed.

Reads the JSON of `python -m minillm.eval humaneval ... --json FILE` (every model in it, the first
sample of each problem: greedy runs) or of `bench/humaneval_hf.py --json FILE` (transformers).

    python bench/humaneval_rescore.py ours.json hf.json --allow-code-execution
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from minillm.eval import humaneval as he
from minillm.eval.sandbox import MEMORY_MB, TIMEOUT_S, Limits
from minillm.flags import Parser, add_input, fail


def saved_runs(path: str) -> dict[str, dict[str, tuple[str, bool]]]:
    """label -> {task id: (answer, passed then)} for every run the file holds; a file of another shape,
    an empty sample list or an answer that is not text (lone surrogates) is a ValueError naming it."""
    try:
        problems = json.loads(Path(path).read_text(encoding="utf-8"))["problems"]
        if all(isinstance(v, list) for v in problems.values()):  # ours: model -> [{task_id, samples}]
            runs = {f"{Path(path).name}: {model}": {p["task_id"]: (p["samples"][0]["answer"], p["passed"] > 0)
                                                     for p in rows} for model, rows in problems.items()}
        else:
            runs = {f"{Path(path).name}: transformers": {t: (p["answer"], p["status"] == "passed")
                                                          for t, p in problems.items()}}
    except (KeyError, IndexError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not the JSON of a HumanEval run ({type(e).__name__}: {e})") from None
    for label, answers in runs.items():
        for task, (answer, _) in answers.items():
            if not isinstance(answer, str) or not _encodable(answer):
                raise ValueError(f"{path}: the answer to {task} ({label}) is not UTF-8 text")
    return runs


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n")[0])
    add_input(ap, "files", nargs="+", metavar="FILE.json")
    ap.add_argument("--prompting", choices=["chat", "base"], default="chat")
    ap.add_argument("--timeout", type=TIMEOUT_S, default=10.0, help="seconds per program (default 10)")
    ap.add_argument("--memory-mb", type=MEMORY_MB, default=1024, help="MiB per program (default 1024)")
    ap.add_argument("--allow-code-execution", action="store_true")
    args = ap.parse_args(argv)
    if not args.allow_code_execution:
        return fail(he.EXECUTION_REFUSED)
    try:
        runs = [run for path in args.files for run in saved_runs(path).items()]
        for _, answers in runs:
            he.load_problems(task_ids=list(answers))  # unknown task ids: an error before any program runs
    except (ValueError, OSError) as e:
        return fail(str(e))
    print("| run | problems | pass@1 % then | pass@1 % now | now passing | now failing |")
    print("|---|---|---|---|---|---|")
    for label, answers in runs:
        problems = he.load_problems(task_ids=list(answers))
        report = he.evaluate(problems, lambda p, i: answers[p["task_id"]][0], 1, args.prompting, (1,),
                             Limits(timeout_s=args.timeout, memory_mb=args.memory_mb), allow_code_execution=True)
        now = {r["task_id"]: r["passed"] > 0 for r in report.problems}
        then = {t: a[1] for t, a in answers.items()}
        gained = [t for t in now if now[t] and not then[t]]
        lost = [t for t in now if then[t] and not now[t]]
        print(f"| {label} | {len(now)} | {100 * sum(then.values()) / len(now):.1f} | "
              f"{100 * sum(now.values()) / len(now):.1f} | {', '.join(gained) or '-'} | {', '.join(lost) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
