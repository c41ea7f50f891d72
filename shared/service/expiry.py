"""Use case: the expiry scan. Which certificates are nearing their end, announced once per stage.

Device certificates, intermediates and the root are each held against their own threshold (settings
EXPIRY_DEVICE_DAYS, EXPIRY_INTERMEDIATE_DAYS, EXPIRY_ROOT_DAYS: 30, 90 and 365 days by default). Inside
its threshold a certificate is at a stage: the threshold itself, then each of 90, 30, 7 and 1 days below
it ("30d" means at most 30 days left), then "expired". A stage is announced once: the scan claims it in
the ledger with a conditional write (SQLite: a transaction that inserts the stage or changes the one it
read; Tables: a merge on the etag of the row it read), and only the scan whose claim succeeded announces
it, with one JSON message on the `expiring-certificates` queue and one warning log line. So a daily run
repeats nothing, and two scans at once announce each finding once. A message that cannot be sent has its
claim released, and the next scan sends it; a process that dies between the claim and the message loses
that stage's notice (the next stage is announced as usual). Device certificates past their notAfter get
the status `expired` once the "expired" stage is announced.

Where Key Vault holds the CA keys, Key Vault's own expiry of each CA certificate is compared with the
ledger's, and a difference (or a certificate missing from the vault) is a finding of its own, announced
once per difference.

Used by the timer-triggered function (function_app.py), `python cli.py check-expiring`, and the
inventory's `expiringWithinDays` (DeviceUseCases.certificates, which lists without announcing).
"""

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from .. import parameters
from ..errors import CaError, unexpected
from ..ledger.models import (
    CA_ACTIVE,
    DEVICE,
    EXPIRY_TOPIC,
    FACTORY,
    INTERMEDIATE,
    KEY_VAULT_TOPIC,
    ROOT,
    ExpiryWatch,
)
from ..views import iso

log = logging.getLogger("device_ca.expiry")

EXPIRED = "expired"
STAGE_DAYS = (90, 30, 7, 1)  # the stages below a threshold, in days left
KEY_VAULT_MISMATCH = "key-vault-mismatch"
KEY_VAULT_MISSING = "key-vault-missing"
_SAME_MOMENT = timedelta(seconds=1)  # Key Vault and the ledger both keep whole seconds


@dataclass(frozen=True)
class ExpiryThresholds:
    """Days before its notAfter from which a certificate of each kind is a finding."""

    device: float = 30
    intermediate: float = 90
    root: float = 365

    def of(self, kind: str) -> float:
        return {DEVICE: self.device, INTERMEDIATE: self.intermediate, ROOT: self.root}[kind]


def stages(threshold_days: float) -> tuple[float, ...]:
    """The stages of a threshold, in days left, largest first: the threshold, then STAGE_DAYS below it."""
    return (threshold_days, *(days for days in STAGE_DAYS if days < threshold_days))


def stage_name(days: float) -> str:
    return f"{days:g}d"


def stage_of(not_after: datetime, now: datetime, threshold_days: float) -> str | None:
    """The stage of a certificate ending at `not_after`: None outside the threshold, "expired" at or
    after its notAfter, else the smallest stage whose days left are at least what is left ("7d" with 7
    days or less and more than 1 left)."""
    left = not_after - now
    if left <= timedelta(0):
        return EXPIRED
    within = [days for days in stages(threshold_days) if left <= timedelta(days=days)]
    return stage_name(min(within)) if within else None


@dataclass(frozen=True)
class ExpiryFinding:
    """One certificate nearing its end (or past it, or disagreeing with Key Vault).

    `kind` is "device", "intermediate" or "root"; `subject` the device ID or CA ID. `owner_factory` is the
    device's owner when it is a factory (None for admins' devices and for CAs); `factories` those bound to
    an intermediate. `announced` is True when this scan announced it (its stage was new)."""

    kind: str
    serial: str
    subject: str
    not_after: datetime
    stage: str
    days_left: float
    topic: str = EXPIRY_TOPIC
    announced: bool = False
    owner_factory: str | None = None
    factories: tuple[str, ...] = ()
    action: str | None = None
    detail: str | None = None

    def message(self) -> dict[str, Any]:
        """The queue message and the log line's JSON (camelCase, as the HTTP API)."""
        body: dict[str, Any] = {
            "kind": self.kind,
            "serial": self.serial,
            ("deviceId" if self.kind == DEVICE else "caId"): self.subject,
            "ownerFactory": self.owner_factory,
            "notAfter": iso(self.not_after),
            "stage": self.stage,
            "daysLeft": self.days_left,
        }
        if self.kind != DEVICE:
            body["factories"] = list(self.factories)
        if self.topic != EXPIRY_TOPIC:
            body["topic"] = self.topic
        for name, value in (("action", self.action), ("detail", self.detail)):
            if value:
                body[name] = value
        return body

    def view(self) -> dict[str, Any]:
        """The message, and whether this scan announced it (for `check-expiring --json`)."""
        return {**self.message(), "announced": self.announced}


