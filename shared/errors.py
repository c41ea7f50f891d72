"""Errors of the service and its adapters. Each has a stable code and the HTTP status it maps to."""

import copy
import logging
import re
import uuid

log = logging.getLogger("device_ca")


class CaError(Exception):
    """Base of every error the service reports to a caller."""

    status = 400
    code = "bad-request"
    summary = "the service failed"  # what a remote caller is told of a 5xx, beside its code and an error ID
    error_id: str | None = None  # under which the log has the details, for a 5xx

    def __init__(self, message: str, code: str | None = None) -> None:
        """`message` says what is wrong, for a person; `code` (default: the class's) is the stable code.
        TypeError when either is not text: every answer names what is wrong, and a code is a contract."""
        if not isinstance(message, str) or not (code is None or isinstance(code, str)):
            raise TypeError(f"{type(self).__name__} needs a message and a code that are text")
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
    summary = "a backend the service needs is unavailable; try again later (the same request again is safe)"

    def __init__(self, message: str, code: str | None = None, retry_after: int = 5) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


class Misconfigured(CaError):
    """The service's own settings are wrong (a missing passphrase, say): not the caller's fault."""

    status = 500
    code = "misconfigured"
    summary = "the service is misconfigured; its operator has the details"


class InternalError(CaError):
    """Something failed that the caller did not cause. The message carries an error ID and nothing else;
    the details are logged under that ID."""

    status = 500
    code = "internal-error"


def unexpected(error: BaseException, context: str) -> InternalError:
    """Log an unexpected exception under a new error ID and return the error a caller may see."""
    error_id = new_error_id()
    log.error("unexpected error %s while %s", error_id, context, exc_info=error, extra={"error_id": error_id})
    failure = InternalError(f"the service failed unexpectedly while {context}; error ID {error_id}")
    failure.error_id = error_id
    return failure


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def for_callers(error: CaError, context: str) -> CaError:
    """What a remote caller may see of `error`. A 4xx is the caller's own business and stays as it is. A
    5xx (a misconfiguration, a backend down) is logged in full under a new error ID, and the caller gets a
    copy with the same status and code but a message of the error's kind and the ID only: no paths,
    settings or backend messages leave the server."""
    if error.status < 500 or isinstance(error, InternalError):
        return error
    error_id = new_error_id()
    log.error("error %s (%s) while %s: %s", error_id, error.code, context, error.message, extra={"error_id": error_id})
    public = copy.copy(error)
    public.message = f"{error.summary}; error ID {error_id}"
    public.args = (public.message,)
    public.error_id = error_id
    return public


MAX_SHOWN_MESSAGE = 1_000  # characters of an error message a caller is shown
# a run of base64url characters with a lower-case letter, an upper-case letter and a digit, 16 or more long:
# an API key's secret (43 random characters) whole or cut, and never an ID, a serial, a device ID or a
# setting's name (lower case, upper-case hex, or upper case alone)
_SECRET_LIKE = re.compile(r"(?=[A-Za-z0-9_-]*[a-z])(?=[A-Za-z0-9_-]*[A-Z])(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{16,}")


def shown_to_callers(message: str) -> str:
    """`message` as an HTTP answer, a batch item's result or a CLI error line may show it, since those end
    up in logs and terminals: an API key pasted where a serial, a device ID or a key ID belonged keeps its
    key ID and loses its secret ("dca_<id>_<secret>"); anything else that looks like a secret (the secret
    alone, a key of another shape, a key cut short) becomes "<hidden>"; and at most MAX_SHOWN_MESSAGE
    characters are kept, so that a 30,000-character device ID sent back in its refusal cannot make the
    answer 30 KB."""
    from .service.access import hide_api_key_secrets  # the key format's one owner (imported late: no cycle)

    message = hide_api_key_secrets(message)
    if len(message) > MAX_SHOWN_MESSAGE:  # first: the search below takes time growing with a run's square
        message = message[: MAX_SHOWN_MESSAGE - 1] + "…"
    return _SECRET_LIKE.sub("<hidden>", message)
