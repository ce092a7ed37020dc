"""python -m minillm.eval: perplexity, generation metrics and HumanEval for any minillm checkpoint.

    python -m minillm.eval ppl --model A.safetensors --model B.safetensors            # tinyshakespeare val
    python -m minillm.eval ppl --model M --data FILE.txt --context 256 --stride 128 --json ppl.json
    python -m minillm.eval make-tasks --out shakespeare.jsonl                          # the ready task, 50 passages
    python -m minillm.eval generate-metrics --model M --tasks shakespeare.jsonl --method greedy
    python -m minillm.eval generate-metrics --model M --tasks tinyshakespeare --top-p 0.9 --limit 10
    python -m minillm.eval humaneval --model M --allow-code-execution --limit 20       # greedy pass@1
    python -m minillm.eval humaneval --model M --allow-code-execution --batch-size 16  # 16 problems at a time
    python -m minillm.eval humaneval --model M --allow-code-execution --method sample --temperature 0.8 \\
        --samples 10 --pass-k 1,5,10

Several --model paths give one row each, scored on the same text / tasks / problems. Every command
prints a table and, with --json FILE, writes the numbers (and the per-task / per-problem details).
The library behind each command: minillm.eval.perplexity, .generation and .text_metrics, .humaneval
and .sandbox.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, fields

import torch

from ..checkpoint import load_model
from ..cli import add_batch_invariant, add_decoding_args, check_batch_invariant, method_from_args, partner_path, unescape
from ..data import read_text, resolve_text_path
from ..device import pick_device
from ..flags import Parser, add_input, add_output, add_threads, fail, integer, progress_bar
from ..methods import load_partner
from ..sampling import SamplingParams
from ..speed import batch_invariant, speed_layer
from . import humaneval as he
from .generation import read_tasks, run_tasks, shakespeare_tasks, write_tasks
from .perplexity import eval_text, perplexity, window_spans
from .report import table, write_json
from .sandbox import MEMORY_MB, TIMEOUT_S, Limits, isolation
from .text_metrics import generation_metrics

READY_TASKS = "tinyshakespeare"  # --tasks NAME: the ready task, built from the data file


def _common(p: argparse.ArgumentParser, several: bool = True) -> None:
    add_input(p, "--model", action="append", required=True, metavar="PATH",
                   help="a minillm checkpoint" + (" (repeat to compare several: one row each)" if several else ""))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: as stored")
    add_output(p, "--json", default=None, metavar="FILE", help="also write the results as JSON (checked before the run)")
    add_threads(p)


def _generation_flags(p: argparse.ArgumentParser, method: str = "sample") -> None:
    add_decoding_args(p, method)
    p.add_argument("--max-new-tokens", type=integer(1), default=None, metavar="N",
                   help="tokens per answer (default: generate-metrics as many as the reference has, humaneval 512)")
    p.add_argument("--limit", type=integer(1), default=None, metavar="N", help="only the first N tasks / problems")
    p.add_argument("--reference", action="store_true", help="model.py as written, without the speed layer")
    add_batch_invariant(p)


def make_parser() -> Parser:
    ap = Parser(prog="python -m minillm.eval", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ppl", help="perplexity and bits per byte, strided sliding windows")
    _common(p)
    add_input(p, "--data", default=None, metavar="FILE", help="UTF-8 text (default: tinyshakespeare)")
    p.add_argument("--split", choices=["all", "train", "val"], default=None,
                   help="which characters of the text: the last 10%% (val), the rest (train) or all "
                        "(default: val for tinyshakespeare, all for --data)")
    p.add_argument("--max-chars", type=integer(1), default=None, metavar="N", help="only the first N characters of the split")
    p.add_argument("--context", type=integer(2), default=None, metavar="N",
                   help="tokens per window (default: the model's block_size, at most 1024)")
    p.add_argument("--stride", type=integer(1), default=None, metavar="S", help="a window every S tokens (default context/2)")
    p.add_argument("--batch-size", type=integer(1), default=None, metavar="B", help="windows per forward (default: auto)")
    p = sub.add_parser("make-tasks", help="write the ready generation task (tinyshakespeare val) as JSONL")
    add_output(p, "--out", required=True, metavar="FILE.jsonl")
    add_input(p, "--data", default=None, metavar="FILE", help="default: tinyshakespeare")
    p.add_argument("--n", type=integer(1), default=50, help="number of tasks (default 50)")
    p.add_argument("--prompt-chars", type=integer(1), default=200, help="characters of each prompt (default 200)")
    p.add_argument("--reference-chars", type=integer(1), default=200, help="characters of each reference (default 200)")
    p = sub.add_parser("generate-metrics", help="generate for each task; BLEU, chrF, ROUGE, diversity")
    _common(p)
    add_input(p, "--tasks", required=True, metavar="FILE.jsonl",
              help=f"JSONL of {{prompt, reference}} (or {READY_TASKS!r}: the ready task, built on the fly)")
    _generation_flags(p)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--sliding-window", action=argparse.BooleanOptionalAction, default=True,
                   help="sample/greedy: past the context, re-read its last half and go on (default on)")
    p = sub.add_parser("humaneval", help="HumanEval pass@k (runs model-written code: see --allow-code-execution)")
    _common(p)
    _generation_flags(p, method="greedy")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="required: run the code the model writes (sandboxed; see the README)")
    p.add_argument("--prompting", choices=["auto", "chat", "base"], default="auto",
                   help="chat template and code block, or the raw prompt (default auto: chat if the checkpoint has one)")
    p.add_argument("--samples", type=integer(1), default=1, metavar="N", help="answers per problem (default 1)")
    p.add_argument("--pass-k", default="1", metavar="K,K",
                   help="comma-separated k of pass@k, each <= --samples (default 1)")
    p.add_argument("--task-ids", default=None, help="comma-separated, e.g. HumanEval/0,HumanEval/5")
    p.add_argument("--timeout", type=TIMEOUT_S, default=10.0,
                   help=f"wall-clock seconds per program, at most {TIMEOUT_S.high:g} (default 10)")
    p.add_argument("--memory-mb", type=MEMORY_MB, default=1024,
                   help=f"memory per program in MiB, {MEMORY_MB.low} to {MEMORY_MB.high} (default 1024; see README)")
    p.add_argument("--batch-size", type=integer(1), default=1, metavar="B",
                   help="greedy/sample: decode B problems at a time, grouped by prompt length (default 1)")
    return ap


def _load(path: str, args, device):
    dtype = getattr(torch, args.dtype) if args.dtype else None
    loaded = load_model(path, device, dtype)
    if not getattr(args, "reference", True):
        speed_layer(loaded.model)
    return loaded


def _load_pair(path: str, args, method, device):
    """The model and, for speculative / contrastive decoding, its draft / amateur (same tokenizer); the
    model in the speed layer's exact mode with --batch-invariant."""
    check_batch_invariant(args)
    loaded = _load(path, args, device)
    if args.batch_invariant:
        batch_invariant(loaded.model, args.batch_invariant)
    if method.partner is None:
        return loaded, None
    partner = load_partner(partner_path(args), method.partner, loaded, device,
                           getattr(torch, args.dtype) if args.dtype else None)
    if not args.reference:
        speed_layer(partner.model)
    return loaded, partner


