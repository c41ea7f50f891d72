"""Body size caps per route, answered with the API's JSON error shape.

Starlette's own limiter answers a too-long Content-Length with a plain-text 413 whatever the app says,
which would break the error contract; this checks Content-Length first and counts streamed bytes too.
"""

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

CLOSE = {"Connection": "close"}


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            # Connection: close, so that the server reads and drops what is still coming, then closes, rather
            # than keeping a connection alive behind a body it will never use (see shared/api/connections.py).
            response = error_response(413, "body-too-large", _message(scope["path"], limit), CLOSE)
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, _message(scope["path"], limit), CLOSE)  # FastAPI passes it on
            return message

        await self.app(scope, counted_receive, send)


def _message(path: str, limit: int) -> str:
    return f"the request body is too large: {path} takes at most {limit} bytes"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
