"""Validity periods: a child never outlives its issuer."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from .errors import ValidityError

# Devices and DPS with slightly wrong clocks reject certificates that are "not yet valid"
# (the seed warns about exactly this), so notBefore is set a little in the past.
DEFAULT_BACKDATE = timedelta(minutes=5)


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
    """The period [now - backdate, now + days], cut to fit inside the issuer's own period."""
    if days <= 0:
        raise ValidityError("invalid-validity", f"validity must be a positive number of days, not {days}")
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
            f"({(issuer_end - now).days} days instead of {days:g})"
        )
        not_after = issuer_end
    return Validity(max(not_before, issuer_start), not_after, clamped)


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return repr(names[0].value) if names else "(no CN)"
