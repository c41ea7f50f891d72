"""Errors of the service and its adapters. Each has a stable code and the HTTP status it maps to."""

import logging
import uuid

log = logging.getLogger("device_ca")


class CaError(Exception):
    """Base of every error the service reports to a caller."""

    status = 400
    code = "bad-request"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class NotFound(CaError):
    status = 404
    code = "not-found"


class Conflict(CaError):
    status = 409
    code = "conflict"


class Unauthorized(CaError):
    status = 401
    code = "unauthorized"


class Forbidden(CaError):
    status = 403
    code = "forbidden"


class BackendUnavailable(CaError):
    """A backend (Key Vault, the ledger, DPS) did not answer in time; the caller may retry later."""

    status = 503
    code = "backend-unavailable"

    def __init__(self, message: str, code: str | None = None, retry_after: int = 5) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


class Misconfigured(CaError):
    """The service's own settings are wrong (a missing passphrase, say): not the caller's fault."""

    status = 500
    code = "misconfigured"


class InternalError(CaError):
    """Something failed that the caller did not cause. The message carries an error ID and nothing else;
    the details are logged under that ID."""

    status = 500
    code = "internal-error"


def unexpected(error: BaseException, context: str) -> InternalError:
    """Log an unexpected exception under a new error ID and return the error a caller may see."""
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error %s while %s", error_id, context, exc_info=error)
    return InternalError(f"the service failed unexpectedly while {context}; error ID {error_id}")
