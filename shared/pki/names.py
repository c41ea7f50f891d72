"""Name rules: DPS registration IDs (= device IDs = device CNs), CA identifiers, verification codes."""

import re

from .errors import CsrRejected, PkiError

# DPS registration IDs are alphanumerics and "-._:", no special character first or last, at most 128
# characters; X.509's CN upper bound (RFC 5280 ub-common-name) makes it 64 here. We take lowercase only
# so that one device cannot appear under two spellings (DPS compares case-insensitively).
MAX_REGISTRATION_ID = 64
_REGISTRATION_ID = re.compile(r"[a-z0-9](?:[a-z0-9._:-]*[a-z0-9])?")
_ALLOWED = set("abcdefghijklmnopqrstuvwxyz0123456789-._:")
_SPECIAL = set("-._:")

# CA identifiers become Key Vault certificate names ([0-9a-zA-Z-]) and DPS enrollment group IDs.
_CA_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?")

# DPS verification codes are hexadecimal today; allow what fits in a CN without surprises.
_VERIFICATION_CODE = re.compile(r"[A-Za-z0-9-]{1,64}")


def registration_id_problem(value: str) -> str | None:
    """Why `value` is not a valid registration ID, or None when it is."""
    if not value:
        return "it is empty"
    if len(value) > MAX_REGISTRATION_ID:
        return f"it is {len(value)} characters long, the limit is {MAX_REGISTRATION_ID}"
    bad = sorted({_describe(c) for c in value if c not in _ALLOWED})
    if bad:
        return f"it contains {', '.join(bad)} (allowed: lowercase a-z, 0-9 and - . _ :)"
    if value[0] in _SPECIAL or value[-1] in _SPECIAL:
        return "it starts or ends with one of - . _ :"
    if not _REGISTRATION_ID.fullmatch(value):  # pragma: no cover - the checks above are exhaustive
        return "it does not follow the DPS registration ID rules"
    return None


def check_device_id(device_id: str) -> str:
    problem = registration_id_problem(device_id)
    if problem:
        raise CsrRejected("invalid-device-id", f"device ID {device_id!r} is not a valid DPS registration ID: {problem}")
    return device_id


def check_ca_id(ca_id: str) -> str:
    if not _CA_ID.fullmatch(ca_id):
        raise PkiError(
            "invalid-ca-id",
            f"CA ID {ca_id!r} is not valid: use 1-48 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
        )
    return ca_id


def check_verification_code(code: str) -> str:
    if not _VERIFICATION_CODE.fullmatch(code or ""):
        raise PkiError(
            "invalid-verification-code",
            f"verification code {code!r} is not valid: expected 1-64 letters, digits or '-' as DPS shows it",
        )
    return code


def _describe(char: str) -> str:
    if char.isupper():
        return "uppercase letters"
    if char == " ":
        return "spaces"
    if char.isprintable():
        return repr(char)
    return f"U+{ord(char):04X}"
