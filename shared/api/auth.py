"""Who is calling: API keys by default, App Service authentication (Easy Auth) when PKI_AUTH=easyauth.

The X-MS-CLIENT-PRINCIPAL header is honoured only in easyauth mode: anywhere Easy Auth is not in front
of the app, anyone can forge it. Every route states the roles it takes; nothing is role-free but health
and the docs. The caller is authenticated, and its role checked, before anything of the request body is
read or parsed (`AuthenticatedRoute`): a caller without credentials learns nothing from a route.
"""

import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from ..errors import Forbidden, Unauthorized
from ..ledger.models import ADMIN
from ..service import DeviceCA
from ..service.access import Caller

# The dependencies are async so that they run on the event loop: their ledger reads are a few
# microseconds, less than a hop to the thread pool.

ADMIN_ROLE = "PKI.Admin"
FACTORY_ROLE = "PKI.Factory"
_ROLE_CLAIMS = ("roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")
_APP_ID_CLAIMS = ("appid", "azp")
_NAME_CLAIMS = ("name", "preferred_username", "oid", "http://schemas.microsoft.com/identity/claims/objectidentifier")

# Documented in the OpenAPI document by `document_security`; read here from the headers directly, since
# each FastAPI sub-dependency costs more per request than the whole lookup.
SECURITY_SCHEMES = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer dca_...`"},
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "An API key in x-api-key"},
}
PUBLIC_PATHS = ("/api/health",)


def service_of(request: Request) -> DeviceCA:
    return request.app.state.service()


async def get_service(request: Request) -> DeviceCA:
    return service_of(request)


async def authenticate(request: Request) -> Caller:
    service = service_of(request)
    if service.settings.auth_mode == "easyauth":
        return await asyncio.to_thread(_easyauth_caller, request.headers.get("x-ms-client-principal"), service)
    given = request.headers.getlist("authorization") + request.headers.getlist("x-api-key")
    if len(given) > 1:  # which one a proxy or a server would take differs: none is taken
        raise Unauthorized(
            f"{len(given)} credential headers: send one API key, as 'Authorization: Bearer <key>' or "
            "'x-api-key: <key>'",
            "ambiguous-credentials",
        )
    authorization = request.headers.get("authorization")
    presented = _presented_key(authorization, request.headers.get("x-api-key"))
    if not presented and authorization:
        empty = authorization.strip().lower() == "bearer"  # 'Bearer $KEY' with KEY unset, say
        problem = "its Bearer key is empty" if empty else "it does not carry an API key"
        raise Unauthorized(
            f"the Authorization header is not usable: {problem}; send 'Authorization: Bearer <key>'",
            "unsupported-credentials",
        )
    if not presented:
        raise Unauthorized(
            "no credentials: send an API key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
            "missing-credentials",
        )
    return await service.principals.authenticate_async(presented)


async def any_caller(request: Request) -> Caller:
    """The authenticated caller (Unauthorized otherwise), once per request."""
    caller = getattr(request.state, "caller", None)
    if caller is None:
        caller = request.state.caller = await authenticate(request)
    return caller


async def admin_caller(request: Request) -> Caller:
    """The authenticated caller if an admin; Forbidden "admin-only" for a factory."""
    caller = await any_caller(request)
    if caller.role != ADMIN:
        raise Forbidden(f"this route is for admins; {caller.id!r} is a {caller.role}", "admin-only")
    return caller


async def optional_caller(request: Request) -> Caller | None:
    """The caller if its credentials are good, else None (for a route anyone may call)."""
    try:
        return await any_caller(request)
    except Exception:  # no, bad or unusable credentials: an anonymous caller here
        return None


AnyCaller = Annotated[Caller, Depends(any_caller)]
AdminCaller = Annotated[Caller, Depends(admin_caller)]
Service = Annotated[DeviceCA, Depends(get_service)]


class AuthenticatedRoute(APIRoute):
    """A route that authenticates its caller, and checks its role, before FastAPI reads or parses the body.

    FastAPI reads and decodes a JSON body before it solves a route's dependencies, so a caller without
    credentials would learn from a 400 what a route takes. The route's own declaration decides: one that
    depends on AdminCaller checks for an admin first, one that depends on AnyCaller authenticates first,
    and one that depends on neither (health) is left as it is."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        check = _access_check(self.dependant)
        if check is None:
            return handler

        async def authenticated(request: Request) -> Response:
            await check(request)
            return await handler(request)

        return authenticated


def _access_check(dependant: Dependant) -> Callable[[Request], Awaitable[Caller]] | None:
    calls = {dependency.call for dependency in _dependencies(dependant)}
    if admin_caller in calls:
        return admin_caller
    return any_caller if any_caller in calls else None


def _dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for dependency in dependant.dependencies:
        yield dependency
        yield from _dependencies(dependency)


def document_security(app: FastAPI) -> None:
    """Put the API-key schemes into the OpenAPI document, on every route but the public ones."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            for path, operations in schema["paths"].items():
                if path not in PUBLIC_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _presented_key(authorization: str | None, api_key: str | None) -> str | None:
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return api_key.strip() if api_key and api_key.strip() else None


def _easyauth_caller(header: str | None, service: DeviceCA) -> Caller:
    if not header:
        raise Unauthorized(
            "no X-MS-CLIENT-PRINCIPAL: App Service authentication did not sign the caller in", "no-principal"
        )
    claims, role_claim = _read_principal(header)
    roles = {value for kind, value in claims if kind == role_claim or kind in _ROLE_CLAIMS}
    if ADMIN_ROLE in roles:
        name = _first(claims, _NAME_CLAIMS) or "unnamed"
        return Caller(f"entra:{name}", ADMIN, None, "easyauth")
    if FACTORY_ROLE in roles:
        app_id = _first(claims, _APP_ID_CLAIMS)
        if not app_id:
            raise Forbidden(
                "the caller has the PKI.Factory role but no application ID claim (appid or azp)", "no-app-id"
            )
        return service.principals.factory_for_app(app_id)
    raise Forbidden(f"the caller has neither the {ADMIN_ROLE} nor the {FACTORY_ROLE} app role", "no-role")


MAX_PRINCIPAL_BYTES = 64 * 1024
MAX_CLAIM_CHARACTERS = 512


def _read_principal(header: str) -> tuple[list[tuple[str, str]], str]:
    """The claims of an X-MS-CLIENT-PRINCIPAL header (base64 of `{"claims": [{"typ", "val"}], "role_typ"}`)
    and the claim type that carries roles. Unauthorized for anything else: a header that cannot be read
    is no credential (too large, not base64 or JSON, nested past reason, claims that are not short strings
    of valid Unicode)."""
    invalid = Unauthorized("X-MS-CLIENT-PRINCIPAL is not base64 JSON with claims", "invalid-principal")
    if len(header) > MAX_PRINCIPAL_BYTES:
        raise invalid
    try:
        document: Any = json.loads(base64.b64decode(header, validate=True))
        claims = [(c["typ"], c["val"]) for c in document.get("claims") or []]
        role_claim = document.get("role_typ") or "roles"
    except (binascii.Error, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise invalid from None
    if not all(_claim_text(part) for claim in claims for part in claim) or not _claim_text(role_claim):
        raise invalid
    return claims, role_claim


def _claim_text(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > MAX_CLAIM_CHARACTERS or not value.isprintable():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first(claims: list[tuple[str, str]], kinds: tuple[str, ...]) -> str | None:
    for kind in kinds:
        for claim_kind, value in claims:
            if claim_kind == kind and value:
                return value
    return None