@dataclass(frozen=True)
class ExpiryReport:
    """What one scan found. `findings` are every certificate inside its threshold (those announced by
    this scan have `announced`); `failures` one sentence per announcement that could not be made (its
    stage is released for the next scan); `rows_read` what the ledger's scan reads returned."""

    now: datetime
    thresholds: ExpiryThresholds
    findings: tuple[ExpiryFinding, ...]
    failures: tuple[str, ...] = ()
    rows_read: int = 0

    @property
    def expiring(self) -> bool:
        return bool(self.findings)

    @property
    def announced(self) -> tuple[ExpiryFinding, ...]:
        return tuple(f for f in self.findings if f.announced)

    def view(self) -> dict[str, Any]:
        """The report as JSON (`check-expiring --json`)."""
        t = self.thresholds
        return {
            "now": iso(self.now),
            "thresholdDays": {"device": t.device, "intermediate": t.intermediate, "root": t.root},
            "expiring": self.expiring,
            "findings": [finding.view() for finding in self.findings],
            "announced": len(self.announced),
            "failures": list(self.failures),
            "rowsRead": self.rows_read,
        }


@dataclass
class _Scan:
    now: datetime
    announce: bool
    findings: list[ExpiryFinding] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    owners: dict[str, str | None] = field(default_factory=dict)
    factories: dict[str, tuple[str, ...]] | None = None


