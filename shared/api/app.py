"""The HTTP API: routes, request parsing and responses. Every route calls the service and nothing else."""

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .. import parameters
from ..composition import build_service
from ..config import Settings
from ..errors import CaError, Forbidden, NotFound, for_callers
from ..ledger.models import CertificateQuery
from ..service import DeviceCA, IssuedCertificate
from ..service.access import Caller
from ..views import (
    api_key_view,
    ca_public_view,
    ca_view,
    certificate_view,
    intermediate_views,
    new_api_key_view,
    offline_warnings,
    principal_view,
    revocation_view,
)
from . import docs, models
from .auth import (
    AdminCaller,
    AnyCaller,
    Service,
    any_caller,
    document_security,
    optional_caller,
    service_of,
)
from .batches import BATCH_BODY_LIMIT, BATCHES_PATH, batches
from .errors import UnsupportedMediaType, describe_validation, document_errors, install_error_handlers
from .limits import BodyLimit
from .routes import PEM_TYPES, ApiRoute, answer_type

CSR_BODY_LIMIT = 8 * 1024  # a CSR is a few hundred bytes; a P-384 one in JSON stays under 2 KiB
JSON_BODY_LIMIT = 64 * 1024
CSR_MEDIA_TYPES = ("application/pkcs10", "application/x-pem-file", "text/plain", "application/octet-stream")
_PEM_CONTENT = {media: {"schema": {"type": "string", "description": "PEM certificates"}} for media in PEM_TYPES}

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": models.ErrorResponse, "description": description}
    for status, description in {
        400: "the request is not valid (the message says why)",
        401: "no, unknown or revoked credentials",
        403: "the caller's role or intermediates do not allow this",
        404: "no such thing",
        405: "the route does not take this method",
        406: "the Accept header allows none of the media types the route answers in (the message names them)",
        409: "conflicts with what the ledger holds",
        413: "body too large",
        415: "unsupported Content-Type",
        500: "the service is misconfigured or failed: a code and an error ID that finds the details in its log",
        503: "a backend is unavailable; retry after Retry-After seconds",
    }.items()
}


def create_app(service: DeviceCA | None = None, settings: Settings | None = None) -> FastAPI:
    """The API on `service`, or on one built from settings at the first request (and closed, its ledger
    checkpointed, when the app shuts down). No route redirects: a path with a trailing slash is a 404."""
    app = FastAPI(
        title="Device CA",
        summary="A certificate authority for Azure IoT device fleets",
        version="0.1.0",
        openapi_url="/api/openapi.json",
        docs_url=None,  # docs.py serves the page from assets installed with the app, never a CDN
        redoc_url=None,
        responses=_ERRORS,
        redirect_slashes=False,
        lifespan=_closing_what_it_built,
    )
    app.state.service = _ServiceOf(service, settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit_for=body_limit)
    document_security(app)
    document_errors(app)
    app.include_router(devices)
    app.include_router(router)
    app.include_router(batches)
    docs.install(app)
    return app


@asynccontextmanager
async def _closing_what_it_built(app: FastAPI) -> AsyncIterator[None]:
    yield
    await asyncio.to_thread(app.state.service.close_built)


def body_limit(path: str) -> int:
    if path == BATCHES_PATH:
        return BATCH_BODY_LIMIT
    return CSR_BODY_LIMIT if path.startswith("/api/devices/") else JSON_BODY_LIMIT


def app_from_environment() -> FastAPI:
    """For `uvicorn --factory` workers: the service comes from the environment and local.settings.json."""
    return create_app()


class _ServiceOf:
    """The app's service: the one handed in, or one built from settings at the first request. The app
    closes (and so checkpoints the ledger of) only one it built; whoever handed one in closes that."""

    def __init__(self, service: DeviceCA | None, settings: Settings | None) -> None:
        self._service = service
        self._settings = settings
        self._built = False
        self._lock = threading.Lock()

    def __call__(self) -> DeviceCA:
        if self._service is None:
            with self._lock:
                if self._service is None:
                    self._service = build_service(self._settings)
                    self._built = True
        return self._service

    def close_built(self) -> None:
        if self._built and self._service is not None:
            self._service.close()


