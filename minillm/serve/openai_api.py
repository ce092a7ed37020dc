"""The OpenAI-style routes: /v1/models, /v1/completions and /v1/chat/completions, whole or streamed
as server-sent events (`data: {chunk}` lines, then `data: [DONE]`), in OpenAI's response shapes.

Each request is one session (state.Served.admit): its choices are decoded one after another in the
worker thread (decode.run_choice), queued behind every request that came before. A task watches the
connection meanwhile; when the client leaves, the session is cancelled and the decode stops at the
next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .decode import run_choice
from .errors import RequestError, error_response
from .jobs import chat_job, completion_job
from .replies import Reply
from .state import Busy, Served, Session

MAX_BODY_BYTES = 1 << 20
WATCH_SECONDS = 0.05  # how often the connection is checked while a request decodes


def routes(served: Served) -> list[Route]:
    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "minillm"}]})

    async def completions(request: Request):
        return await _handle(served, request, completion_job, "text_completion")

    async def chat(request: Request):
        return await _handle(served, request, chat_job, "chat.completion")

    return [Route("/v1/models", models, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"])]


async def read_json(request: Request, limit: int = MAX_BODY_BYTES):
    """The request's JSON body; RequestError when too big or not JSON."""
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise RequestError(f"the request body is over {limit:,} bytes", None, status=413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", None) from None


async def _handle(served: Served, request: Request, make_job, kind: str):
    try:
        job = make_job(served, await read_json(request))
        session = served.admit()
    except RequestError as e:
        return error_response(e)
    except Busy as e:
        return error_response(RequestError(str(e), None, status=429, kind="rate_limit_error"))
    reply = Reply(served, job, kind)
    if job.stream:
        return SessionStream(session, reply.events(watching(request, session), session), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
    try:
        with watching(request, session):
            choices = [await served.run_exclusive(run_choice, served, job, i, session) for i in range(job.n)]
    finally:
        session.close()
    return JSONResponse(reply.whole(choices))


@contextlib.contextmanager
def watching(request: Request, session: Session):
    """For the block, a task that cancels `session` as soon as the client disconnects."""
    async def watch():
        while not session.cancel.is_set():
            if await request.is_disconnected():
                session.cancel.set()
                return
            await asyncio.sleep(WATCH_SECONDS)
    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()


class SessionStream(StreamingResponse):
    """A streamed reply whose session is closed once sending ends, whether or not it began."""

    def __init__(self, session: Session, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.session = session

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.session.close()
