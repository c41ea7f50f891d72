"""The use cases of the device CA: the only place that orchestrates keys, ledger and DPS.

Every entry point (CLI, HTTP, queue, timer) calls these and nothing below them.
"""

import asyncio
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import parameters
from .coalesce import Coalescer
from .config import Settings
from .dps import Dps
from .errors import CaError, Conflict, Forbidden, NotFound, unexpected
from .keys import KeyStore
from .ledger import Ledger, device_has_certificate, device_owned_elsewhere, key_in_use, key_revoked
from .ledger.models import (
    CA_ACTIVE,
    CA_DISABLED,
    INTERMEDIATE,
    ROOT,
    CaRecord,
    CertificatePage,
    CertificateQuery,
    CertificateRecord,
    Issuance,
    Revocation,
)
from .pki import (
    DeviceRequest,
    Issuer,
    PkiError,
    build_root,
    ca_name,
    check_ca_id,
    check_device_csr,
    plan_validity,
    whole_seconds,
)
from .pki.revocation import revocation_reason
from .pki.validity import check_ca_validity
from .principals import Principals
from .views import iso

ROOT_ID = "root"

# A renewal retried with the same key (after a timeout, say) gets the certificate the first attempt issued,
# not another one, while that certificate is younger than this (README "Renewal").
RENEWAL_RETRY_WINDOW = timedelta(minutes=10)


def utcnow() -> datetime:
    return datetime.now(UTC)


def serial_text(serial: int) -> str:
    """Upper-case hex with an even number of digits, as `openssl x509 -serial` prints it."""
    text = format(serial, "X")
    return text if len(text) % 2 == 0 else "0" + text


def normalize_serial(text: str) -> str:
    """Accept a serial as printed by openssl, with colons, any case or a 0x prefix."""
    cleaned = text.strip().replace(":", "").lower().removeprefix("0x")
    try:
        return serial_text(int(cleaned, 16))
    except ValueError:
        raise CaError(f"serial {text!r} is not a hexadecimal number", "invalid-serial") from None


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class CaResult:
    record: CaRecord
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProofOfPossession:
    verification_code: str
    certificate_pem: str
    dps: dict[str, Any]


@dataclass(frozen=True)
class CaChain:
    """The public certificates a caller verifies device certificates with: the root, and the
    intermediates it may sign with (every one, for an admin), oldest first."""

    root: CaRecord
    intermediates: tuple[CaRecord, ...]

    @property
    def pem(self) -> str:
        """The root, then the intermediates, as PEM."""
        return "".join(record.certificate_pem for record in (self.root, *self.intermediates))


