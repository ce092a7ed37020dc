"""What the server holds while it runs: the models loaded once, the limits, and the one queue that
every model call goes through.

    served = Served(model, draft=None, amateur=None, limits=Limits())
    served.model / .draft / .amateur      checkpoint.Loaded (draft, amateur: None when not loaded)
    served.model_id                        the name /v1/models lists (the checkpoint's file stem)
    served.limits                          Limits: prompt tokens, max_tokens cap, sessions, lifetime
    async with served.session() as s:      admit one request (Busy when max_sessions are open);
        s.should_stop()                    True once the client left (s.cancel.set()) or the lifetime ran out
        await served.run_exclusive(fn, *a) fn(*a) in the worker thread, after every call queued before it
    s = served.admit(); ...; s.close()     the same without a block (a streamed reply closes it when sent)

Concurrent requests never share a KV cache because they never run at the same time: one worker
thread runs model calls one after another (a queue, not a batch), so the event loop stays free to
accept connections, stream pieces and notice clients that leave. A call still waiting in the queue
when its request is cancelled is dropped without running.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import Loaded


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 4096  # longer prompts are refused (the model's context may refuse sooner)
    max_tokens: int = 1024  # the largest max_tokens a request may ask for (also the default)
    max_sessions: int = 16  # requests open at once, running or queued; more get 429
    session_seconds: float = 300.0  # a request that runs longer is ended (finish_reason "length")


class Busy(Exception):
    """max_sessions requests are already open."""


@dataclass
class Session:
    """One admitted request: a flag the handler sets when the client leaves, and a deadline."""
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    on_close: Callable[[], None] = lambda: None
    closed: bool = False

    def close(self) -> None:
        """End the session (stops its decode at the next token); a second call does nothing more."""
        self.cancel.set()
        if not self.closed:
            self.closed = True
            self.on_close()

    def should_stop(self) -> bool:
        """Checked between tokens by the worker thread."""
        return self.cancel.is_set() or time.monotonic() > self.deadline

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline


class Served:
    def __init__(self, model: Loaded, draft: Loaded | None = None, amateur: Loaded | None = None,
                 limits: Limits = Limits(), model_path: str | None = None):
        self.model, self.draft, self.amateur, self.limits = model, draft, amateur, limits
        self.model_id = Path(model_path).stem if model_path else "minillm"
        self.created = int(time.time())
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minillm-decode")
        self._open = 0  # admitted sessions; touched only on the event loop

    def partner(self, role: str) -> Loaded | None:
        """The loaded "draft" or "amateur" (None when the server was started without it)."""
        return {"draft": self.draft, "amateur": self.amateur}[role]

    async def run_exclusive(self, fn: Callable, *args):
        """Run fn(*args) in the worker thread, after every call queued before it; its result or exception."""
        return await asyncio.wrap_future(self._worker.submit(fn, *args))

    @property
    def open_sessions(self) -> int:
        return self._open

    def admit(self) -> Session:
        """A session of at most limits.session_seconds; Busy when max_sessions are open. Call on the event loop."""
        if self._open >= self.limits.max_sessions:
            raise Busy(f"{self._open} requests are open, the limit is {self.limits.max_sessions}: retry later")
        self._open += 1
        return Session(time.monotonic() + self.limits.session_seconds, on_close=self._closed)

    def _closed(self) -> None:
        self._open -= 1

    @contextlib.asynccontextmanager
    async def session(self):
        """admit() for the block; leaving it (normally, by error or by cancellation) closes the session."""
        s = self.admit()
        try:
            yield s
        finally:
            s.close()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
