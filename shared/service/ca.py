"""Use cases of the CA itself: the root, its proof of possession, intermediates (created, enabled, disabled).

Mixed into `DeviceCA`, which holds the key store, the ledger, DPS, the settings and the clock.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from cryptography import x509

from ..dps import CONNECTED_DEVICES
from ..errors import CaError, Conflict, NotFound
from ..ledger.models import (
    CA_ACTIVE,
    CA_DISABLED,
    INTERMEDIATE,
    ROOT,
    CaRecord,
)
from ..pki import (
    Issuer,
    build_root,
    ca_name,
    check_ca_id,
    check_verification_code,
    plan_validity,
    whole_seconds,
)
from ..pki.validity import check_ca_validity
from .common import (
    ROOT_ID,
    CaChain,
    CaResult,
    ProofOfPossession,
    _common_name,
    _days,
    _dps_warnings,
    _key_name,
    _new_intermediate_id,
    pem,
    serial_text,
)


class CaUseCases:
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
                verified = " and verified in DPS" if existing.dps.get("isVerified") else ""
                raise Conflict(
                    f"a CA root already exists ({existing.common_name!r}, serial {existing.serial}{verified}); "
                    "this CA keeps one root, nothing was changed",
                    "root-exists",
                )
            curve = (curve or self.settings.ca_curve).upper()
            subject = ca_name(common_name or f"{self.settings.ca_name} Root", organization)
            validity = check_ca_validity(plan_validity(self._now(), _days(days, self.settings.root_days)))
            key_name = _key_name(ROOT_ID)
            signing_key = self.keys.create_ca_key(key_name, curve, _common_name(subject))
            with self._removing_key_on_failure(ROOT_ID, key_name):
                certificate = build_root(subject, signing_key.public_key(), signing_key, validity)
                self.keys.install_ca_certificate(key_name, certificate, [])
                record = self._ca_record(ROOT_ID, ROOT, certificate, curve, key_name, issuer_id=None)
                self.ledger.add_ca(record)
        dps_state = self._upload_root(record)
        return CaResult(self.ledger.set_ca_dps(ROOT_ID, dps_state), _dps_warnings(dps_state))

    def _upload_root(self, record: CaRecord, verified: bool = False) -> dict:
        """The root uploaded to DPS; its state, or (when DPS fails) a `failed` state that says what to do:
        the root stands in the ledger either way."""
        try:
            return self.dps.register_root(ROOT_ID, record.certificate_pem, verified=verified)
        except CaError as error:
            return {
                "mode": "azure",
                "state": "failed",
                "error": error.message,
                "message": f"the root is created, but DPS did not take it ({error.code}): run "
                "proof-ca-root-possession to upload and verify it",
            }

    def root(self) -> CaRecord:
        record = self.ledger.get_root()
        if record is None:
            raise NotFound("there is no CA root yet; create it with create-ca-root", "root-not-found")
        return record

    def prove_root_possession(
        self, verification_code: str | None = None, verified_on_upload: bool = False
    ) -> ProofOfPossession:
        """Prove to DPS that this CA holds the root key (the seed's round trip): DPS's verification code
        (asked of DPS when none is given), a certificate with CN = the code signed by the root key wherever
        it lives, sent back to DPS. `verified_on_upload` instead uploads the root marked verified
        (Microsoft's newer path). A root DPS already holds verified is left as it is and the answer says so
        (`already_verified`). Offline, the code must be given and the certificate is only recorded.
        CaError "verification-code-required" offline without a code, "dps-not-configured" offline with
        `verified_on_upload` (there is no DPS to upload to); DpsRefused when DPS refuses the proof."""
        if verified_on_upload and not self.dps.configured:
            raise CaError(
                "verified on upload needs DPS configured (AZURE_SUBSCRIPTION_ID, RESOURCE_GROUP_NAME, DPS_NAME); "
                "offline, give the verification code DPS shows for the root and upload the certificate in the portal",
                "dps-not-configured",
            )
        root = self.root()
        if self.dps.configured and root.dps.get("isVerified"):
            return ProofOfPossession(None, None, root.dps, already_verified=True)
        if self.dps.configured and (verified_on_upload or root.dps.get("state") in (None, "failed")):
            state = self.dps.register_root(ROOT_ID, root.certificate_pem, verified=verified_on_upload)
            root = self.ledger.set_ca_dps(ROOT_ID, state)
            if verified_on_upload:
                return ProofOfPossession(None, None, state)
        if verification_code is None:
            verification_code = self.dps.verification_code(ROOT_ID)
        verification_code = check_verification_code(verification_code)
        certificate = self._issuer(root).issue_proof_of_possession(verification_code, self._now())
        certificate_pem = pem(certificate)
        dps_state = self.dps.verify_root(ROOT_ID, verification_code, certificate_pem)
        if self.dps.configured:
            self.ledger.set_ca_dps(ROOT_ID, dps_state)
        else:
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
            with self._removing_key_on_failure(ca_id, key_name):
                certificate = root_issuer.issue_intermediate(subject, signing_key.public_key(), validity)
                self.keys.install_ca_certificate(key_name, certificate, [root_issuer.certificate])
                record = self._ca_record(ca_id, INTERMEDIATE, certificate, curve, key_name, issuer_id=ROOT_ID)
                self.ledger.add_ca(record)
        record, notes = self._register_new_intermediate(record)
        warnings = ([validity.clamped] if validity.clamped else []) + list(notes)
        return CaResult(record, tuple(warnings))

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

    def ca_certificate_pem(self, ca_id: str) -> str:
        """The PEM certificate of CA `ca_id`, read from the ledger once per process: a CA's certificate
        never changes and its ID is never reused. NotFound for an unknown ID."""
        with self._issuers_lock:
            cached = self._ca_pems.get(ca_id)
        if cached is not None:
            return cached
        record = self.ledger.get_ca(ca_id)
        if record is None:
            raise NotFound(f"no CA with ID {ca_id!r}", "ca-not-found")
        with self._issuers_lock:
            self._ca_pems[ca_id] = record.certificate_pem
        return record.certificate_pem

    def default_intermediate(self, allowed: Sequence[str] | None = None) -> CaRecord:
        """The newest active intermediate (among `allowed`, when given)."""
        if allowed is None:
            records = self.intermediates()
        else:  # a factory is bound to a few intermediates: read just those
            records = sorted(filter(None, map(self.ledger.get_ca, allowed)), key=lambda ca: (ca.created_at, ca.id))
        candidates = [ca for ca in records if ca.kind == INTERMEDIATE and ca.status == CA_ACTIVE]
        if not candidates and allowed is not None:
            raise Conflict(
                "none of the intermediates this factory may sign with is active; ask a CA admin to enable one "
                "or bind the factory to another",
                "no-active-intermediate",
            )
        if not candidates:
            raise Conflict(
                "there is no active intermediate to sign with; create one with create-ca-intermediate",
                "no-active-intermediate",
            )
        return candidates[-1]

    def set_intermediate_enabled(self, ca_id: str, enabled: bool) -> CaResult:
        """Enable or disable signing with intermediate `ca_id` (in the ledger, at once) and its DPS enrollment
        group's provisioningStatus (read first for its etag, then the ledger's status, the certificate sent
        again: two admins racing end with DPS as the ledger's last write says). When DPS cannot be updated the
        ledger's change stands and the answer says to run the command again. NotFound for the root or an
        unknown ID."""
        self.intermediate(ca_id)
        record = self.ledger.set_ca_status(ca_id, CA_ACTIVE if enabled else CA_DISABLED)
        try:
            dps_state = self.dps.put_enrollment_group(ca_id, record.certificate_pem, enabled=self._enabled_now(ca_id))
        except CaError as error:
            verb = "enable" if enabled else "disable"
            dps_state = {
                **record.dps,
                "provisioningStatus": None,
                "error": error.message,
                "message": f"signing is {verb}d, but DPS's enrollment group was not updated ({error.code}): "
                f"run {verb}-intermediate {ca_id} again",
            }
            return CaResult(self.ledger.set_ca_dps(ca_id, dps_state), (dps_state["message"],))
        warnings = _dps_warnings(dps_state)
        if self.dps.configured and not enabled:
            warnings += (f"DPS no longer provisions devices of {ca_id}; {CONNECTED_DEVICES}",)
        return CaResult(self.ledger.set_ca_dps(ca_id, dps_state), warnings)

    # -- internals -----------------------------------------------------------------------------------

    @contextmanager
    def _removing_key_on_failure(self, ca_id: str, key_name: str) -> Iterator[None]:
        """A CA key made for a creation that then fails (a lost race, say) is removed, or what is left of
        it is named in the error, so no unrecorded CA key stays behind unnoticed. Unless the ledger holds
        CA `ca_id` with this very key: its write landed and only the answer was lost (Storage's 503 "it may
        have been done"), so the creation stands and the error is dropped (the block's last step must be
        that write). When the ledger cannot be read to tell, the key is kept and the error says so. Any
        other exception (an interrupt) is raised as it is, the key removed only when the ledger says that
        it holds no such CA."""
        try:
            yield
        except CaError as error:
            recorded = self._recorded_with(ca_id, key_name)
            if recorded:
                return
            left = (
                f"CA key {key_name!r} was kept: the ledger could not be read to tell whether CA {ca_id!r} was "
                "recorded with it"
                if recorded is None
                else self.keys.delete_ca_key(key_name)
            )
            if left:
                error.message = f"{error.message}; {left}"
                error.args = (error.message,)
            raise
        except BaseException:  # an interrupt (Ctrl-C) may come after the record landed, as a lost answer may
            if self._recorded_with(ca_id, key_name) is False:
                self.keys.delete_ca_key(key_name)
            raise

    def _recorded_with(self, ca_id: str, key_name: str) -> bool | None:
        """Whether the ledger holds CA `ca_id` with key `key_name`; None when it cannot be read."""
        try:
            held = self.ledger.get_ca(ca_id)
        except CaError:
            return None
        return held is not None and held.key_name == key_name

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
