"""What the use cases share: the results they hand out, serial numbers, and small helpers."""

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import CaError
from ..ledger.models import (
    CaRecord,
    CertificateRecord,
)
from ..pki import (
    DeviceRequest,
    PkiError,
)
from ..views import iso

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
    """A proof of possession: the code and the certificate signed for it (None for a root verified on
    upload, or one DPS already held verified: `already_verified`), and the root's DPS state."""

    verification_code: str | None
    certificate_pem: str | None
    dps: dict[str, Any]
    already_verified: bool = False


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
    """What a caller is told of DPS: offline (nothing was sent), or what failed and how to mend it."""
    telling = state.get("mode") == "offline" or state.get("state") == "failed"
    return (state["message"],) if telling and state.get("message") else ()


def _common_name(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def _key_name(ca_id: str) -> str:
    """Key Vault names cannot be reused for 90 days after deletion, so each key gets a fresh suffix."""
    return f"device-ca-{ca_id}-{secrets.token_hex(3)}"


def _new_intermediate_id(now: datetime) -> str:
    return f"int-{now:%Y%m%d}-{secrets.token_hex(2)}"
