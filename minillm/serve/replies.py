"""Replies in OpenAI's shapes: a whole completion / chat completion, or its stream of chunks as
server-sent events ("data: {json}\\n\\n" per chunk, "data: [DONE]\\n\\n" at the end).

    Reply(served, job, "text_completion" | "chat.completion")
    .whole(choices)                  the JSON object of a non-streamed reply, usage included
    .events(request, session)        the streamed reply: each choice's pieces as they are decided,
                                     a last chunk per choice with its finish_reason, the usage
                                     chunk when stream_options.include_usage, then [DONE]
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from .decode import Choice, run_choice
from .jobs import Job
from .state import Served, Session


class Reply:
    def __init__(self, served: Served, job: Job, kind: str):
        self.served, self.job, self.kind = served, job, kind
        self.chat = kind == "chat.completion"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.model_id}

    def usage(self, choices: list[Choice]) -> dict:
        prompt, new = len(self.job.prompt_ids), sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    def whole(self, choices: list[Choice]) -> dict:
        if self.chat:
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for c in choices]
        else:
            out = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for c in choices]
        return {**self.head(self.kind), "choices": out, "usage": self.usage(choices)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, first: bool = False) -> str:
        """One server-sent event with one choice's piece (text None: only the finish_reason)."""
        if self.chat:
            delta = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return event({**self.head(obj), "choices": [choice]})

    async def events(self, watch, session: Session):
        """The streamed reply; `watch` is a context manager that cancels the session if the client leaves."""
        queue: asyncio.Queue = asyncio.Queue()
        producer = asyncio.ensure_future(self._produce(queue, session))
        started, choices = set(), []
        try:
            with watch:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        yield event({"error": {"message": f"decoding failed: {item}", "type": "server_error",
                                               "param": None, "code": None}})
                        return
                    index = item[0] if isinstance(item, tuple) else item.index
                    first = index not in started
                    started.add(index)
                    if isinstance(item, tuple):
                        yield self.chunk(index, item[1], first=first)
                    else:
                        choices.append(item)
                        yield self.chunk(index, None if self.chat and not first else "", item.finish_reason, first)
            if self.job.include_usage:
                yield event({**self.head("chat.completion.chunk" if self.chat else "text_completion"),
                             "choices": [], "usage": self.usage(choices)})
            yield "data: [DONE]\n\n"
        finally:
            producer.cancel()
            session.close()

    async def _produce(self, queue: asyncio.Queue, session: Session) -> None:
        """Decode the choices one by one in the worker; pieces, then each Choice, then None, go to `queue`."""
        loop = asyncio.get_running_loop()

        def emit(index: int, piece: str) -> None:  # called in the worker thread
            loop.call_soon_threadsafe(queue.put_nowait, (index, piece))
        try:
            for i in range(self.job.n):
                queue.put_nowait(await self.served.run_exclusive(run_choice, self.served, self.job, i, session, emit))
        except Exception as e:  # noqa: BLE001 - any failure is reported to the client as an error event
            queue.put_nowait(e)
        finally:
            queue.put_nowait(None)


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
