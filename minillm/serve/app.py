"""The Starlette application: the OpenAI-style /v1 routes, the inspector page at / (its files under
/page/), and the page's /api routes (inspect_api.py).

Every error a client can cause comes back in OpenAI's error shape (errors.py), unknown paths and
methods included, and a failure while handling one request never stops the server.
"""

from __future__ import annotations

import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import inspect_api, openai_api
from .errors import RequestError, error_response
from .state import Served

PAGE = Path(__file__).parent / "page"


def build_app(served: Served) -> Starlette:
    routes = [*openai_api.routes(served), *inspect_api.routes(served), Route("/", index, methods=["GET"]),
              Mount("/page", StaticFiles(directory=PAGE, check_dir=False))]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.served = served
    return app


async def index(request: Request):
    return FileResponse(PAGE / "index.html", media_type="text/html")


async def http_error(request: Request, exc: HTTPException):
    what = {404: f"no such route: {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return error_response(RequestError(what, None, status=exc.status_code))


async def server_error(request: Request, exc: Exception):
    print(f"error: {request.method} {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return error_response(RequestError(f"internal error: {type(exc).__name__}: {exc}", None, status=500,
                                       kind="server_error"))
