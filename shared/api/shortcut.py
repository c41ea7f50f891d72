"""A short way in for the hot route: POST /api/devices/{deviceId}/certificate.

Starlette's exception middleware, FastAPI's exit-stack middleware, the router's scan and the route's
request wrapper cost about as much per request as the rest of the HTTP handling together (see
bench/http_sign.py). This middleware, installed innermost of the app's own, hands that one route
straight to its endpoint, and hands the endpoint's exceptions to the app's own exception handlers, so
the answers are the same as through the router. Every other request passes through untouched.
"""

import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
Handlers = Callable[[], dict]


class RouteShortcut:
    def __init__(self, app: ASGIApp, method: str, path: str, endpoint: Endpoint, handlers: Handlers) -> None:
        """`path` in the router's syntax with one `{name}` per segment; `handlers` gives the app's
        exception handlers (by exception class), read at each error so that later registrations count."""
        self.app = app
        self.method = method
        self.pattern = re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path))
        self.endpoint = endpoint
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (
            self.pattern.fullmatch(_route_path(scope))
            if scope["type"] == "http" and scope["method"] == self.method
            else None
        )
        if match is None:
            await self.app(scope, receive, send)
            return
        scope["path_params"] = match.groupdict()
        request = Request(scope, receive)
        try:
            response = await self.endpoint(request)
        except Exception as error:
            handlers = self.handlers()
            handler = next((handlers[kind] for kind in type(error).__mro__ if kind in handlers), None)
            if handler is None:
                raise
            response = await handler(request, error)
        await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the router would match: without the root path a proxy or host mounted the app under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path
