"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and nothing else.

Every failure a client can cause is raised as an `APIError` with its HTTP status, the request field it
concerns (`param`, e.g. "messages[0].content[1].image_url") and a short code. Messages from the
library's own ValueErrors are passed on (they name the option or the image at fault) after `clean`
strips what must never reach a client: memory addresses (`<... at 0x7f...>`), file system paths and
anything past a few hundred characters. Anything unexpected becomes a 500 with a fixed message; the
traceback goes to the server's log only.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
MAX_MESSAGE = 300
_ADDRESS = re.compile(r"\s*at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")
_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]*")  # /home/x/y.py, /tmp/pytest-3/..., never a URL path
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")


class APIError(Exception):
    """A failure to report to the client: status, message, the request field, a short code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code)


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, param=param, code=code), status, headers=headers)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    error = {"message": clean(message), "type": TYPES.get(status, "invalid_request_error"), "param": param}
    return {"error": {**error, "code": code}}


def clean(message: str) -> str:
    """A message safe to show a client: no addresses, no paths, one line, bounded length."""
    urls: list[str] = []
    message = _URL.sub(lambda m: urls.append(m.group()) or f"\0{len(urls) - 1}\0", message)
    message = _PATH.sub("<path>", _ADDRESS.sub("", message))
    message = re.sub(r"\0(\d+)\0", lambda m: urls[int(m.group(1))], message)
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."
