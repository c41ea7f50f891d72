"""Revocation reasons: the CRLReason names of RFC 5280 §5.3.1."""

from .errors import PkiError

# RFC 5280 §5.3.1, in code order (7 is unused). certificateHold and removeFromCRL are left out: a hold is
# a temporary state and this CA's revocations are final.
REVOCATION_REASONS = (
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "privilegeWithdrawn",
    "aACompromise",
)
_BY_FOLDED = {name.lower(): name for name in REVOCATION_REASONS}
_NOT_FINAL = ("certificatehold", "removefromcrl")


def revocation_reason(text: str | None) -> str:
    """The RFC 5280 reason name for `text` (any case; None is "unspecified"). PkiError "invalid-reason" otherwise."""
    folded = (text or "unspecified").strip().lower()
    if folded in _BY_FOLDED:
        return _BY_FOLDED[folded]
    if folded in _NOT_FINAL:
        raise PkiError("invalid-reason", "this CA does not put certificates on hold: a revocation is final")
    raise PkiError(
        "invalid-reason",
        f"revocation reason {text!r} is not one of RFC 5280's: {', '.join(REVOCATION_REASONS)}",
    )