async def json_only(request: Request) -> None:
    """A JSON route refuses other bodies with 415 rather than a confusing validation error."""
    if request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers:
        return
    media = _media_type(request.headers.get("content-type"))
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"this route takes application/json, not {media or 'a body without Content-Type'}")


# Every route authenticates its caller before the body is read, then refuses query parameters and Accept
# headers it does not declare (ApiRoute); none redirects.
router = APIRouter(dependencies=[Depends(json_only)], route_class=ApiRoute, redirect_slashes=False)
devices = APIRouter(route_class=ApiRoute, redirect_slashes=False)  # takes PEM, DER and JSON bodies


# -- health ------------------------------------------------------------------------------------------


@router.get(
    "/api/health",
    response_model=models.Health,
    response_model_exclude_none=True,
    tags=["health"],
    summary="whether the service can work (anyone; details for authenticated callers)",
    description=(
        "200 `ok` or 503 `degraded` (the ledger cannot be read, or the keys of the root or an active "
        "intermediate cannot be used). Anyone gets the status; an authenticated caller also gets the "
        "backends in use and, for each problem, its code and the error ID under which the log has the details."
    ),
    responses={503: {"model": models.Health, "description": "degraded"}},
)
async def health(request: Request) -> JSONResponse:
    try:
        service = service_of(request)
    except CaError as error:  # the service cannot even be built (a setting is wrong)
        for_callers(error, "checking health")
        return JSONResponse({"status": "degraded"}, status_code=503)
    report = await asyncio.to_thread(service.health)
    body: dict[str, Any] = {"status": "ok" if report.ok else "degraded"}
    problems = [(part, for_callers(error, f"checking health ({part})")) for part, error in report.problems]
    if await optional_caller(request) is not None:
        body["backends"] = {part: backend["backend"] for part, backend in report.backends.items()}
        body["dpsConfigured"] = service.dps.configured
        body["auth"] = service.settings.auth_mode
        if problems:
            body["problems"] = [
                {"part": part, "code": error.code, "errorId": error.error_id} for part, error in problems
            ]
    return JSONResponse(body, status_code=200 if report.ok else 503)


# -- device certificates -----------------------------------------------------------------------------

_CSR_SCHEMA = {"type": "string", "description": "PKCS#10 request, PEM (or DER for application/pkcs10)"}


_DEVICE_ROUTE_PARAMETERS = [
    {
        "name": "deviceId",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "= the CSR's CN = the DPS registration ID",
    },
    {
        "name": "renew",
        "in": "query",
        "required": False,
        "schema": {"type": "boolean", "default": False},
        "description": "replace the device's active certificate",
    },
    {
        "name": "intermediateId",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "sign with this intermediate (default: the newest active one the caller may use)",
    },
]


@devices.post(
    "/api/devices/{deviceId}/certificate",
    status_code=201,
    tags=["devices"],
    summary="sign a device CSR (factory or admin)",
    description=(
        "The CSR's CN must equal the device ID. 201 with the device bundle; the same CSR (same device, same "
        "key) again: 200 and the same certificate. Send `Accept: application/pem-certificate-chain` (RFC 8555) "
        "or `application/x-pem-file` to get the chain (device, intermediate) as PEM instead of JSON. A factory "
        "signs with its own intermediates only."
    ),
    responses={
        200: {
            "model": models.DeviceBundle,
            "description": "already issued for this device and key",
            "content": _PEM_CONTENT,
        },
        201: {"model": models.DeviceBundle, "description": "issued and recorded", "content": _PEM_CONTENT},
    },
    openapi_extra={
        "parameters": _DEVICE_ROUTE_PARAMETERS,
        "requestBody": {
            "required": True,
            "content": {
                **{media: {"schema": _CSR_SCHEMA} for media in CSR_MEDIA_TYPES},
                "application/json": {"schema": models.CsrRequest.model_json_schema()},
            },
        },
    },
)
async def sign_device_certificate(request: Request) -> Response:
    # The hot route reads its parameters itself: FastAPI's per-parameter solving costs more than the rest
    # of the request's HTTP handling. The OpenAPI document describes them (openapi_extra above), and
    # ApiRoute refuses any other.
    caller = await any_caller(request)  # before the body is read
    device_id = request.path_params["deviceId"]
    renew, intermediate_id = _query_flag(request, "renew"), request.query_params.get("intermediateId")
    if intermediate_id is not None:
        parameters.ca_id(intermediate_id)  # "?intermediateId=" (empty) names no CA: not the default
    csr, options = await _read_csr(request)
    if options.intermediateId and intermediate_id and options.intermediateId != intermediate_id:
        raise CaError("intermediateId differs between the query and the body", "conflicting-parameters")
    issued = await service_of(request).sign_csr_async(
        csr,
        device_id,
        intermediate_id=intermediate_id or options.intermediateId,
        requested_by=caller.id,
        renew=renew or options.renew,
        allowed_intermediates=caller.intermediates,
    )
    return _bundle_response(issued, request)