def method_label(method) -> str:
    """The method and the settings that differ from the defaults, e.g. "sample T=0.8 top_p=0.9"."""
    p, default = method.params, SamplingParams()
    parts = [method.name] + ([f"T={p.temperature:g}"] if method.name != "greedy" else [])
    parts += [f"{f.name}={getattr(p, f.name):g}" for f in fields(p)
              if f.name not in ("temperature", "min_tokens_to_keep") and getattr(p, f.name) != getattr(default, f.name)]
    if method.name == "speculative":
        parts.append(f"k={method.k}" + ("+adaptive" if method.adaptive_k else ""))
        parts += [f"lookup n<={method.lookup_ngram}"] if method.draft_lookup else []
    if method.name == "contrastive":
        parts.append(f"{method.objective} alpha={method.alpha:g} beta={method.beta:g}")
    return " ".join(parts)


def _finish(rows: list[dict], columns, args, payload: dict) -> None:
    print(table(rows, columns))
    if args.json:
        print(f"wrote {write_json(payload, args.json)}", file=sys.stderr)


# ----------------------------------------------------------------------------- ppl

PPL_COLUMNS = [("model", "model", ""), ("tokenizer", "tokenizer", ""), ("context", "context", "{}"),
               ("stride", "stride", "{}"), ("windows", "windows", "{}"), ("tokens", "tokens", "{:,}"),
               ("bytes", "bytes", "{:,}"), ("ppl", "ppl", "{:.4f}"), ("nll_per_token", "nll/token", "{:.4f}"),
               ("bits_per_byte", "bits/byte", "{:.4f}"), ("seconds", "s", "{:.1f}")]


