"""Use cases of device certificates: signing CSRs (one, many, coalesced), the inventory, revocation.

Mixed into `DeviceCA`, which holds the key store, the ledger, DPS, the settings and the clock.
"""

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from .. import parameters
from ..dps import DpsConflict
from ..errors import CaError, Conflict, Forbidden, NotFound, unexpected
from ..ledger import device_has_certificate, device_owned_elsewhere, key_in_use, key_revoked
from ..ledger.models import (
    CA_ACTIVE,
    CERT_ACTIVE,
    CERT_REVOKED,
    CaRecord,
    CertificatePage,
    CertificateQuery,
    CertificateRecord,
    Issuance,
    Revocation,
)
from ..pki import (
    DeviceRequest,
    Issuer,
    PkiError,
    check_device_csr,
    whole_seconds,
)
from ..pki.revocation import revocation_reason
from .common import (
    RENEWAL_RETRY_WINDOW,
    IssuedCertificate,
    SignRequest,
    _as_ca_error,
    _renewal_retry,
    normalize_serial,
    pem,
    serial_text,
)

DPS_CONFLICT_ATTEMPTS = 3  # writes of one device's enrollment that may meet another writer's newer etag


@dataclass(frozen=True)
class _SignOptions:
    """Who asks and how. `allowed_intermediates` None is an admin (or the CA host's CLI): any
    intermediate, any device. A tuple is a factory: those intermediates, and only the devices it owns."""

    intermediate_id: str | None
    requested_by: str
    renew: bool
    allowed_intermediates: Sequence[str] | None

    @property
    def claimed_owner(self) -> str | None:
        """The owner a device must have for this caller: the factory itself; None for an admin."""
        return None if self.allowed_intermediates is None else self.requested_by


@dataclass
class _Plan:
    """One device request on its way through a signing run."""

    index: int
    request: DeviceRequest
    supersede: bool
    warnings: list[str] = field(default_factory=list)
    certificate: x509.Certificate | None = None


@dataclass
class _Run:
    """One signing run: its results so far, and the certificates signed but not yet committed."""

    now: datetime
    intermediate: CaRecord | None  # read only when the run has something to sign
    requested_by: str
    owner: str | None  # the owner the ledger must find (or make) for each device: see _SignOptions
    results: list["IssuedCertificate | CaError | None"]
    signed: list[_Plan] = field(default_factory=list)
    issuances: list[Issuance] = field(default_factory=list)


def _intermediate_not_allowed(ca_id: str) -> Forbidden:
    return Forbidden(f"this caller may not sign with intermediate {ca_id!r}", "intermediate-not-allowed")


def _intermediate_not_used(active: CertificateRecord, options: _SignOptions) -> tuple[str, ...]:
    """The warning for an answer from the ledger (the same CSR again, a renewal retried) to a request that
    named another intermediate than the one that issued the certificate it gets back."""
    if options.intermediate_id is None or options.intermediate_id == active.intermediate_id:
        return ()
    return (
        f"this CSR's certificate was issued before, by intermediate {active.intermediate_id!r}: it is given "
        f"back, and intermediate {options.intermediate_id!r} was not used (renew to have it sign)",
    )


def _single(results: list["IssuedCertificate | CaError"]) -> "IssuedCertificate":
    (result,) = results
    if isinstance(result, CaError):
        raise result
    return result


