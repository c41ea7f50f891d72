"""The error shape of the API: `{"error": {"code", "message"}}`, a 4xx for anything the caller sent."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BackendUnavailable, CaError
from ..pki import PkiError

log = logging.getLogger("device_ca.api")

_HTTP_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    413: "body-too-large",
    415: "unsupported-media-type",
}


class UnsupportedMediaType(CaError):
    status = 415
    code = "unsupported-media-type"


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CaError)
    async def ca_error(request: Request, error: CaError) -> JSONResponse:
        headers = {}
        if isinstance(error, BackendUnavailable):
            headers["Retry-After"] = str(error.retry_after)
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if error.status >= 500:
            log.error("%s %s: %s (%s)", request.method, request.url.path, error.message, error.code)
        return error_response(error.status, error.code, error.message, headers)

    @app.exception_handler(PkiError)
    async def pki_error(request: Request, error: PkiError) -> JSONResponse:
        return error_response(400, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid-request", _describe_validation(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(error.status_code, "http-error")
        message = str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(error.status_code, code, message, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal-error", "the service failed unexpectedly; the error is logged")


def _describe_validation(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {item.get('msg', 'is not valid')}")
    return "; ".join(parts) or "the request is not valid"
