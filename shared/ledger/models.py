"""What the ledger holds: CA certificates, issued device certificates, and who may call the API."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ROOT = "root"
INTERMEDIATE = "intermediate"
DEVICE = "device"  # a device certificate, for the expiry scan (beside ROOT and INTERMEDIATE)
EXPIRY_TOPIC = "expiry"  # an ExpiryWatch's stage is about its notAfter
KEY_VAULT_TOPIC = "key-vault"  # ... about Key Vault's expiry of a CA certificate against the ledger's

CA_ACTIVE = "active"
CA_DISABLED = "disabled"

CERT_ACTIVE = "active"
CERT_SUPERSEDED = "superseded"
CERT_REVOKED = "revoked"
CERT_EXPIRED = "expired"  # set by the expiry scan once notAfter has passed (shared/service/expiry.py)
CERT_STATUSES = (CERT_ACTIVE, CERT_SUPERSEDED, CERT_REVOKED, CERT_EXPIRED)


@dataclass(frozen=True)
class CaRecord:
    id: str
    kind: str  # ROOT or INTERMEDIATE
    common_name: str
    curve: str
    key_name: str
    key_backend: str
    serial: str
    not_before: datetime
    not_after: datetime
    certificate_pem: str
    issuer_id: str | None
    created_at: datetime
    status: str = CA_ACTIVE
    dps: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    device_id: str
    intermediate_id: str
    requested_by: str
    public_key_sha256: str
    not_before: datetime
    not_after: datetime
    certificate_pem: str
    created_at: datetime
    status: str = CERT_ACTIVE
    status_changed_at: datetime | None = None
    status_reason: str | None = None


@dataclass(frozen=True)
class Issuance:
    """A signed device certificate to commit. With `supersede`, the device's active one is superseded.

    `owner` is the factory that must own the device (DESIGN "Who owns a device"): a device not yet known
    becomes its own, one owned by someone else is refused. None, for an admin, keeps the device's owner
    (or makes the record's requester the owner of a new device).

    `retry_since`, for a renewal: when the device's active certificate holds the same key and was created
    at or after this moment, the renewal is a retry of the one that made it, and that certificate is the
    answer (service.RENEWAL_RETRY_WINDOW; the ledger decides again on commit, so racing retries issue one).
    """

    record: CertificateRecord
    supersede: bool = False
    owner: str | None = None
    retry_since: datetime | None = None  # a renewal: an active certificate of the same key made since is its retry


@dataclass(frozen=True)
class Revocation:
    """A revoked certificate and the other certificates that held its key (RFC 5280 §5.3.1 reason)."""

    record: CertificateRecord
    also_revoked: tuple[CertificateRecord, ...] = ()


@dataclass(frozen=True)
class Precheck:
    """What the service decides on before it signs: each known device's owner and active certificate,
    and the binding (device ID, revoked) of the public keys the store knows of at no extra cost. The
    ledger checks every rule again when it commits, so a binding left out is only found later."""

    owners: dict[str, str]
    bindings: dict[str, tuple[str, bool]]
    actives: dict[str, "CertificateRecord"]


@dataclass(frozen=True)
class CertificateQuery:
    device_id: str | None = None
    intermediate_id: str | None = None
    status: str | None = None
    expiring_before: datetime | None = None
    requested_by: str | None = None
    limit: int = 100
    cursor: str | None = None


@dataclass(frozen=True)
class CertificatePage:
    items: list[CertificateRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class ExpiryWatch:
    """A certificate the expiry scan looks at, as the ledger lists it, with the stage last recorded for it.

    `kind` is "device", ROOT or INTERMEDIATE; `subject` the device ID or the CA ID. `topic` names what the
    stage is about: "expiry" (its notAfter), or "key-vault" (Key Vault's expiry of a CA certificate
    against the ledger's). `stage` is the stage last recorded ("30d", "expired", ...; None: none yet).
    `version` is the store's own handle for a conditional write (None on SQLite; an etag on Tables);
    `record` the CertificateRecord (device) or CaRecord (CA) it watches."""

    serial: str
    kind: str
    subject: str
    not_after: datetime
    stage: str | None = None
    topic: str = EXPIRY_TOPIC
    version: Any = None
    record: Any = None


ADMIN = "admin"
FACTORY = "factory"
ROLES = (ADMIN, FACTORY)


@dataclass(frozen=True)
class Principal:
    """Someone who may call the API: an admin, or a factory bound to intermediates."""

    id: str
    role: str  # ADMIN or FACTORY
    intermediates: tuple[str, ...]
    created_at: datetime
    app_id: str | None = None  # the Entra application ID a factory calls with under Easy Auth


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: its public ID and the SHA-256 of its secret, never the secret."""

    id: str
    principal_id: str
    secret_sha256: str
    created_at: datetime
    revoked_at: datetime | None = None