def _query_flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None or value.lower() in ("false", "0", "no"):
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    raise CaError(f"query parameter {name} must be true or false (also 1/0, yes/no), not {value!r}", "invalid-request")


async def _read_csr(request: Request) -> tuple[bytes, models.CsrRequest]:
    media = _media_type(request.headers.get("content-type"))
    body = await request.body()
    if media in CSR_MEDIA_TYPES:
        return body, models.CsrRequest(csr="")
    if media == "application/json" or media.endswith("+json"):
        try:
            options = models.CsrRequest.model_validate_json(body)
        except ValidationError as error:
            if body.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"-----BEGIN"):  # PEM, sent as JSON
                raise CaError(
                    "the body is PEM, not JSON: send a PEM CSR as application/pkcs10 (or application/x-pem-file), "
                    'or JSON {"csr": "<PEM>"} as application/json',
                    "invalid-request",
                ) from None
            raise CaError(describe_validation(error.errors()), "invalid-request") from None
        return options.csr.encode(), options
    raise UnsupportedMediaType(
        f"send the CSR as {', '.join(CSR_MEDIA_TYPES)} or application/json, not {media or 'without a Content-Type'}"
    )


def _bundle_response(issued: IssuedCertificate, request: Request) -> Response:
    status = 201 if issued.created else 200
    headers = {"Location": f"/api/certificates/{issued.record.serial}"}
    media = answer_type(request)
    if media in PEM_TYPES:
        return Response(issued.chain_pem, status_code=status, media_type=media, headers=headers)
    return JSONResponse(issued.bundle(), status_code=status, headers=headers)


# -- the CA root -------------------------------------------------------------------------------------


@router.get(
    "/api/ca/root",
    response_model=models.CaCertificate,
    tags=["ca"],
    summary="show the root (admin)",
    description=(
        "The root as JSON; with `Accept: application/x-pem-file` or `application/pem-certificate-chain`, its "
        "certificate as PEM (what `show-ca-root` prints)."
    ),
    responses={200: {"content": _PEM_CONTENT}},
)
def get_root(caller: AdminCaller, service: Service, request: Request) -> Any:
    record = service.root()
    media = answer_type(request)
    if media in PEM_TYPES:
        return Response(record.certificate_pem, media_type=media)
    return ca_view(record)


@router.get(
    "/api/ca/chain",
    response_model=models.CaChain,
    tags=["ca"],
    summary="the root and the caller's intermediates, to verify device certificates with (factory, admin)",
    description=(
        "The public certificates a factory line verifies what it receives with: the root, and the "
        "intermediates the caller may sign with (an admin: every one), disabled ones included, oldest first. "
        "With `Accept: application/x-pem-file` or `application/pem-certificate-chain`, the same as PEM: the "
        "root, then the intermediates."
    ),
    responses={200: {"content": _PEM_CONTENT}},
)
def get_chain(caller: AnyCaller, service: Service, request: Request) -> Any:
    chain = service.ca_chain(caller.intermediates)
    media = answer_type(request)
    if media in PEM_TYPES:
        return Response(chain.pem, media_type=media)
    return {"root": ca_public_view(chain.root), "intermediates": [ca_public_view(ca) for ca in chain.intermediates]}


@router.post(
    "/api/ca/root", status_code=201, response_model=models.CaCertificate, tags=["ca"], summary="create the root (admin)"
)
def create_root(caller: AdminCaller, service: Service, body: models.CreateCa | None = None) -> dict[str, Any]:
    body = body or models.CreateCa()
    result = service.create_root(body.commonName, body.organization, body.curve, body.days)
    return ca_view(result.record, result.warnings)


