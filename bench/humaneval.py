"""HumanEval against transformers on the same GGUF (`hf`), and saved answers scored again (`rescore`).

`hf`: the parity reference for our humaneval results. transformers loads the GGUF file
(AutoModelForCausalLM.from_pretrained(dir, gguf_file=name), float32, offline) and answers the
HumanEval problems greedily, with the prompt ids, stopping rule and answer text of our `python -m
minillm.eval humaneval` (chat prompting): the prompt is our checkpoint's chat template
(he.chat_prompt) encoded by our tokenizer; a row ends at one of our tokenizer's EOS ids (not part of
the answer) or at the first token after which he.has_complete_block(answer, entry point) holds (that
token included); the answer is the new ids decoded by our tokenizer. The programs then run through
he.evaluate in our sandbox, by our rules, so pass@1 is computed exactly as ours is. Our model is a
from-scratch implementation of the same network: identical greedy answers mean identical pass@1, so
a pass@1 that differs from ours is explained answer by answer: the table counts, for each --ours
run, the problems whose answer text is identical to transformers' and those that only one of the two
solved. (Batched greedy decoding may flip a near tie on either side: a few different answers are
float rounding, many are a bug.) Batching as ours (ModelCompleter.expect): the problems sorted by
prompt length, B at a time, left padding with an attention mask (pad id = an EOS id); a batch runs
until each of its rows has ended. tok/s = answer tokens / generate seconds (for --ours runs: their
answers re-encoded by our tokenizer, over the generate seconds their JSON reports). Without
--task-ids the problems are exactly those of the --ours files (all 164 without --ours either).

`rescore`: generating answers is the slow part of HumanEval (minutes to hours on a CPU); running
them is seconds. When the rules that turn an answer into a program change (minillm.eval.humaneval:
extract_code, definitions, build_program) or the sandbox limits do, this re-runs the answers JSON
files hold, without the model, and says which problems changed: pass@1 before and after. It reads
the JSON of `python -m minillm.eval humaneval ... --json FILE` (every model in it, the first sample
of each problem: greedy runs) or of `hf --json FILE` (transformers).

    python -m minillm.eval humaneval --model weights/qwen2.5-coder-0.5b.safetensors --allow-code-execution \\
        --batch-size 8 --json ours.json
    python -m bench.humaneval hf --gguf ~/.cache/minillm/models/qwen2.5-coder-0.5b.gguf \\
        --model weights/qwen2.5-coder-0.5b.safetensors --ours ours.json --allow-code-execution --json hf.json
    python -m bench.humaneval hf --gguf ... --model ... --task-ids HumanEval/0,HumanEval/2 --allow-code-execution
    python -m bench.humaneval rescore ours.json hf.json --allow-code-execution
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GGUF is a local file: never reach for the hub

import torch
from tqdm import tqdm

from minillm.checkpoint import read_metadata
from minillm.eval import humaneval as he
from minillm.eval.report import table, write_json
from minillm.eval.sandbox import MEMORY_MB, TIMEOUT_S, Limits, isolation
from minillm.flags import Parser, add_input, add_output, fail
from minillm.tokenizer import tokenizer_from_dict

# ----------------------------------------------------------------------------- hf

HF = "transformers"


def load_tokenizer(path: str):
    """Our checkpoint's tokenizer (with its chat template and EOS ids), without loading the weights."""
    meta = read_metadata(path)
    if "tokenizer" not in meta:
        raise ValueError(f"{path}: not a minillm checkpoint (its metadata has no tokenizer)")
    return tokenizer_from_dict(json.loads(meta["tokenizer"]))