def cmd_ppl(args, device) -> None:
    path = resolve_text_path(args.data)
    split = args.split or ("all" if args.data else "val")
    text = eval_text(read_text(path), split, args.max_chars)
    print(f"text: {path} ({split}, {len(text):,} characters)", file=sys.stderr)
    rows = []
    for model_path in args.model:
        loaded = _load(model_path, args, device)
        block = loaded.config.block_size
        context, stride = min(args.context or 1024, block), args.stride
        if args.context and args.context > block:  # one command line for models of different contexts
            stride = min(stride or context // 2, context)
            print(f"note: {model_path}'s context is {block} tokens: windows of {block}, stride {stride}", file=sys.stderr)
        stride = stride or max(1, context // 2)
        ids = loaded.tokenizer.encode(text)
        t0 = time.perf_counter()
        with progress_bar(len(window_spans(len(ids), context, stride)), f"ppl {model_path}") as bar:
            result = perplexity(loaded.model, ids, loaded.tokenizer, context, stride, args.batch_size, bar.update)
        rows.append({"model": model_path, "tokenizer": f"{loaded.tokenizer.kind} {loaded.tokenizer.vocab_size}",
                     **result.to_dict(), "seconds": time.perf_counter() - t0})
        del loaded
    _finish(rows, PPL_COLUMNS, args, {"text": str(path), "split": split, "characters": len(text), "results": rows})


# ----------------------------------------------------------------------------- generation tasks

def cmd_make_tasks(args) -> None:
    tasks = shakespeare_tasks(read_text(resolve_text_path(args.data)), args.n, args.prompt_chars, args.reference_chars)
    print(f"wrote {write_tasks(tasks, args.out)}: {len(tasks)} tasks")


GEN_COLUMNS = [("model", "model", ""), ("method", "method", ""), ("tasks", "tasks", "{}"), ("bleu", "BLEU", "{:.2f}"),
               ("chrf", "chrF", "{:.2f}"), ("rouge1", "R-1", "{:.2f}"), ("rouge2", "R-2", "{:.2f}"),
               ("rougeL", "R-L", "{:.2f}"), ("entropy1", "ent-1", "{:.2f}"), ("entropy2", "ent-2", "{:.2f}"),
               ("entropy3", "ent-3", "{:.2f}"), ("distinct1", "dist-1", "{:.3f}"), ("distinct2", "dist-2", "{:.3f}"),
               ("rep2", "rep-2%", "{:.1f}"), ("rep4", "rep-4%", "{:.1f}"), ("tokens_per_s", "tok/s", "{:.1f}")]


def _load_tasks(args) -> list[dict]:
    if args.tasks == READY_TASKS:
        tasks = shakespeare_tasks(read_text(resolve_text_path()))
    else:
        tasks = read_tasks(args.tasks)
    return tasks[:args.limit] if args.limit is not None else tasks


def cmd_generate(args, device) -> None:
    method = method_from_args(args, args.sliding_window)
    tasks, stops = _load_tasks(args), [unescape(s) for s in args.stop]
    refs = [t["reference"] for t in tasks]
    rows = [{"model": "(references)", "tasks": len(tasks), **generation_metrics(refs)}]
    outputs = {}
    for model_path in args.model:
        loaded, partner = _load_pair(model_path, args, method, device)
        with progress_bar(len(tasks), f"generate {model_path}") as bar:
            out = run_tasks(loaded, tasks, method, partner, args.max_new_tokens, args.seed, stops, bar.update)
        seconds, new = sum(o["seconds"] for o in out), sum(o["new_tokens"] for o in out)
        rows.append({"model": model_path, "method": method_label(method), "tasks": len(tasks),
                     **generation_metrics([o["text"] for o in out], refs), "tokens_per_s": new / seconds})
        outputs[model_path] = out
    _finish(rows, GEN_COLUMNS, args, {"tasks": args.tasks, "method": {"name": method.name, **asdict(method.params)},
                                      "results": rows, "outputs": outputs})


# ----------------------------------------------------------------------------- HumanEval

def _ks(args) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in args.pass_k.split(","))
    except ValueError:
        raise ValueError(f"--pass-k must be comma-separated integers, got {args.pass_k!r}") from None
    bad = [k for k in ks if not 1 <= k <= args.samples]
    if bad:
        raise ValueError(f"--pass-k {bad[0]} needs 1 <= k <= --samples ({args.samples}): sample more answers per problem")
    return ks


def cmd_humaneval(args, device) -> None:
    if not args.allow_code_execution:
        raise PermissionError(he.EXECUTION_REFUSED)
    method, ks = method_from_args(args), _ks(args)
    if args.samples > 1 and method.params.greedy:
        raise ValueError(f"--samples {args.samples} with {method_label(method)} decoding gives {args.samples} identical "
                         "answers: sample them (--method sample --temperature T) or use --samples 1")
    problems = he.load_problems(args.limit, args.task_ids.split(",") if args.task_ids else None)
    limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    print(f"sandbox: {isolation().describe()}", file=sys.stderr)
    rows, details = [], {}
    for model_path in args.model:
        loaded, partner = _load_pair(model_path, args, method, device)
        mode = args.prompting if args.prompting != "auto" else "chat" if loaded.tokenizer.chat_template else "base"
        new_tokens = args.max_new_tokens if args.max_new_tokens is not None else 512
        complete = he.ModelCompleter(loaded, method, mode, new_tokens, partner, args.seed, args.batch_size)
        complete.expect(problems)
        with progress_bar(len(problems), f"humaneval {model_path}") as bar:
            report = he.evaluate(problems, complete, args.samples, mode, ks, limits, True, bar.update)
        del loaded, partner, complete
        rows.append({"model": model_path, "prompting": mode, "method": method_label(method),
                     "problems": len(problems), "samples": args.samples,
                     **{f"pass@{k}": 100 * v for k, v in report.pass_at.items()}, **report.counts(),
                     "generate_s": report.seconds["generate"], "execute_s": report.seconds["execute"]})
        details[model_path] = report.problems
    columns = [("model", "model", ""), ("prompting", "prompting", ""), ("method", "method", ""),
               ("problems", "problems", "{}"), ("samples", "n", "{}")] + \
        [(f"pass@{k}", f"pass@{k} %", "{:.1f}") for k in ks] + \
        [(s, s, "{}") for s in ("passed", "failed", "timeout", "error")] + \
        [("generate_s", "generate s", "{:.0f}"), ("execute_s", "execute s", "{:.0f}")]
    _finish(rows, columns, args, {"sandbox": isolation().describe(), "results": rows, "problems": details})


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.command == "make-tasks":
            cmd_make_tasks(args)
            return 0
        device = pick_device(args.device)
        {"ppl": cmd_ppl, "generate-metrics": cmd_generate, "humaneval": cmd_humaneval}[args.command](args, device)
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError, PermissionError, FileNotFoundError, ...
        return fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
