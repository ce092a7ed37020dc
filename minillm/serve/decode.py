"""One choice of a Job, decoded in the worker thread through the one decoding path sample.py uses:
methods.stream (plain, speculative or contrastive) with generate.make_generator(seed + index) and
the tokenizer's end-of-sequence ids, turned into text by generate.decode_stream (UTF-8 safe, cut
before a stop string). So greedy text here is sample.py's text for the same prompt and settings.

The session is checked after every token: a client that left, or a request past its lifetime, ends
the decode there (the token loop is closed, the worker moves on to the next queued call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..generate import Stats, decode_stream, make_generator
from ..methods import stream
from .jobs import Job
from .state import Served, Session


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"
    completion_tokens: int
    stats: Stats


def run_choice(served: Served, job: Job, index: int, session: Session,
               emit: Callable[[int, str], None] | None = None) -> Choice:
    """Decode choice `index` of `job`; emit(index, piece) for each text piece as it is decided."""
    loaded, method = served.model, job.method
    tok = loaded.tokenizer
    partner = served.partner(method.partner) if method.partner else None
    stats = method.new_stats()
    generator = make_generator(job.seed + index, loaded.model.tok_emb.weight.device)
    tokens = stream(method, loaded.model, job.prompt_ids, job.max_tokens, partner and partner.model,
                    generator, set(tok.eos_ids), stats)
    text = []
    for piece in decode_stream(tok, _until_stopped(tokens, session), job.stop, stats):
        text.append(piece)
        if emit is not None:
            emit(index, piece)
    finish = "stop" if stats.stopped_by in ("eos", "stop") else "length"
    return Choice(index, "".join(text), finish, stats.new_tokens, stats)


def _until_stopped(tokens: Iterator[int], session: Session) -> Iterator[int]:
    """The token ids, until the session says stop (then the decoding loop is closed)."""
    try:
        for token in tokens:
            yield token
            if session.should_stop():
                return
    finally:
        tokens.close()