@dataclass(frozen=True)
class HealthReport:
    """Whether the service can work: `problems` holds (part, error) for each part that cannot."""

    backends: dict[str, dict[str, str]]
    problems: tuple[tuple[str, CaError], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Backup:
    """A backup written by `DeviceCA.backup`: a PKI home that serves as one when PKI_HOME points at it."""

    destination: Path
    cas: int
    certificates: int
    contents: tuple[str, ...]  # one sentence per part, for the operator


@dataclass(frozen=True)
class SignRequest:
    csr: bytes | str
    device_id: str


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate as handed out: it is in the ledger."""

    record: CertificateRecord
    intermediate_pem: str
    created: bool
    warnings: tuple[str, ...] = ()
    dps: dict[str, str] | None = None

    @property
    def chain_pem(self) -> str:
        return self.record.certificate_pem + self.intermediate_pem

    def bundle(self) -> dict[str, Any]:
        """The device bundle of the contract."""
        record = self.record
        bundle: dict[str, Any] = {
            "deviceId": record.device_id,
            "serialNumber": record.serial,
            "notBefore": iso(record.not_before),
            "notAfter": iso(record.not_after),
            "certificate": record.certificate_pem,
            "certificateChain": self.chain_pem,
            "intermediateId": record.intermediate_id,
        }
        if self.dps:
            bundle["dps"] = self.dps
        if self.warnings:
            bundle["warnings"] = list(self.warnings)
        return bundle


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
    intermediate: CaRecord
    requested_by: str
    owner: str | None  # the owner the ledger must find (or make) for each device: see _SignOptions
    results: list["IssuedCertificate | CaError | None"]
    signed: list[_Plan] = field(default_factory=list)
    issuances: list[Issuance] = field(default_factory=list)


def _single(results: list["IssuedCertificate | CaError"]) -> "IssuedCertificate":
    (result,) = results
    if isinstance(result, CaError):
        raise result
    return result


class DeviceCA:
    def __init__(
        self,
        keys: KeyStore,
        ledger: Ledger,
        dps: Dps,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.keys = keys
        self.ledger = ledger
        self.dps = dps
        self.settings = settings
        self._now = clock
        self._issuers: dict[tuple[str, str], Issuer] = {}
        self._issuers_lock = threading.Lock()
        self.principals = Principals(ledger, clock)
        self._ca_creation = threading.Lock()  # concurrent creations here never make a key they then lose
        self._coalescer: Coalescer[_SignOptions, SignRequest, IssuedCertificate | CaError] = Coalescer(
            self._sign_batch_async
        )

    def close(self) -> None:
        self.keys.close()
        self.ledger.close()

    # -- root ----------------------------------------------------------------------------------------

    def create_root(
        self,
        common_name: str | None = None,
        organization: str | None = None,
        curve: str | None = None,
        days: float | None = None,
    ) -> CaResult:
        """Create the one root. Conflict "root-exists" if there is one (a lost race leaves no key here)."""
        with self._ca_creation:
            existing = self.ledger.get_root()
            if existing:
                raise Conflict(
                    f"a CA root already exists ({existing.common_name!r}, serial {existing.serial}); "
                    "this CA keeps one root",
                    "root-exists",
                )
            curve = (curve or self.settings.ca_curve).upper()
            subject = ca_name(common_name or f"{self.settings.ca_name} Root", organization)
            validity = check_ca_validity(plan_validity(self._now(), _days(days, self.settings.root_days)))
            key_name = _key_name(ROOT_ID)
            signing_key = self.keys.create_ca_key(key_name, curve, _common_name(subject))
            with self._removing_key_on_failure(key_name):
                certificate = build_root(subject, signing_key.public_key(), signing_key, validity)
                self.keys.install_ca_certificate(key_name, certificate, [])
                record = self._ca_record(ROOT_ID, ROOT, certificate, curve, key_name, issuer_id=None)
                self.ledger.add_ca(record)
        dps_state = self.dps.register_root(ROOT_ID, record.certificate_pem)
        return CaResult(self.ledger.set_ca_dps(ROOT_ID, dps_state), _dps_warnings(dps_state))

    def root(self) -> CaRecord:
        record = self.ledger.get_root()
        if record is None:
            raise NotFound("there is no CA root yet; create it with create-ca-root", "root-not-found")
        return record

    def prove_root_possession(self, verification_code: str) -> ProofOfPossession:
        """Sign the DPS verification certificate (CN = the code) with the root key and hand it to DPS."""
        root = self.root()
        certificate = self._issuer(root).issue_proof_of_possession(verification_code, self._now())
        certificate_pem = pem(certificate)
        dps_state = self.dps.verify_root(ROOT_ID, verification_code, certificate_pem)
        self.ledger.set_ca_dps(ROOT_ID, {**root.dps, "proofOfPossession": dps_state})
        return ProofOfPossession(verification_code, certificate_pem, dps_state)

    # -- intermediates -------------------------------------------------------------------------------

    def create_intermediate(
        self,
        ca_id: str | None = None,
        common_name: str | None = None,
        organization: str | None = None,
        curve: str | None = None,
        days: float | None = None,
    ) -> CaResult:
        """Create an intermediate signed by the root. Conflict "ca-exists" for a taken ID; a creation that
        loses a race to another process removes the key it made (or, in Key Vault, says what was left)."""
        root = self.root()
        ca_id = check_ca_id(ca_id) if ca_id else _new_intermediate_id(self._now())
        with self._ca_creation:
            if ca_id == ROOT_ID or self.ledger.get_ca(ca_id):
                raise Conflict(f"a CA with ID {ca_id!r} already exists", "ca-exists")
            if root.status != CA_ACTIVE:
                raise Conflict("the CA root is disabled", "root-disabled")
            root_issuer = self._issuer(root)
            curve = (curve or self.settings.ca_curve).upper()
            subject = ca_name(common_name or f"{self.settings.ca_name} Intermediate {ca_id}", organization)
            validity = check_ca_validity(
                root_issuer.validity(self._now(), _days(days, self.settings.intermediate_days))
            )
            key_name = _key_name(ca_id)
            signing_key = self.keys.create_ca_key(key_name, curve, _common_name(subject))
            with self._removing_key_on_failure(key_name):
                certificate = root_issuer.issue_intermediate(subject, signing_key.public_key(), validity)
                self.keys.install_ca_certificate(key_name, certificate, [root_issuer.certificate])
                record = self._ca_record(ca_id, INTERMEDIATE, certificate, curve, key_name, issuer_id=ROOT_ID)
                self.ledger.add_ca(record)
        dps_state = self.dps.put_enrollment_group(ca_id, record.certificate_pem, enabled=True)
        warnings = ([validity.clamped] if validity.clamped else []) + list(_dps_warnings(dps_state))
        return CaResult(self.ledger.set_ca_dps(ca_id, dps_state), tuple(warnings))

    def intermediates(self) -> list[CaRecord]:
        return self.ledger.list_cas(INTERMEDIATE)

    def default_intermediate_id(self, records: Sequence[CaRecord] | None = None) -> str | None:
        """The ID of the intermediate that signs when none is named: the newest active one (of
        `records`, oldest first, when given), or None when none is active."""
        records = self.intermediates() if records is None else records
        return next((ca.id for ca in reversed(records) if ca.kind == INTERMEDIATE and ca.status == CA_ACTIVE), None)

    def ca_chain(self, allowed: Sequence[str] | None = None) -> CaChain:
        """The root and the intermediates `allowed` (a factory's; None: every one, for an admin), disabled
        ones too (devices still hold certificates they signed). NotFound when there is no root yet."""
        root = self.root()
        records = self.intermediates()
        if allowed is not None:
            records = [record for record in records if record.id in allowed]
        return CaChain(root, tuple(records))

    def intermediate(self, ca_id: str) -> CaRecord:
        record = self.ledger.get_ca(ca_id)
        if record is None or record.kind != INTERMEDIATE:
            raise NotFound(f"no intermediate with ID {ca_id!r}", "intermediate-not-found")
        return record

    def default_intermediate(self, allowed: Sequence[str] | None = None) -> CaRecord:
        """The newest active intermediate (among `allowed`, when given)."""
        if allowed is None:
            records = self.intermediates()
        else:  # a factory is bound to a few intermediates: read just those
            records = sorted(filter(None, map(self.ledger.get_ca, allowed)), key=lambda ca: (ca.created_at, ca.id))
        candidates = [ca for ca in records if ca.kind == INTERMEDIATE and ca.status == CA_ACTIVE]
        if not candidates:
            raise Conflict(
                "there is no active intermediate to sign with; create one with create-ca-intermediate",
                "no-active-intermediate",
            )
        return candidates[-1]

    def set_intermediate_enabled(self, ca_id: str, enabled: bool) -> CaResult:
        self.intermediate(ca_id)  # NotFound for the root or an unknown ID
        record = self.ledger.set_ca_status(ca_id, CA_ACTIVE if enabled else CA_DISABLED)
        dps_state = self.dps.put_enrollment_group(ca_id, record.certificate_pem, enabled=enabled)
        return CaResult(self.ledger.set_ca_dps(ca_id, dps_state), _dps_warnings(dps_state))

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
        intermediate = self._signing_intermediate(options.intermediate_id, options.allowed_intermediates)
        issuer = self._issuer(intermediate)
        run = _Run(now, intermediate, options.requested_by, options.claimed_owner, [None] * len(requests))
        devices: list[tuple[int, DeviceRequest]] = []
        for index, request in enumerate(requests):
            try:
                devices.append((index, check_device_csr(request.csr, request.device_id)))
            except (CaError, PkiError) as error:
                run.results[index] = _as_ca_error(error)
            except Exception as error:  # one request's surprise is its own failure, never its neighbours'
                run.results[index] = unexpected(error, "reading a CSR")
        device_ids = [device.device_id for _, device in devices]
        owners = self.ledger.device_owners(device_ids)
        bindings = self.ledger.key_bindings([device.public_key_sha256 for _, device in devices])
        actives = self.ledger.active_certificates(device_ids)
        plans: list[_Plan] = []
        for index, device in devices:
            try:
                outcome = self._plan(
                    index,
                    device,
                    options,
                    now,
                    owners.get(device.device_id),
                    bindings.get(device.public_key_sha256),
                    actives.get(device.device_id),
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
        self._sign_all(issuer, plans, now, run.results)
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
        return list(run.results)  # type: ignore[arg-type]

    def certificates(self, query: CertificateQuery) -> CertificatePage:
        """A page of the inventory. InvalidParameter for a status, limit or cursor that breaks its rule."""
        if query.status is not None:
            parameters.status(query.status)
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
        active = self.ledger.active_certificates([device_id]).get(device_id)
        if active is None:
            dps_state = self.dps.disable_device(device_id, revocation.record.certificate_pem)
        else:
            dps_state = self.dps.admit_only(device_id, active.certificate_pem)
        return revocation, dps_state

    def backup(self, destination: Path) -> Backup:
        """Write a consistent copy of this CA into `destination`, a folder that does not exist yet (its
        parent must) or is empty, made with mode 0700: the ledger as of one moment as one file, then the
        local CA key files (after the ledger, so that every key it names is there), then the offline DPS
        records. Point PKI_HOME at it to restore. CaError "backup-destination" when it cannot be a backup's
        home; a backup that fails part way is removed."""
        destination = Path(destination)
        check_backup_destination(destination)
        made = not destination.exists()
        destination.mkdir(mode=0o700, exist_ok=True)
        try:
            counts = self.ledger.backup_into(destination)
            contents = [f"the ledger: {counts['cas']} CA(s), {counts['certificates']} certificate(s), as one file"]
            contents.append(self.keys.backup_into(destination))
            dps = self.dps.backup_into(destination)
            contents += [dps] if dps else []
        except BaseException:
            for path in sorted(destination.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            if made:
                destination.rmdir()
            raise
        return Backup(destination, counts["cas"], counts["certificates"], tuple(contents))

    def backends(self) -> dict[str, dict[str, str]]:
        """Which backends are in use, and where (for the operator: these name paths and vaults)."""
        return {"keys": self.keys.describe(), "ledger": self.ledger.describe(), "dps": self.dps.describe()}

    def health(self) -> HealthReport:
        """Whether the service can work: the ledger can be read, and the keys of the root and of every
        active intermediate can be used (a wrong PKI_KEY_PASSPHRASE, a missing key file, a Key Vault that
        refuses). Never raises for a part that fails: each is in `problems` with its error."""
        problems: list[tuple[str, CaError]] = []
        try:
            self.ledger.ping()
            cas = [ca for ca in self.ledger.list_cas() if ca.status == CA_ACTIVE]
        except CaError as error:
            problems.append(("ledger", error))
            cas = []
        except Exception as error:  # a ledger file that is not one, say
            problems.append(("ledger", unexpected(error, "reading the ledger")))
            cas = []
        for record in cas:
            try:
                self._issuer(record)  # loads the key once; later checks find it loaded
            except CaError as error:
                problems.append(("keys", error))
                break
            except Exception as error:
                problems.append(("keys", unexpected(error, f"loading the key of CA {record.id}")))
                break
        return HealthReport(self.backends(), tuple(problems))

    # -- internals -----------------------------------------------------------------------------------

    def _signing_intermediate(self, intermediate_id: str | None, allowed: Sequence[str] | None) -> CaRecord:
        if intermediate_id is None:
            return self.default_intermediate(allowed)
        record = self.intermediate(intermediate_id)
        if allowed is not None and record.id not in allowed:
            raise Forbidden(f"this caller may not sign with intermediate {record.id!r}", "intermediate-not-allowed")
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
            return self._issued(active, created=False)  # a retried renewal gets what the first attempt got
        if active is not None and not options.renew:
            if active.not_after <= now:
                supersede = True  # an expired certificate never blocks its device
            elif active.public_key_sha256 != device.public_key_sha256:
                raise device_has_certificate(active)
            else:
                return self._issued(active, created=False)
        return _Plan(index, device, supersede, warnings=list(getattr(device, "notes", ())))

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
            intermediate_id=run.intermediate.id,
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
        if intermediate is None or intermediate.id != record.intermediate_id:
            intermediate = self.intermediate(record.intermediate_id)
        return IssuedCertificate(
            record=record,
            intermediate_pem=intermediate.certificate_pem,
            created=created,
            warnings=warnings,
            dps=self.dps.registration_info(record.device_id),
        )

    @contextmanager
    def _removing_key_on_failure(self, key_name: str) -> Iterator[None]:
        """A CA key made for a creation that then fails (a lost race, say) is removed, or what is left of
        it is named in the error, so no unrecorded CA key stays behind unnoticed."""
        try:
            yield
        except CaError as error:
            left = self.keys.delete_ca_key(key_name)
            if left:
                error.message = f"{error.message}; {left}"
                error.args = (error.message,)
            raise
        except BaseException:
            self.keys.delete_ca_key(key_name)
            raise

    def _issuer(self, record: CaRecord) -> Issuer:
        cache_key = (record.id, record.serial)
        with self._issuers_lock:
            issuer = self._issuers.get(cache_key)
        if issuer is None:
            certificate = x509.load_pem_x509_certificate(record.certificate_pem.encode())
            issuer = Issuer(certificate, self.keys.signing_key(record.key_name))
            with self._issuers_lock:
                self._issuers[cache_key] = issuer
        return issuer

    def _ca_record(
        self, ca_id: str, kind: str, certificate: x509.Certificate, curve: str, key_name: str, issuer_id: str | None
    ) -> CaRecord:
        return CaRecord(
            id=ca_id,
            kind=kind,
            common_name=_common_name(certificate.subject),
            curve=curve,
            key_name=key_name,
            key_backend=self.keys.backend,
            serial=serial_text(certificate.serial_number),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            certificate_pem=pem(certificate),
            issuer_id=issuer_id,
            created_at=whole_seconds(self._now()),
        )


def check_backup_destination(destination: Path) -> None:
    """CaError "backup-destination" unless `destination` is an empty folder, or can be made (its parent is a
    folder). A backup never mixes with or overwrites anything."""
    if destination.exists():
        if not destination.is_dir():
            raise CaError(f"cannot back up to {destination}: it is a file", "backup-destination")
        if any(destination.iterdir()):
            raise CaError(f"cannot back up to {destination}: it is not empty", "backup-destination")
    elif not destination.parent.is_dir():
        raise CaError(
            f"cannot back up to {destination}: folder {destination.parent} does not exist", "backup-destination"
        )


def _renewal_retry(active: CertificateRecord, device: DeviceRequest, now: datetime) -> bool:
    """A renewal is a retry of the one that issued `active` when it brings the same key while `active` is
    younger than RENEWAL_RETRY_WINDOW (and still valid)."""
    return (
        active.public_key_sha256 == device.public_key_sha256
        and active.created_at >= now - RENEWAL_RETRY_WINDOW
        and active.not_after > now
    )


def _as_ca_error(error: CaError | PkiError) -> CaError:
    if isinstance(error, CaError):
        return error
    return CaError(error.message, error.code)


def _days(days: float | None, default: float) -> float:
    return default if days is None else days


def _dps_warnings(state: dict[str, Any]) -> tuple[str, ...]:
    return (state["message"],) if state.get("mode") == "offline" and state.get("message") else ()


def _common_name(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def _key_name(ca_id: str) -> str:
    """Key Vault names cannot be reused for 90 days after deletion, so each key gets a fresh suffix."""
    return f"device-ca-{ca_id}-{secrets.token_hex(3)}"


def _new_intermediate_id(now: datetime) -> str:
    return f"int-{now:%Y%m%d}-{secrets.token_hex(2)}"
