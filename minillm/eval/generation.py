"""Generation tasks: prompts with reference continuations, continued by any decoding method, scored.

    read_tasks(path) / write_tasks(tasks, path)  JSONL, one {"id", "prompt", "reference", ...} per line
    shakespeare_tasks(text, n)                   the ready task (below)
    continue_text(loaded, method, prompt, ...)   one prompt -> the new text, by any method (methods.stream)
    run_tasks(loaded, tasks, method, ...)        every task continued -> one record per task

The ready task: n passages of tinyshakespeare's validation split (its last 10% of characters,
perplexity.eval_text), at evenly spaced offsets, each moved forward to the start of a speech (after
a blank line); prompt = the passage's first 200 characters, reference = the next 200. A model never
trained on the validation split has to continue a scene it has not seen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from ..checkpoint import Loaded, atomic_write
from ..generate import Stats, decode_stream, make_generator
from ..methods import Method, stream
from .perplexity import eval_text

SPEECH = "\n\n"  # tinyshakespeare puts a blank line before every speech ("NAME:\n...")


def shakespeare_tasks(text: str, n: int = 50, prompt_chars: int = 200, reference_chars: int = 200) -> list[dict]:
    """n tasks from the validation split of `text` (tinyshakespeare), deterministic (module docstring)."""
    val = eval_text(text, "val")
    offset = len(text) - len(val)  # where the split starts in the whole text
    need = prompt_chars + reference_chars
    if n < 1 or len(val) < n * need:
        raise ValueError(f"cannot cut {n} tasks of {need} characters from a validation split of {len(val)}")
    tasks, start = [], -1
    for i in range(n):
        at = val.find(SPEECH, max(i * (len(val) - need) // n, start + 1))
        start = at + len(SPEECH)
        if at < 0 or start + need > len(val):
            raise ValueError(f"only {i} speech starts with {need} characters after them; ask for fewer tasks")
        tasks.append({"id": f"tinyshakespeare-val-{i:03d}", "offset": offset + start,
                      "prompt": val[start:start + prompt_chars],
                      "reference": val[start + prompt_chars:start + need]})
    return tasks


def write_tasks(tasks: list[dict], path: str | Path) -> Path:
    lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks)
    return atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def read_tasks(path: str | Path) -> list[dict]:
    """The tasks of a JSONL file; each line an object with string fields "prompt" and "reference"."""
    tasks = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e})") from None
        if not isinstance(task, dict) or not all(isinstance(task.get(k), str) for k in ("prompt", "reference")):
            raise ValueError(f"{path}:{i}: a task needs string fields \"prompt\" and \"reference\"")
        task.setdefault("id", f"{Path(path).stem}-{i}")
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def continue_text(loaded: Loaded, method: Method, prompt: str | list[int], max_new_tokens: int, partner=None,
                  generator=None, stop: Sequence[str] = (), stats: Stats | None = None,
                  until: Callable[[str], bool] | None = None) -> str:
    """The new text after `prompt` (text, or token ids), by `method`: up to max_new_tokens tokens,
    ended early by the tokenizer's end-of-sequence ids, a `stop` string (cut off), or once until(text)
    is true for the text so far."""
    tok = loaded.tokenizer
    prompt_ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    tokens = stream(method, loaded.model, prompt_ids, max_new_tokens, partner and partner.model, generator,
                    set(tok.eos_ids), stats)
    pieces = decode_stream(tok, tokens, stop, stats)
    text = ""
    for piece in pieces:
        text += piece
        if until is not None and until(text):
            pieces.close()
            tokens.close()  # ends the decoding loop now
            break
    return text


def fit_context(loaded: Loaded, method: Method, prompt_ids: list[int], wanted: int,
                partner=None) -> tuple[list[int], int]:
    """(prompt ids, new tokens) for a run: as given for a method with a sliding window; for one without
    (speculative, contrastive, or --no-sliding-window), at most the (smaller) context of new tokens,
    and the prompt cut from the left so that prompt + new tokens fit that context."""
    if method.name in ("sample", "greedy") and method.sliding_window:
        return prompt_ids, wanted
    context = min(m.config.block_size for m in (loaded, partner) if m is not None)
    new = min(wanted, context)
    return prompt_ids[-(context - new + 1):], new  # the last new token is never fed back


def run_tasks(loaded: Loaded, tasks: list[dict], method: Method, partner=None, max_new_tokens: int | None = None,
              seed: int = 1337, stop: Sequence[str] = (),
              progress: Callable[[int], None] | None = None) -> list[dict]:
    """Continue every task's prompt; task i draws from a generator seeded seed + i. max_new_tokens
    None: as many tokens as the task's reference has under this model's tokenizer (so models with
    different tokenizers write about as much text). A prompt too long for a method without a sliding
    window loses its start (fit_context). One record per task: the task's fields plus "text",
    "prompt_tokens" (read), "new_tokens", "stopped_by", "seconds"."""
    tok, device, out = loaded.tokenizer, loaded.model.tok_emb.weight.device, []
    for i, task in enumerate(tasks):
        wanted = max_new_tokens if max_new_tokens is not None else len(tok.encode(task["reference"]))
        prompt_ids, n = fit_context(loaded, method, tok.encode(task["prompt"]), wanted, partner)
        stats, t0 = method.new_stats(), time.perf_counter()
        text = continue_text(loaded, method, prompt_ids, n, partner, make_generator(seed + i, device), stop, stats)
        out.append({**task, "text": text, "prompt_tokens": len(prompt_ids), "new_tokens": stats.new_tokens,
                    "stopped_by": stats.stopped_by, "seconds": time.perf_counter() - t0})
        if progress is not None:
            progress(1)
    return out