class DeviceUseCases:
    # -- device certificates -------------------------------------------------------------------------

    def sign_csr(
        self,
        csr: bytes | str,
        device_id: str,
        *,
        intermediate_id: str | None = None,
        requested_by: str = "cli",
        renew: bool = False,
        allowed_intermediates: Sequence[str] | None = None,
    ) -> IssuedCertificate:
        """Sign one device CSR. The same CSR again gives back the same certificate (`created` False)."""
        options = _SignOptions(intermediate_id, requested_by, renew, allowed_intermediates)
        return _single(self._sign_and_commit([SignRequest(csr, device_id)], options))

    async def sign_csr_async(
        self,
        csr: bytes | str,
        device_id: str,
        *,
        intermediate_id: str | None = None,
        requested_by: str = "cli",
        renew: bool = False,
        allowed_intermediates: Sequence[str] | None = None,
    ) -> IssuedCertificate:
        """`sign_csr` for an event loop. Concurrent requests with the same options are signed together in
        one run and committed together (see `Coalescer`). With local keys and ledger the signing (CPU only)
        runs on the loop and only the commit is waited for; with a remote key store or ledger, in a thread."""
        allowed = tuple(allowed_intermediates) if allowed_intermediates is not None else None
        options = _SignOptions(intermediate_id, requested_by, renew, allowed)
        result = await self._coalescer.submit(options, SignRequest(csr, device_id))
        if isinstance(result, CaError):
            raise result
        return result

    async def _sign_batch_async(
        self, options: "_SignOptions", requests: Sequence[SignRequest]
    ) -> list[IssuedCertificate | CaError]:
        if self.keys.remote or self.ledger.remote:
            return await asyncio.to_thread(self._sign_and_commit, requests, options)
        run = self._sign_run(requests, options)
        stored = await self.ledger.record_issued_async(run.issuances) if run.issuances else []
        return self._finish(run, stored)

    def sign_csrs(
        self,
        requests: Sequence[SignRequest],
        *,
        intermediate_id: str | None = None,
        requested_by: str = "cli",
        renew: bool = False,
        allowed_intermediates: Sequence[str] | None = None,
    ) -> list[IssuedCertificate | CaError]:
        """Sign many device CSRs with one intermediate and commit them together.

        Each request gets its certificate or the error that refused it; one bad CSR does not stop the
        rest, and nothing is returned that the ledger does not hold.
        """
        options = _SignOptions(intermediate_id, requested_by, renew, allowed_intermediates)
        return self._sign_and_commit(requests, options)

    def _sign_and_commit(self, requests: Sequence[SignRequest], options: "_SignOptions") -> list:
        run = self._sign_run(requests, options)
        stored = self.ledger.record_issued(run.issuances) if run.issuances else []
        return self._finish(run, stored)

    def _sign_run(self, requests: Sequence[SignRequest], options: "_SignOptions") -> "_Run":
        """Check every request, decide against the ledger, and sign what may be signed."""
        now = self._now()
        allowed = options.allowed_intermediates
        if options.intermediate_id is not None and allowed is not None and options.intermediate_id not in allowed:
            raise _intermediate_not_allowed(options.intermediate_id)
        run = _Run(now, None, options.requested_by, options.claimed_owner, [None] * len(requests))
        devices: list[tuple[int, DeviceRequest]] = []
        for index, request in enumerate(requests):
            try:
                devices.append((index, check_device_csr(request.csr, request.device_id)))
            except (CaError, PkiError) as error:
                run.results[index] = _as_ca_error(error)
            except Exception as error:  # one request's surprise is its own failure, never its neighbours'
                run.results[index] = unexpected(error, "reading a CSR")
        known = self.ledger.precheck(
            [device.device_id for _, device in devices], [device.public_key_sha256 for _, device in devices]
        )
        plans: list[_Plan] = []
        for index, device in devices:
            try:
                outcome = self._plan(
                    index,
                    device,
                    options,
                    now,
                    known.owners.get(device.device_id),
                    known.bindings.get(device.public_key_sha256),
                    known.actives.get(device.device_id),
                )
            except CaError as error:
                run.results[index] = error
                continue
            except Exception as error:
                run.results[index] = unexpected(error, "checking a device request against the ledger")
                continue
            if isinstance(outcome, IssuedCertificate):
                run.results[index] = outcome
            else:
                plans.append(outcome)
        if not plans:  # only answers from the ledger: a same-CSR retry costs no CA read
            return run
        # The intermediate's record is read fresh for every run that signs: a disable takes effect at once
        # on every instance.
        run.intermediate = self._signing_intermediate(options.intermediate_id, allowed)
        self._sign_all(self._issuer(run.intermediate), plans, now, run.results)
        run.signed = [plan for plan in plans if run.results[plan.index] is None]
        run.issuances = [self._issuance(plan, run) for plan in run.signed]
        return run

    def _finish(self, run: "_Run", stored: list[CertificateRecord | CaError]) -> list[IssuedCertificate | CaError]:
        for plan, issuance, outcome in zip(run.signed, run.issuances, stored, strict=True):
            if isinstance(outcome, CaError):
                run.results[plan.index] = outcome
            else:
                created = outcome.serial == issuance.record.serial
                warnings = tuple(plan.warnings) if created else ()
                run.results[plan.index] = self._issued(outcome, created, warnings, run.intermediate)
        missing = [index for index, result in enumerate(run.results) if result is None]
        if missing:  # every request has been given its answer above; this guards the promise of one each
            raise AssertionError(f"signing run left requests {missing} without an answer")
        return self._with_dps_in_step(run.results)  # type: ignore[arg-type]

    def _with_dps_in_step(self, results: list[IssuedCertificate | CaError]) -> list[IssuedCertificate | CaError]:
        """After a commit: DPS kept in step for the certificates answered to devices with a revocation; a
        device whose enrollment could not be written gets that said in its answer's warnings. Certificates
        answered from the ledger (created False) too: the first attempt may have committed and then lost its
        answer or died before DPS was written, and its retry is then the only one left to admit the device."""
        answered = [r.record.device_id for r in results if isinstance(r, IssuedCertificate)]
        if not answered:
            return list(results)
        states = self._keep_dps_in_step(self.ledger.devices_with_revocations(answered))
        failed = {device_id: state["message"] for device_id, state in states.items() if state.get("mode") == "failed"}
        return [
            replace(r, warnings=(*r.warnings, failed[r.record.device_id]))
            if isinstance(r, IssuedCertificate) and r.record.device_id in failed
            else r
            for r in results
        ]

    def certificates(self, query: CertificateQuery) -> CertificatePage:
        """A page of the inventory. InvalidParameter for a status, limit or cursor that breaks its rule.
        A listing of expiring certificates holds only active ones unless a status is asked for."""
        if query.status is not None:
            parameters.status(query.status)
        elif query.expiring_before is not None:
            query = replace(query, status=CERT_ACTIVE)
        parameters.page_limit(query.limit)
        if query.cursor is not None:
            parameters.cursor(query.cursor)
        return self.ledger.list_certificates(query)

    def certificate(self, serial: str) -> CertificateRecord:
        record = self.ledger.get_certificate(normalize_serial(serial))
        if record is None:
            raise NotFound(f"no certificate with serial {serial}", "certificate-not-found")
        return record

    def expiring_before(self, days: float) -> datetime:
        """The moment `days` from now (InvalidParameter unless 0 < days <= MAX_DAYS)."""
        return self._now() + timedelta(days=parameters.days(days, "expiringWithinDays"))

    def revoke(self, serial: str, reason: str | None = None) -> tuple[Revocation, dict[str, Any]]:
        """Revoke a certificate and its key: in one ledger commit, every active certificate holding the key
        is revoked too, and the key is never certified again. `reason` is an RFC 5280 §5.3.1 name
        (PkiError "invalid-reason" otherwise; default "unspecified"). DPS is then kept in step for the
        device (DESIGN "Revocation and DPS"): blocked while none of its certificates is active, else
        admitting only the active one. NotFound for an unknown serial."""
        reason = revocation_reason(reason)
        record = self.certificate(serial)
        revocation = self.ledger.revoke_certificate(record.serial, reason, self._now())
        device_id = revocation.record.device_id
        return revocation, self._keep_dps_in_step({device_id})[device_id]

    def _keep_dps_in_step(self, device_ids: set[str]) -> dict[str, dict[str, Any]]:
        """Put each device's individual DPS enrollment in step with the ledger as it is now (DESIGN "Revocation
        and DPS"): disabled while none of its certificates is active, else enabled holding only the active one.
        Called after every commit that revokes, or issues for a device with a revoked certificate. The device's
        DPS lock makes each read-then-write whole, so the last writer wrote what the ledger last held.

        It runs after the ledger's commit, which stands whatever happens here: a device whose enrollment could
        not be written gets the state {"mode": "failed", "message", "error"} (logged under an error ID), and
        revoking again puts it in step."""
        states = {}
        for device_id in sorted(device_ids):
            try:
                states[device_id] = self._put_device_enrollment(device_id)
            except Exception as error:
                logged = unexpected(error, f"updating the DPS enrollment of {device_id}")  # details under an ID
                code = error.code if isinstance(error, CaError) else logged.code
                reference = logged.message.rsplit("; ", 1)[-1]
                states[device_id] = {
                    "mode": "failed",
                    "error": code,
                    "message": f"the ledger holds the change, but DPS was not updated for device {device_id!r} "
                    f"({code}, {reference}); {self._dps_repair(device_id)}",
                }
        return states

    def _dps_repair(self, device_id: str) -> str:
        """How to put a device's enrollment in step later: revoking any of its revoked certificates again
        changes nothing in the ledger and writes DPS from the ledger as it is then."""
        try:
            revoked = self.ledger.list_certificates(CertificateQuery(device_id=device_id, status=CERT_REVOKED, limit=1))
            serial = revoked.items[0].serial
        except Exception:  # the repair is still the same; only its serial could not be named
            return "revoke a revoked certificate of the device again to put DPS in step"
        return f"run revoke {serial} again (it changes nothing else) to put DPS in step"

    def _put_device_enrollment(self, device_id: str) -> dict[str, Any]:
        """One device's enrollment written from the ledger as it is now. DPS's etag makes the write fail
        (DpsConflict) when another process wrote it since we read it: the ledger is then read again."""
        for _ in range(DPS_CONFLICT_ATTEMPTS - 1):
            try:
                return self._put_device_enrollment_once(device_id)
            except DpsConflict:
                continue
        return self._put_device_enrollment_once(device_id)

    def _put_device_enrollment_once(self, device_id: str) -> dict[str, Any]:
        return self.dps.keep_device(device_id, lambda: self._device_in_dps(device_id))

    def _device_in_dps(self, device_id: str) -> tuple[str, bool]:
        """What DPS should hold for a device with a revocation, from the ledger now: (certificate PEM, enabled)."""
        active = self.ledger.active_certificates([device_id]).get(device_id)
        if active is not None:
            return active.certificate_pem, True
        revoked = self.ledger.list_certificates(CertificateQuery(device_id=device_id, status=CERT_REVOKED, limit=1))
        return revoked.items[0].certificate_pem, False

    # -- internals -----------------------------------------------------------------------------------

    def _signing_intermediate(self, intermediate_id: str | None, allowed: Sequence[str] | None) -> CaRecord:
        if intermediate_id is None:
            return self.default_intermediate(allowed)
        record = self.intermediate(intermediate_id)
        if allowed is not None and record.id not in allowed:
            raise _intermediate_not_allowed(record.id)
        if record.status != CA_ACTIVE:
            raise Conflict(f"intermediate {record.id!r} is disabled; enable it or use another", "intermediate-disabled")
        return record

    def _plan(
        self,
        index: int,
        device: DeviceRequest,
        options: _SignOptions,
        now: datetime,
        owner: str | None,
        binding: tuple[str, bool] | None,
        active: CertificateRecord | None,
    ) -> "_Plan | IssuedCertificate":
        """Decide before signing (a Key Vault signature is not free); the ledger decides again on commit.

        In this order: the device's owner (a factory certifies only devices it owns or new ones; DESIGN
        "Who owns a device"), then the key (one device per key, never a revoked key), then the device's
        active certificate (the same key again gets it back; another key needs `renew`)."""
        claimed = options.claimed_owner
        if claimed is not None and owner is not None and owner != claimed:
            raise device_owned_elsewhere(device.device_id)
        if binding and binding[0] != device.device_id:
            raise key_in_use(binding[0] if claimed is None else None)
        if binding and binding[1]:
            raise key_revoked()
        supersede = options.renew
        if active is not None and options.renew and _renewal_retry(active, device, now):
            return self._issued(active, created=False, warnings=_intermediate_not_used(active, options))
        if active is not None and not options.renew:
            if active.not_after <= now:
                supersede = True  # an expired certificate never blocks its device
            elif active.public_key_sha256 != device.public_key_sha256:
                raise device_has_certificate(active)
            else:  # the same CSR again: its notes too, so every answer says how it was read
                notes = (*device.notes, *_intermediate_not_used(active, options))
                return self._issued(active, created=False, warnings=notes)
        return _Plan(index, device, supersede, warnings=list(device.notes))

    def _sign_all(
        self, issuer: Issuer, plans: list[_Plan], now: datetime, results: list[IssuedCertificate | CaError | None]
    ) -> None:
        validity = issuer.validity(now, self.settings.device_days)

        def sign(plan: _Plan) -> None:
            try:
                plan.certificate = issuer.issue_device(plan.request.device_id, plan.request.public_key, validity)
            except (CaError, PkiError) as error:
                results[plan.index] = _as_ca_error(error)
            except Exception as error:
                results[plan.index] = unexpected(error, "signing a device certificate")
            if validity.clamped:
                plan.warnings.append(validity.clamped)

        parallel = getattr(issuer.signing_key, "parallel_signatures", 1)
        if parallel > 1 and len(plans) > 1:
            with ThreadPoolExecutor(max_workers=min(parallel, len(plans))) as pool:
                list(pool.map(sign, plans))
        else:
            for plan in plans:
                sign(plan)

    def _issuance(self, plan: _Plan, run: "_Run") -> Issuance:
        certificate = plan.certificate
        assert certificate is not None
        record = CertificateRecord(
            serial=serial_text(certificate.serial_number),
            device_id=plan.request.device_id,
            intermediate_id=run.intermediate.id,  # type: ignore[union-attr]  # set whenever anything is signed
            requested_by=run.requested_by,
            public_key_sha256=plan.request.public_key_sha256,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            certificate_pem=pem(certificate),
            created_at=whole_seconds(run.now),
        )
        retry_since = run.now - RENEWAL_RETRY_WINDOW if plan.supersede else None
        return Issuance(record, plan.supersede, owner=run.owner, retry_since=retry_since)

    def _issued(
        self,
        record: CertificateRecord,
        created: bool,
        warnings: tuple[str, ...] = (),
        intermediate: CaRecord | None = None,
    ) -> IssuedCertificate:
        if intermediate is not None and intermediate.id == record.intermediate_id:
            intermediate_pem = intermediate.certificate_pem
            with self._issuers_lock:
                self._ca_pems.setdefault(intermediate.id, intermediate_pem)
        else:
            intermediate_pem = self.ca_certificate_pem(record.intermediate_id)
        return IssuedCertificate(
            record=record,
            intermediate_pem=intermediate_pem,
            created=created,
            warnings=warnings,
            dps=self.dps.registration_info(record.device_id),
        )