class ExpiryUseCases:
    """Mixed into DeviceCA (keys, ledger, settings, clock, and `expiry_queue`, the queue notices go to)."""

    def expiry_thresholds(self, within_days: float | None = None) -> ExpiryThresholds:
        """The thresholds from the settings, or `within_days` for every kind (InvalidParameter unless
        0 < within_days <= MAX_DAYS)."""
        if within_days is not None:
            days = parameters.days(within_days, "within")
            return ExpiryThresholds(days, days, days)
        s = self.settings
        return ExpiryThresholds(s.expiry_device_days, s.expiry_intermediate_days, s.expiry_root_days)

    def scan_expiring(self, *, within_days: float | None = None, announce: bool = True) -> ExpiryReport:
        """Find the certificates inside their thresholds and, with `announce`, announce each new stage once
        (see the module docstring). `within_days` replaces every threshold for a look without announcing
        (InvalidParameter with `announce`: stages are recorded against the settings' thresholds only).
        One announcement that fails never stops the others: it is in `failures`."""
        if within_days is not None and announce:
            raise parameters.InvalidParameter("within", "is for a look without announcing; the scan uses the settings")
        thresholds = self.expiry_thresholds(within_days)
        scan = _Scan(self._now(), announce)
        rows_before = self.ledger.expiry_rows_read
        for watch in self.ledger.ca_expiry_watch():
            if watch.record.status == CA_ACTIVE:
                self._consider(scan, watch, stage_of(watch.not_after, scan.now, thresholds.of(watch.kind)))
        self._check_key_vault(scan)
        horizon = scan.now + timedelta(days=thresholds.device)
        for watch in sorted(self.ledger.expiry_watch(horizon), key=lambda w: (w.not_after, w.subject, w.serial)):
            self._consider(scan, watch, stage_of(watch.not_after, scan.now, thresholds.device))
        rows_read = self.ledger.expiry_rows_read - rows_before
        return ExpiryReport(scan.now, thresholds, tuple(scan.findings), tuple(scan.failures), rows_read)

    # -- internals -----------------------------------------------------------------------------------

    def _consider(self, scan: _Scan, watch: ExpiryWatch, stage: str | None, detail: str | None = None) -> None:
        """Add the finding; with `announce`, claim its stage if new, announce it, and mark an expired
        device certificate. A ledger that fails here fails this finding only (in `failures`)."""
        if stage is None:
            return
        try:
            self._settle(scan, watch, stage, detail)
        except CaError as error:
            scan.failures.append(f"{watch.kind} {watch.subject} ({watch.serial}) at {stage}: {error.message}")
            log.error("the expiry stage of %s %s could not be settled: %s", watch.kind, watch.serial, error.message)

    def _settle(self, scan: _Scan, watch: ExpiryWatch, stage: str, detail: str | None) -> None:
        if not scan.announce or watch.stage == stage:
            scan.findings.append(self._finding(scan, watch, stage, detail))
            if scan.announce and watch.kind == DEVICE and stage == EXPIRED:
                self.ledger.mark_expired(watch, scan.now)  # announced by an earlier scan that stopped short
            return
        claimed = self.ledger.claim_expiry_stage(watch, stage, scan.now)
        if claimed is None:
            return  # another scan claimed it (and announces it), or the certificate stopped being active
        finding = self._finding(scan, watch, stage, detail, details=True)
        try:
            self._announce(finding)
        except Exception as error:
            self.ledger.release_expiry_stage(claimed, watch.stage)
            reason = error.message if isinstance(error, CaError) else unexpected(error, "sending a notice").message
            scan.failures.append(f"{watch.kind} {watch.subject} ({watch.serial}) at {stage}: {reason}")
            log.error("the expiry notice of %s %s could not be sent: %s", watch.kind, watch.serial, reason)
            scan.findings.append(finding)
            return
        scan.findings.append(replace(finding, announced=True))
        if watch.kind == DEVICE and stage == EXPIRED:
            self.ledger.mark_expired(watch, scan.now)

    def _finding(
        self, scan: _Scan, watch: ExpiryWatch, stage: str, detail: str | None, details: bool = False
    ) -> ExpiryFinding:
        """The finding; with `details`, also the device's owner and the factories of an intermediate
        (reads that only a new announcement pays for)."""
        left = (watch.not_after - scan.now).total_seconds() / 86400
        owner = self._owner_factory(scan, watch.subject) if details and watch.kind == DEVICE else None
        factories = self._factories_of(scan, watch.subject) if details and watch.kind == INTERMEDIATE else ()
        return ExpiryFinding(
            kind=watch.kind,
            serial=watch.serial,
            subject=watch.subject,
            not_after=watch.not_after,
            stage=stage,
            days_left=math.floor(left * 100) / 100,
            topic=watch.topic,
            owner_factory=owner,
            factories=factories,
            action=_action(watch, stage, factories) if watch.topic == EXPIRY_TOPIC else None,
            detail=detail,
        )

    def _announce(self, finding: ExpiryFinding) -> None:
        """One message on the expiring-certificates queue, then one warning log line (structured: the
        same JSON in the line and in the record's `expiry` attribute, for Application Insights)."""
        text = json.dumps(finding.message(), sort_keys=True)
        self.expiry_queue.send(text)
        log.warning("certificate expiry notice: %s", text, extra={"expiry": finding.message()})

    def _owner_factory(self, scan: _Scan, device_id: str) -> str | None:
        if device_id not in scan.owners:
            owner = self.ledger.device_owners([device_id]).get(device_id)
            principal = self.ledger.get_principal(owner) if owner else None
            scan.owners[device_id] = owner if principal is not None and principal.role == FACTORY else None
        return scan.owners[device_id]

    def _factories_of(self, scan: _Scan, intermediate_id: str) -> tuple[str, ...]:
        if scan.factories is None:
            bound: dict[str, list[str]] = {}
            for principal in self.ledger.list_principals():
                if principal.role == FACTORY:
                    for ca_id in principal.intermediates:
                        bound.setdefault(ca_id, []).append(principal.id)
            scan.factories = {ca_id: tuple(names) for ca_id, names in bound.items()}
        return scan.factories.get(intermediate_id, ())

    def _check_key_vault(self, scan: _Scan) -> None:
        """Key Vault's expiry of each active CA certificate it holds against the ledger's (a store without
        `certificate_expiries`, such as local key files, has nothing to compare)."""
        read: Callable[[], dict[str, datetime | None]] | None = getattr(self.keys, "certificate_expiries", None)
        if read is None:
            return
        try:
            vault = read()
        except CaError as error:
            scan.failures.append(f"Key Vault's certificate expiries could not be read: {error.message}")
            return
        for watch in self.ledger.ca_expiry_watch(KEY_VAULT_TOPIC):
            ca = watch.record
            if ca.status != CA_ACTIVE or ca.key_backend != getattr(self.keys, "backend", None):
                continue
            ends = vault.get(ca.key_name)
            if ca.key_name not in vault:
                stage, detail = KEY_VAULT_MISSING, f"Key Vault holds no certificate {ca.key_name!r} for this CA"
            elif ends is None or abs(ends - ca.not_after) > _SAME_MOMENT:
                shown = iso(ends) if ends else "no expiry"
                stage = f"{KEY_VAULT_MISMATCH}-{shown}"
                detail = (
                    f"Key Vault's certificate {ca.key_name!r} expires {shown}, the ledger's {iso(ca.not_after)}: "
                    "the vault's certificate was renewed or replaced outside this CA"
                )
            else:
                continue
            self._consider(scan, watch, stage, detail)


def _action(watch: ExpiryWatch, stage: str, factories: tuple[str, ...]) -> str | None:
    """What an admin should do about a CA nearing its end (None for a device: its owner renews it)."""
    end = iso(watch.not_after)
    if watch.kind == INTERMEDIATE:
        bound = ", ".join(factories) if factories else "the factories bound to it"
        return (
            f"intermediate {watch.subject} ends {end}: create its successor (create-ca-intermediate), re-bind "
            f"{bound} to it (bind-factory NAME --intermediate NEW), then disable this one; a device certificate "
            f"never outlives its issuer, so those it signs now get shorter and none can last past {end}"
        )
    if watch.kind == ROOT:
        return (
            f"the root ends {end}: every intermediate and device certificate ends by then; plan a new root "
            "(registered with DPS, with proof of possession) and new intermediates under it"
        )
    return None


__all__ = [
    "EXPIRED",
    "ExpiryFinding",
    "ExpiryReport",
    "ExpiryThresholds",
    "ExpiryUseCases",
    "stage_of",
    "stages",
]
