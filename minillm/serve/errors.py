"""Errors a client caused, in the shape OpenAI's API (and so its client libraries) uses:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Raise RequestError(message, param) anywhere while handling a request; the app turns it into that
JSON with its status (400 unless given), and the server goes on serving.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)
