"""Who is calling: API keys by default, App Service authentication (Easy Auth) when PKI_AUTH=easyauth.

The X-MS-CLIENT-PRINCIPAL header is honoured only in easyauth mode: anywhere Easy Auth is not in front
of the app, anyone can forge it. Every route states the roles it takes; nothing is role-free but health.
"""

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ..errors import Forbidden, Unauthorized
from ..ledger.models import ADMIN
from ..principals import Caller
from ..service import DeviceCA

# The dependencies are async so that they run on the event loop: their ledger reads are a few
# microseconds, less than a hop to the thread pool.

ADMIN_ROLE = "PKI.Admin"
FACTORY_ROLE = "PKI.Factory"
_ROLE_CLAIMS = ("roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")
_APP_ID_CLAIMS = ("appid", "azp")
_NAME_CLAIMS = ("name", "preferred_username", "oid", "http://schemas.microsoft.com/identity/claims/objectidentifier")

bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dca_...`")
api_key_scheme = APIKeyHeader(name="x-api-key", auto_error=False, description="An API key in `x-api-key`")


async def get_service(request: Request) -> DeviceCA:
    return request.app.state.service()


async def authenticate(
    request: Request,
    service: Annotated[DeviceCA, Depends(get_service)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> Caller:
    if service.settings.auth_mode == "easyauth":
        return _easyauth_caller(request.headers.get("x-ms-client-principal"), service)
    presented = bearer.credentials if bearer else api_key
    if not presented:
        raise Unauthorized(
            "no credentials: send an API key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
            "missing-credentials",
        )
    return service.principals.authenticate(presented)


async def require_admin(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    if caller.role != ADMIN:
        raise Forbidden(f"this route is for admins; {caller.id!r} is a {caller.role}", "admin-only")
    return caller


AnyCaller = Annotated[Caller, Depends(authenticate)]
AdminCaller = Annotated[Caller, Depends(require_admin)]
Service = Annotated[DeviceCA, Depends(get_service)]


def _easyauth_caller(header: str | None, service: DeviceCA) -> Caller:
    if not header:
        raise Unauthorized(
            "no X-MS-CLIENT-PRINCIPAL: App Service authentication did not sign the caller in", "no-principal"
        )
    try:
        document: Any = json.loads(base64.b64decode(header, validate=True))
        claims = [(str(c["typ"]), str(c["val"])) for c in document.get("claims") or []]
        role_claim = document.get("role_typ") or "roles"
    except (binascii.Error, ValueError, TypeError, KeyError, AttributeError):
        raise Unauthorized("X-MS-CLIENT-PRINCIPAL is not base64 JSON with claims", "invalid-principal") from None
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


def _first(claims: list[tuple[str, str]], kinds: tuple[str, ...]) -> str | None:
    for kind in kinds:
        for claim_kind, value in claims:
            if claim_kind == kind and value:
                return value
    return None