def load_hf_model(gguf: Path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def read_ours(files: list[str]) -> list[dict]:
    """One run per (file, model) of the --ours JSON files: label, problems by task id, results row."""
    runs = []
    for file in files:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
        rows = {r["model"]: r for r in data.get("results", [])}
        for model_path, problems in data["problems"].items():
            row = rows.get(model_path, {})
            if row.get("method", "greedy") != "greedy" or row.get("prompting", "chat") != "chat":
                print(f"warning: {file}: {model_path} ran {row.get('method')} / {row.get('prompting')} prompting; "
                      f"this reference is greedy with chat prompting", file=sys.stderr)
            runs.append({"label": f"{Path(file).name}: {model_path}", "file": file, "sandbox": data.get("sandbox"),
                         "row": row, "problems": {p["task_id"]: p for p in problems}})
    return runs


def pick_problems(task_ids: str | None, runs: list[dict]) -> list[dict]:
    """--task-ids, else every task id of the --ours runs, else all 164; in HumanEval's order."""
    if task_ids:
        return he.load_problems(task_ids=task_ids.split(","))
    problems = he.load_problems()
    if not runs:
        return problems
    wanted = set().union(*(r["problems"] for r in runs))
    return [p for p in problems if p["task_id"] in wanted]


class BlockComplete:
    """StoppingCriteria: a row is done once its new text holds a closed block defining its entry point."""

    def __init__(self, tokenizer, prompt_len: int, entry_points: list[str]):
        self.tok, self.prompt_len, self.entry_points = tokenizer, prompt_len, entry_points
        self.done = [False] * len(entry_points)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        for b, entry in enumerate(self.entry_points):
            if not self.done[b]:
                text = self.tok.decode(input_ids[b, self.prompt_len:].tolist())
                self.done[b] = he.has_complete_block(text, entry)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def cut_answer(tokenizer, new_ids: list[int], entry_point: str) -> dict:
    """The answer as our ModelCompleter ends it: before the first EOS id, or with the token after which
    the text first holds a complete block (tokens a batch made for the row after that are dropped)."""
    kept = []
    for token in new_ids:
        if token in tokenizer.eos_ids:
            return {"answer": tokenizer.decode(kept), "new_tokens": len(kept), "stopped_by": "eos"}
        kept.append(token)
        text = tokenizer.decode(kept)
        if he.has_complete_block(text, entry_point):
            return {"answer": text, "new_tokens": len(kept), "stopped_by": "block"}
    return {"answer": tokenizer.decode(kept), "new_tokens": len(kept), "stopped_by": "max_new_tokens"}


@torch.inference_mode()
def generate_batch(model, tokenizer, group: list[dict], ids: dict[str, list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy answers for a group of problems, side by side: left padding, pad id = an EOS id."""
    from transformers import GenerationConfig, StoppingCriteriaList
    prompts = [ids[p["task_id"]] for p in group]
    longest, pad = max(len(p) for p in prompts), tokenizer.eos_id
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=sorted(tokenizer.eos_ids))
    stop = BlockComplete(tokenizer, longest, [p["entry_point"] for p in group])
    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                         stopping_criteria=StoppingCriteriaList([stop]))
    return [cut_answer(tokenizer, out[b, longest:].tolist(), p["entry_point"]) for b, p in enumerate(group)]


def generate_all(model, tokenizer, problems: list[dict], batch_size: int, max_new_tokens: int) -> tuple[dict, float]:
    """task id -> {answer, new_tokens, stopped_by}, batch_size problems at a time grouped by prompt
    length (as ModelCompleter.expect); and the seconds it took."""
    ids = {p["task_id"]: tokenizer.encode(he.chat_prompt(p, tokenizer)) for p in problems}
    ordered = sorted(problems, key=lambda p: len(ids[p["task_id"]]))
    answers, t0 = {}, time.perf_counter()
    with tqdm(total=len(problems), desc="generate (transformers)", unit="", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for i in range(0, len(ordered), batch_size):
            group = ordered[i:i + batch_size]
            for p, a in zip(group, generate_batch(model, tokenizer, group, ids, max_new_tokens)):
                answers[p["task_id"]] = {**a, "prompt_tokens": len(ids[p["task_id"]])}
            bar.update(len(group))
    return answers, time.perf_counter() - t0


def run_programs(problems: list[dict], answers: dict[str, str], args, prompting: str = "chat") -> he.HumanEvalReport:
    """Precomputed answers (task id -> text) through he.evaluate: our sandbox, our program, our pass@1."""
    limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    with tqdm(total=len(problems), desc="execute", unit="", file=sys.stderr, dynamic_ncols=True) as bar:
        return he.evaluate(problems, lambda p, i: answers[p["task_id"]], 1, prompting, (1,), limits,
                           allow_code_execution=True, progress=bar.update)


def compare(hf: dict[str, dict], run: dict, tokenizer) -> dict:
    """One --ours run against transformers, over the problems both answered (their first sample)."""
    common = [t for t in hf if t in run["problems"]]
    first = {t: run["problems"][t]["samples"][0] for t in common}
    ours_ok = {t: first[t]["status"] == "passed" for t in common}
    hf_ok = {t: hf[t]["status"] == "passed" for t in common}
    own = [p["samples"][0]["answer"] for p in run["problems"].values()]
    seconds = run["row"].get("generate_s")
    return {"run": run["label"], "problems": len(common),
            "pass@1": 100 * sum(ours_ok.values()) / len(common) if common else None,
            "passed": sum(ours_ok.values()), "generate_s": seconds,
            "tokens_per_s": sum(len(tokenizer.encode(a)) for a in own) / seconds if seconds else None,
            "same_answer": sum(first[t]["answer"] == hf[t]["answer"] for t in common),
            "both_passed": sum(ours_ok[t] and hf_ok[t] for t in common),
            "only_ours": sum(ours_ok[t] and not hf_ok[t] for t in common),
            "only_hf": sum(hf_ok[t] and not ours_ok[t] for t in common),
            "differing": [t for t in common if first[t]["answer"] != hf[t]["answer"]]}


COLUMNS = [("run", "run", ""), ("problems", "problems", "{}"), ("pass@1", "pass@1 %", "{:.1f}"),
           ("passed", "passed", "{}"), ("generate_s", "generate s", "{:.0f}"), ("tokens_per_s", "tok/s", "{:.1f}"),
           ("same_answer", "same answer", "{}"), ("both_passed", "both passed", "{}"),
           ("only_ours", "only this", "{}"), ("only_hf", "only transformers", "{}")]


def reference(args) -> dict:
    """Generate with transformers, run the programs, compare: everything the table and the JSON hold."""
    runs = read_ours(args.ours)
    problems = pick_problems(args.task_ids, runs)
    tokenizer = load_tokenizer(args.model)
    sandbox = isolation().describe()
    print(f"sandbox: {sandbox}", file=sys.stderr)
    for run in runs:
        if run["sandbox"] and run["sandbox"] != sandbox:
            print(f"warning: {run['file']} ran in another sandbox: {run['sandbox']}", file=sys.stderr)
    model = load_hf_model(Path(args.gguf).expanduser())
    answers, seconds = generate_all(model, tokenizer, problems, args.batch_size, args.max_new_tokens)
    report = run_programs(problems, {t: a["answer"] for t, a in answers.items()}, args)
    hf = {row["task_id"]: {**answers[row["task_id"]], **row["samples"][0]} for row in report.problems}
    tokens = sum(a["new_tokens"] for a in answers.values())
    rows = [{"run": HF, "problems": len(problems), "pass@1": 100 * report.pass_at[1],
             "passed": sum(r["passed"] for r in report.problems), "generate_s": seconds,
             "tokens_per_s": tokens / seconds}]
    rows += [compare(hf, run, tokenizer) for run in runs]
    return {"gguf": args.gguf, "model": args.model, "sandbox": sandbox, "transformers_version": _hf_version(),
            "settings": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                         "threads": torch.get_num_threads(), "timeout": args.timeout, "memory_mb": args.memory_mb},
            "results": rows, "problems": hf}


def _hf_version() -> str:
    import transformers
    return transformers.__version__


def reference_table(args) -> int:
    if not args.ours and not args.task_ids:
        print("note: no --ours and no --task-ids: all 164 problems", file=sys.stderr)
    payload = reference(args)
    print(table(payload["results"], COLUMNS))
    for row in payload["results"][1:]:
        if row["differing"]:
            print(f"{row['run']}: answers differ on {', '.join(row['differing'])}")
    if args.json:
        print(f"wrote {write_json(payload, args.json)}", file=sys.stderr)
    return 0

# ----------------------------------------------------------------------------- rescore

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


def rescore(args) -> int:
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
        report = run_programs(problems, {t: a[0] for t, a in answers.items()}, args, args.prompting)
        now = {r["task_id"]: r["passed"] > 0 for r in report.problems}
        then = {t: a[1] for t, a in answers.items()}
        gained = [t for t in now if now[t] and not then[t]]
        lost = [t for t in now if then[t] and not now[t]]
        print(f"| {label} | {len(now)} | {100 * sum(then.values()) / len(now):.1f} | "
              f"{100 * sum(now.values()) / len(now):.1f} | {', '.join(gained) or '-'} | {', '.join(lost) or '-'} |")
    return 0


def parser() -> Parser:
    ap = Parser(prog="python -m bench.humaneval", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hf", help="transformers' greedy answers on the same GGUF, compared answer by answer with ours")
    add_input(h, "--gguf", required=True, metavar="PATH", help="the GGUF file transformers loads")
    add_input(h, "--model", required=True, metavar="PATH",
              help="our checkpoint converted from that GGUF: its tokenizer and chat template make the prompt")
    add_input(h, "--ours", action="append", default=[], metavar="FILE.json",
              help="JSON of `python -m minillm.eval humaneval ... --json FILE` to compare with (repeatable)")
    h.add_argument("--task-ids", default=None, help="comma-separated (default: those of the --ours files)")
    h.add_argument("--batch-size", type=int, default=8, metavar="B")
    h.add_argument("--max-new-tokens", type=int, default=512, metavar="N")
    h.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_output(h, "--json", default=None, metavar="OUT", help="write the table, settings and answers as JSON")
    r = sub.add_parser("rescore", help="saved answers run again under the current harness, without the model")
    add_input(r, "files", nargs="+", metavar="FILE.json")
    r.add_argument("--prompting", choices=["chat", "base"], default="chat")
    for p in (h, r):
        p.add_argument("--timeout", type=TIMEOUT_S, default=10.0, help="seconds per program (default 10, as ours)")
        p.add_argument("--memory-mb", type=MEMORY_MB, default=1024, help="MiB per program (default 1024, as ours)")
        p.add_argument("--allow-code-execution", action="store_true",
                       help="required: run the code the model wrote (sandboxed, as our humaneval command)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.allow_code_execution:
        return fail(he.EXECUTION_REFUSED)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return reference_table(args) if args.command == "hf" else rescore(args)


if __name__ == "__main__":
    sys.exit(main())
