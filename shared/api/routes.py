"""The route class of every API route (`ApiRoute`): what a request carries beside its path and body is
checked against what the route declares, in one place, once the caller (and its role) is known and before
the route reads the body or runs.

- Query parameters: a route takes those it declares (its FastAPI `Query` parameters; for the routes that
  read their own, the query parameters their `openapi_extra` documents), each once. Anything else is a 400
  `invalid-request` naming it and the ones the route takes, as an unknown JSON field is: a misspelt filter
  must not list the whole fleet, a misspelt `renew` must not sign as if it were not sent.
- Accept: a route answers application/json, and besides it the media types its 2xx responses declare (the
  PEM routes). When the Accept header allows none of them the answer is a 406 `not-acceptable` naming them;
  otherwise `answer_type(request)` is the one chosen, for the route to answer in.
"""

import functools
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from ..errors import CaError
from .auth import PUBLIC_PATHS, AuthenticatedRoute, any_caller

JSON = "application/json"
# A PEM certificate chain: RFC 8555 §9.1's registered name first, then the name this API has always taken.
PEM_TYPES = ("application/pem-certificate-chain", "application/x-pem-file")
_SHOWN_NAMES = 3


class NotAcceptable(CaError):
    status = 406
    code = "not-acceptable"


class DeclaredRoute(APIRoute):
    """A route that refuses what it does not declare: unknown or repeated query parameters (400) and an
    Accept header that allows none of its media types (406). A caller without credentials is told 401
    instead, on every route but the public ones, so that it learns nothing of what a route takes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        taken = declared_query_parameters(self)
        offered = offered_media_types(self)
        public = self.path in PUBLIC_PATHS

        async def checked(request: Request) -> Response:
            problem = query_problem(request, taken)
            chosen = None if problem else negotiate(accept_header(request), offered)
            if chosen is None:
                if not public:
                    await any_caller(request)  # Unauthorized first; the role, where a route has one, is checked
                if problem:
                    raise CaError(problem, "invalid-request")
                raise NotAcceptable(
                    f"this route answers {_listed(offered)}; the Accept header "
                    f"({_cut(accept_header(request), 80)!r}) allows none of them"
                )
            request.state.media_type = chosen
            return await handler(request)

        return checked


class ApiRoute(AuthenticatedRoute, DeclaredRoute):
    """Every API route: the caller and its role first (AuthenticatedRoute), then the query parameters and
    Accept header (DeclaredRoute), then FastAPI's own handling (parameters, body, the route)."""


def answer_type(request: Request) -> str:
    """The media type DeclaredRoute chose for this request's answer: application/json or one of the
    route's declared types (PEM_TYPES on the PEM routes)."""
    return request.state.media_type


def declared_query_parameters(route: APIRoute) -> tuple[str, ...]:
    """The names of the query parameters `route` takes, in the order declared: its dependencies' `Query`
    parameters (by alias), then those its `openapi_extra` documents for the routes that read their own."""
    names = [field.alias for dependant in _dependants(route.dependant) for field in dependant.query_params]
    extra = (route.openapi_extra or {}).get("parameters", [])
    names += [parameter["name"] for parameter in extra if parameter.get("in") == "query"]
    return tuple(dict.fromkeys(names))


def offered_media_types(route: APIRoute) -> tuple[str, ...]:
    """The media types `route` answers in, its preference first: application/json, then every other
    media type the content of its 2xx responses declares."""
    declared = [
        media
        for status, response in route.responses.items()
        if str(status).startswith("2")
        for media in response.get("content", {})
    ]
    return tuple(dict.fromkeys([JSON, *declared]))


def query_problem(request: Request, taken: tuple[str, ...]) -> str | None:
    """Why the request's query parameters are not what the route takes, or None: a name it does not take,
    or one given more than once (every parameter here takes one value)."""
    if not request.scope.get("query_string"):
        return None
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = list(dict.fromkeys(name for name in names if name not in taken))
    if unknown:
        takes = f"this route takes {', '.join(taken)}" if taken else "this route takes no query parameters"
        return f"unknown query parameter{'s' if len(unknown) > 1 else ''} {_names(unknown)}: {takes}"
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        return f"query parameter {_names(repeated)} is given more than once: each takes one value"
    return None


def accept_header(request: Request) -> str:
    return ", ".join(request.headers.getlist("accept"))


@functools.lru_cache(maxsize=512)
def negotiate(accept: str, offered: tuple[str, ...]) -> str | None:
    """The media type of `offered` (the route's preference first) to answer an `accept` header with, or
    None when it allows none of them. An absent or blank header allows any: the route's first.

    RFC 9110 §12.5.1: each offered type takes the quality of the most specific range that matches it
    (`type/subtype`, then `type/*`, then `*/*`), and q=0 refuses it. The highest quality wins; among equal
    ones a type the header names outright before one a wildcard matches, then the one the header names
    first, then the route's preference. Malformed ranges (no `/`, a q outside 0-1) are ignored; a lone
    `*` (old Java clients) is `*/*`."""
    if not accept.strip():
        return offered[0]
    ranges = _ranges(accept)
    best: tuple[tuple[float, int, int, int], str] | None = None
    for preference, media in enumerate(offered):
        match = _match(media, ranges)
        if match is None or match[1] == 0:
            continue
        specificity, quality, position = match
        key = (quality, specificity, -position, -preference)
        if best is None or key > best[0]:
            best = (key, media)
    return None if best is None else best[1]


def _ranges(accept: str) -> list[tuple[str, str, float, int]]:
    """The media ranges of an Accept header: (type, subtype, q, position in the header)."""
    ranges = []
    for position, element in enumerate(accept.split(",")):
        media, *parameters = element.split(";")
        media = media.strip().lower()
        if media == "*":
            media = "*/*"
        kind, slash, subtype = media.partition("/")
        if not (slash and kind and subtype) or (kind == "*" and subtype != "*"):
            continue
        quality = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = -1.0
                break  # what follows q is accept-ext, not the media type's
        if 0 <= quality <= 1:  # also leaves out nan
            ranges.append((kind, subtype, quality, position))
    return ranges


def _match(media: str, ranges: list[tuple[str, str, float, int]]) -> tuple[int, float, int] | None:
    """The most specific range that matches `media`, as (specificity 2/1/0, q, position); None if none does."""
    kind, _, subtype = media.partition("/")
    found: tuple[int, float, int] | None = None
    for range_kind, range_subtype, quality, position in ranges:
        if (range_kind, range_subtype) == (kind, subtype):
            specificity = 2
        elif range_kind == kind and range_subtype == "*":
            specificity = 1
        elif range_kind == "*":
            specificity = 0
        else:
            continue
        if found is None or specificity > found[0]:
            found = (specificity, quality, position)
    return found


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for dependency in dependant.dependencies:
        yield from _dependants(dependency)


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(_cut(name, 40)) for name in names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


def _listed(types: tuple[str, ...]) -> str:
    return types[0] if len(types) == 1 else f"{', '.join(types[:-1])} or {types[-1]}"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
