"""The rules for the parameters callers pass, in one place: the HTTP API (through shared/api/models.py),
the CLI (as argparse types) and the service check values with these, and say what is wrong in the same
words ("must be more than 0, not '-5'").

Each rule takes what a caller sent (a string from a command line or a query, or a number from JSON)
and returns the value to use, or raises InvalidParameter.
"""

import math
import re
from typing import Any

from .errors import CaError
from .ledger.models import CERT_STATUSES
from .pki import PkiError, check_ca_id, check_device_id
from .pki.validity import MAX_DAYS

MAX_PAGE = 1000
DEFAULT_PAGE = 100
# a ledger's own continuation token: digits on SQLite, base64url of Table Storage's on Tables
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,1024}")
CURSOR_PATTERN = "^[A-Za-z0-9_-]{1,1024}$"
# shared/pki/names.py's rules in words, for help texts and the OpenAPI document (the checks are its own)
DEVICE_ID_RULE = "a DPS registration ID: lowercase a-z, 0-9 and - . _ :, not starting or ending with - . _ :"
CA_ID_RULE = "1-48 lowercase letters, digits and '-', starting and ending with a letter or digit"
MAX_CA_ID = 48


class InvalidParameter(CaError):
    """A parameter's value breaks its rule: HTTP 400, and on the command line a usage error (status 2).
    `problem` is the message without the parameter's name, for callers that name it their own way; `code`
    (default invalid-request) is the rule's own where it has one (invalid-device-id, invalid-ca-id)."""

    status = 400
    code = "invalid-request"

    def __init__(self, name: str, problem: str, code: str | None = None) -> None:
        super().__init__(f"{name} {problem}", code)
        self.problem = problem


def days(value: Any, name: str = "days") -> float:
    """A number of days: finite, more than 0 and at most MAX_DAYS (a validity, an expiry window)."""
    number = _number(value, name, float)
    if not math.isfinite(number):
        raise InvalidParameter(name, f"must be a finite number, not {_shown(value)}")
    if not 0 < number <= MAX_DAYS:
        raise InvalidParameter(name, f"must be more than 0 and at most {MAX_DAYS}, not {_shown(value)}")
    return number


def page_limit(value: Any, name: str = "limit") -> int:
    """How many items a page holds: a whole number from 1 to MAX_PAGE."""
    number = _number(value, name, int)
    if not 1 <= number <= MAX_PAGE:
        raise InvalidParameter(name, f"must be 1-{MAX_PAGE}, not {_shown(value)}")
    return number


def cursor(value: Any, name: str = "cursor") -> str:
    """Where a page starts: a previous page's nextCursor, and nothing else."""
    if not isinstance(value, str) or not _CURSOR.fullmatch(value):
        raise InvalidParameter(name, f"must be a previous page's nextCursor, not {_shown(value)}")
    return value


def status(value: Any, name: str = "status") -> str:
    """A certificate status: active, superseded, revoked or expired."""
    if value not in CERT_STATUSES:
        raise InvalidParameter(name, f"must be one of {', '.join(CERT_STATUSES)}, not {_shown(value)}")
    return value


def device_id(value: Any, name: str = "deviceId") -> str:
    """A device ID (= DPS registration ID = the certificate's CN), by the rule the CLI's --device-id and the
    signing routes check (shared/pki/names.py check_device_id), in its words and with its code
    (invalid-device-id): "device ID 'BAD ID' is not a valid DPS registration ID: it contains spaces ..."."""
    return _named(check_device_id, value, name)


def ca_id(value: Any, name: str = "intermediateId") -> str:
    """An intermediate's (CA's) ID, by the rule the CLI's --intermediate checks (shared/pki/names.py
    check_ca_id), in its words and with its code (invalid-ca-id)."""
    return _named(check_ca_id, value, name)


def principal_name(value: Any, name: str = "requestedBy") -> str:
    """A principal's (factory's or admin's) name, by the rule the CLI's factory and admin names check
    (shared/service/access.py check_principal_name: a CA ID's), with its code (invalid-principal-name)."""
    from .service.access import check_principal_name  # the rule's owner; imported late (it imports this)

    def check(text: str) -> str:
        check_principal_name(text)
        return text

    return _named(check, value, name)


def unicode_text(text: str) -> bool:
    """Whether `text` is Unicode text that UTF-8 can hold: JSON's escapes can spell a lone surrogate
    ("\\ud800", RFC 8259 §8.2), which no store, certificate or JSON answer can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


CLI_REQUESTER = "cli:"  # what the CLI records as the requester when it signs on the CA host for no factory
MAX_REQUESTER = 260


def requester(value: Any, name: str = "requestedBy") -> str:
    """Who asked for a certificate, as the inventory shows it: a principal's name (`principal_name`), or
    "cli:<user>" for what `python cli.py` signed on the CA host without --factory (the user's login name as
    the system gives it, spaces too: at most MAX_REQUESTER printable characters)."""
    if isinstance(value, str) and value.startswith(CLI_REQUESTER):
        user = value.removeprefix(CLI_REQUESTER)
        if not user.strip() or len(value) > MAX_REQUESTER or not user.isprintable():
            raise InvalidParameter(name, f"must be a principal's name or cli:<user>, not {_shown(value)}")
        return value
    return principal_name(value, name)


def _named(check: Any, value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidParameter(name, f"must be a string, not {_shown(value)}")
    try:
        return check(value)
    except PkiError as error:
        raise InvalidParameter(name, error.message, error.code) from None


def _number(value: Any, name: str, kind: type) -> Any:
    if isinstance(value, bool):
        raise InvalidParameter(name, f"must be a number, not {_shown(value)}")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            return int(value)
        raise InvalidParameter(name, f"must be a whole number, not {_shown(value)}")
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(name, f"must be a number, not {_shown(value)}") from None


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return repr(text[:40] + "..." if len(text) > 40 else text)