@router.post(
    "/api/ca/root/proof-of-possession",
    response_model=models.ProofResponse,
    tags=["ca"],
    summary="sign DPS's verification code with the root key (admin)",
)
def prove_root_possession(
    caller: AdminCaller, service: Service, body: models.ProofRequest | None = None
) -> dict[str, Any]:
    body = body or models.ProofRequest()
    proof = service.prove_root_possession(body.verificationCode, body.verifiedOnUpload)
    document = {
        "verificationCode": proof.verification_code,
        "certificate": proof.certificate_pem,
        "alreadyVerified": proof.already_verified,
        "dps": proof.dps,
    }
    return {**document, "warnings": offline_warnings(proof.dps)} if offline_warnings(proof.dps) else document


# -- intermediates -----------------------------------------------------------------------------------


@router.post(
    "/api/ca/intermediates",
    status_code=201,
    response_model=models.CaCertificate,
    tags=["ca"],
    summary="create an intermediate, registered as a DPS enrollment group (admin)",
)
def create_intermediate(
    caller: AdminCaller, service: Service, body: models.CreateIntermediate | None = None
) -> dict[str, Any]:
    body = body or models.CreateIntermediate()
    result = service.create_intermediate(body.id, body.commonName, body.organization, body.curve, body.days)
    return ca_view(result.record, result.warnings, default=result.record.id == service.default_intermediate_id())


@router.get(
    "/api/ca/intermediates",
    response_model=list[models.CaCertificate],
    tags=["ca"],
    summary="list intermediates (admin)",
)
def list_intermediates(caller: AdminCaller, service: Service) -> list[dict[str, Any]]:
    records = service.intermediates()
    return intermediate_views(records, service.default_intermediate_id(records))


@router.get(
    "/api/ca/intermediates/{intermediateId}",
    response_model=models.CaCertificate,
    tags=["ca"],
    summary="show an intermediate (admin)",
)
def get_intermediate(
    ca_id: Annotated[str, Path(alias="intermediateId")], caller: AdminCaller, service: Service
) -> dict[str, Any]:
    record = service.intermediate(ca_id)
    return ca_view(record, default=record.id == service.default_intermediate_id())


@router.post(
    "/api/ca/intermediates/{intermediateId}/disable",
    response_model=models.CaCertificate,
    tags=["ca"],
    summary="stop signing and provisioning with an intermediate (admin)",
)
def disable_intermediate(
    ca_id: Annotated[str, Path(alias="intermediateId")], caller: AdminCaller, service: Service
) -> dict[str, Any]:
    result = service.set_intermediate_enabled(ca_id, False)
    return ca_view(result.record, result.warnings, default=result.record.id == service.default_intermediate_id())


@router.post(
    "/api/ca/intermediates/{intermediateId}/enable",
    response_model=models.CaCertificate,
    tags=["ca"],
    summary="resume signing and provisioning with an intermediate (admin)",
)
def enable_intermediate(
    ca_id: Annotated[str, Path(alias="intermediateId")], caller: AdminCaller, service: Service
) -> dict[str, Any]:
    result = service.set_intermediate_enabled(ca_id, True)
    return ca_view(result.record, result.warnings, default=result.record.id == service.default_intermediate_id())


@router.post(
    "/api/ca/intermediates/{intermediateId}/retry-dps",
    response_model=models.CaCertificate,
    tags=["ca"],
    summary="register an intermediate's DPS enrollment group again (admin)",
)
def retry_dps(
    ca_id: Annotated[str, Path(alias="intermediateId")], caller: AdminCaller, service: Service
) -> dict[str, Any]:
    record, notes = service.retry_dps(ca_id)
    return ca_view(record, notes, default=record.id == service.default_intermediate_id())


# -- the inventory -----------------------------------------------------------------------------------


