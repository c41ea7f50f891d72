"""The error shape of the API: `{"error": {"code", "message"}}`, a 4xx for anything the caller sent.

A 5xx answer carries its code and an error ID and nothing else of the server (no paths, settings or
backend messages): the details are logged with that ID.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BackendUnavailable, CaError, for_callers, shown_to_callers, unexpected
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
    """Every error answer of the API, its message as callers may be shown it (`shown_to_callers`)."""
    body = {"error": {"code": code, "message": shown_to_callers(message)}}
    return JSONResponse(body, status_code=status, headers=headers)


def ca_error_response(request: Request, error: CaError) -> JSONResponse:
    """The answer to a CaError: as it is for a 4xx; for a 5xx, its code and an error ID (see `for_callers`)."""
    error = for_callers(error, f"answering {request.method} {request.url.path}")
    headers = {}
    if isinstance(error, BackendUnavailable):
        headers["Retry-After"] = str(error.retry_after)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(error.status, error.code, error.message, headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CaError)
    async def ca_error(request: Request, error: CaError) -> JSONResponse:
        return ca_error_response(request, error)

    @app.exception_handler(PkiError)
    async def pki_error(request: Request, error: PkiError) -> JSONResponse:
        return error_response(400, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        return error_response(400, validation_code(errors), describe_validation(errors))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(error.status_code, "http-error")
        message = str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        elif error.status_code == 405 and message == "Method Not Allowed":
            message = f"{request.url.path} does not take {request.method}"
        return error_response(error.status_code, code, message, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        failure = unexpected(error, f"answering {request.method} {request.url.path}")
        return error_response(failure.status, failure.code, failure.message)


# FastAPI's default answer to a validation error, which this API never gives (see document_errors).
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what the API answers to a request that is not valid: the 400 in the
    error shape (`_ERRORS` in app.py puts it on every route), never FastAPI's default 422
    HTTPValidationError, which FastAPI lists on every route with parameters or a body although the
    handler above answers 400 instead."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in _FASTAPI_VALIDATION:
                schemas.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def describe(error: dict[str, Any]) -> str:
    """One pydantic error as the rest of a sentence that starts with the field's name. The parameters'
    own rules (shared/parameters.py) raise ValueError with their words; these are pydantic's others."""
    kind, context = error.get("type", ""), error.get("ctx") or {}
    match kind:
        case "value_error":
            return str(context.get("error", error.get("msg", "is not valid")))
        case "missing":
            return "is required"
        case "extra_forbidden":
            return "is not a field this route takes"
        case "string_type":
            return "must be a string"
        case "bool_parsing" | "bool_type":
            return "must be true or false"
        case "int_parsing" | "int_type" | "int_from_float":
            return "must be a whole number"
        case "float_parsing" | "float_type" | "finite_number":
            return "must be a finite number"
        case "dict_type" | "model_type" | "model_attributes_type":
            return "must be a JSON object"
        case "list_type":
            return "must be a list"
        case "literal_error":
            return f"must be one of {str(context.get('expected', '')).replace(chr(39), '')}"
        case "too_short":
            return f"must have at least {context.get('min_length')} item(s)"
        case "string_too_long":
            return f"must be at most {context.get('max_length')} characters"
        case "greater_than":
            return f"must be more than {context.get('gt')}"
        case "less_than_equal":
            return f"must be at most {context.get('le')}"
    return str(error.get("msg", "is not valid")).replace("Input should be", "must be", 1)


def validation_code(errors: list[dict]) -> str:
    """The code of a 400 for pydantic's errors: invalid-request, or the rule's own code when every error is
    one rule's of shared/parameters.py that has one (invalid-device-id, invalid-ca-id, as the CLI's --json)."""
    codes = {getattr((item.get("ctx") or {}).get("error"), "code", None) for item in errors}
    return codes.pop() if len(codes) == 1 and None not in codes else "invalid-request"


def describe_validation(errors: list[dict]) -> str:
    """Pydantic's errors as one line: "where: what is wrong; ..." in the words of shared/parameters."""
    parts = []
    for item in errors:
        if item.get("type") in ("json_invalid", "json_type"):
            detail = (item.get("ctx") or {}).get("error") or item.get("msg", "")
            parts.append(f"the body is not valid JSON ({detail})" if detail else "the body is not valid JSON")
            continue
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        if location and location[0] in ("query", "path", "header"):
            location = location[1:]
        where = ".".join(location) or "the body"
        parts.append(f"{where}: {describe(item)}")
    return "; ".join(parts) or "the request is not valid"
