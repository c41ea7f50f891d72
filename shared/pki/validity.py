"""Validity periods: a child never outlives its issuer."""

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from .errors import ValidityError

# Devices and DPS with slightly wrong clocks reject certificates that are "not yet valid"
# (the seed warns about exactly this), so notBefore is set a little in the past.
DEFAULT_BACKDATE = timedelta(minutes=5)

MAX_DAYS = 36500  # a hundred years: longer than any device or CA lives, and far inside datetime's range
MIN_CA_VALIDITY = timedelta(days=1)


@dataclass(frozen=True)
class Validity:
    not_before: datetime
    not_after: datetime
    clamped: str | None = None  # why the period is shorter than asked, when it is

    @property
    def days(self) -> float:
        return (self.not_after - self.not_before).total_seconds() / 86400


def whole_seconds(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def plan_validity(
    now: datetime,
    days: float,
    issuer: x509.Certificate | None = None,
    backdate: timedelta = DEFAULT_BACKDATE,
) -> Validity:
    """The period [now - backdate, now + days], cut to fit inside the issuer's own period.

    ValidityError "invalid-validity" for days that are not a finite number in (0, MAX_DAYS];
    "issuer-expired" / "issuer-not-yet-valid" when the issuer cannot sign now."""
    if not (isinstance(days, int | float) and math.isfinite(days) and 0 < days <= MAX_DAYS):
        raise ValidityError("invalid-validity", f"validity must be a number of days in (0, {MAX_DAYS}], not {days}")
    not_before = whole_seconds(now - backdate)
    not_after = whole_seconds(now + timedelta(days=days))
    if issuer is None:
        return Validity(not_before, not_after)
    issuer_start = issuer.not_valid_before_utc
    issuer_end = issuer.not_valid_after_utc
    if issuer_end <= now:
        raise ValidityError("issuer-expired", f"the issuer {_cn(issuer)} expired at {issuer_end:%Y-%m-%d %H:%M:%SZ}")
    if issuer_start > now:
        raise ValidityError(
            "issuer-not-yet-valid", f"the issuer {_cn(issuer)} is not valid before {issuer_start:%Y-%m-%d %H:%M:%SZ}"
        )
    clamped = None
    if not_after > issuer_end:
        clamped = (
            f"validity cut to end with the issuer {_cn(issuer)} at {issuer_end:%Y-%m-%d %H:%M:%SZ} "
            f"({(issuer_end - now).total_seconds() / 86400:.1f} days instead of {days:g})"
        )
        not_after = issuer_end
    return Validity(max(not_before, issuer_start), not_after, clamped)


def check_ca_validity(validity: Validity) -> Validity:
    """A CA certificate must live at least MIN_CA_VALIDITY from its start: one that ends sooner (asked for
    too few days, or cut by an issuer near its end) could sign nothing useful. ValidityError otherwise."""
    if validity.not_after - validity.not_before < MIN_CA_VALIDITY:
        raise ValidityError(
            "validity-too-short",
            f"a CA certificate must be valid for at least a day; this one would end at "
            f"{validity.not_after:%Y-%m-%d %H:%M:%SZ}" + (f" ({validity.clamped})" if validity.clamped else ""),
        )
    return validity


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return repr(names[0].value) if names else "(no CN)"