@router.get(
    "/api/certificates",
    response_model=models.CertificateList,
    tags=["certificates"],
    summary="the inventory (admin: all; factory: the certificates it asked for)",
    description="With expiringWithinDays, only active certificates are listed unless a status is asked for.",
)
def list_certificates(
    caller: AnyCaller,
    service: Service,
    device_id: Annotated[models.DeviceId | None, Query(alias="deviceId", description=parameters.DEVICE_ID_RULE)] = None,
    intermediate_id: Annotated[
        models.CaId | None, Query(alias="intermediateId", description=f"an intermediate's ID: {parameters.CA_ID_RULE}")
    ] = None,
    status: Annotated[models.Status | None, Query()] = None,
    expiring_within_days: Annotated[models.Days | None, Query(alias="expiringWithinDays")] = None,
    requested_by: Annotated[
        models.Requester | None,
        Query(
            alias="requestedBy",
            description="only those this factory or admin asked for (a factory: itself), or cli:<user> for what "
            "the CLI signed on the CA host",
        ),
    ] = None,
    limit: Annotated[models.PageLimit, Query()] = parameters.DEFAULT_PAGE,
    cursor: Annotated[models.Cursor | None, Query()] = None,
) -> dict[str, Any]:
    if not caller.is_admin and requested_by not in (None, caller.id):
        raise Forbidden("a factory lists only the certificates it asked for", "forbidden")
    page = service.certificates(
        CertificateQuery(
            device_id=device_id,
            intermediate_id=intermediate_id,
            status=status,
            expiring_before=service.expiring_before(expiring_within_days) if expiring_within_days is not None else None,
            requested_by=requested_by if caller.is_admin else caller.id,
            limit=limit,
            cursor=cursor,
        )
    )
    return {"items": [certificate_view(record) for record in page.items], "nextCursor": page.next_cursor}


@router.get(
    "/api/certificates/{serial}",
    response_model=models.IssuedCertificateView,
    tags=["certificates"],
    summary="one certificate by serial (admin: any; factory: its own)",
)
def get_certificate(serial: str, caller: AnyCaller, service: Service) -> dict[str, Any]:
    record = service.certificate(serial)
    if not _may_read(caller, record.requested_by):
        raise NotFound(f"no certificate with serial {serial}", "certificate-not-found")
    return certificate_view(record)


@router.post(
    "/api/certificates/{serial}/revoke",
    response_model=models.RevokeResponse,
    tags=["certificates"],
    summary="revoke a certificate and its key, with every active certificate of that key (admin)",
)
def revoke_certificate(
    serial: str, caller: AdminCaller, service: Service, body: models.RevokeRequest | None = None
) -> dict[str, Any]:
    revocation, dps_state = service.revoke(serial, (body or models.RevokeRequest()).reason)
    return revocation_view(revocation, dps_state)


def _may_read(caller: Caller, requested_by: str) -> bool:
    return caller.is_admin or caller.id == requested_by


# -- principals and keys -----------------------------------------------------------------------------


@router.post(
    "/api/factories",
    status_code=201,
    response_model=models.NewKey,
    tags=["access"],
    summary="create a factory bound to intermediates; its API key is shown once (admin)",
)
def create_factory(caller: AdminCaller, service: Service, body: models.CreateFactory) -> dict[str, Any]:
    return new_api_key_view(service.principals.create_factory(body.name, body.intermediates, body.appId))


@router.get(
    "/api/factories", response_model=list[models.PrincipalView], tags=["access"], summary="list factories (admin)"
)
def list_factories(caller: AdminCaller, service: Service) -> list[dict[str, Any]]:
    return [principal_view(factory) for factory in service.principals.factories()]


@router.put(
    "/api/factories/{name}/intermediates",
    response_model=models.PrincipalView,
    tags=["access"],
    summary="replace the intermediates a factory may sign with; its keys stay valid (admin)",
)
def bind_factory(name: str, caller: AdminCaller, service: Service, body: models.FactoryIntermediates) -> dict[str, Any]:
    return principal_view(service.principals.bind_factory(name, body.intermediates))


@router.get("/api/keys", response_model=list[models.ApiKeyView], tags=["access"], summary="list API keys (admin)")
def list_keys(caller: AdminCaller, service: Service) -> list[dict[str, Any]]:
    return [api_key_view(key) for key in service.principals.api_keys()]


@router.post(
    "/api/keys/{keyId}/revoke", response_model=models.ApiKeyView, tags=["access"], summary="revoke an API key (admin)"
)
def revoke_key(key_id: Annotated[str, Path(alias="keyId")], caller: AdminCaller, service: Service) -> dict[str, Any]:
    return api_key_view(service.principals.revoke_api_key(key_id))


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


__all__ = ["app_from_environment", "create_app"]
