"""The ledger: the CA's record of CA certificates and of every certificate it issued.

A certificate is committed here before anyone is given it. The uniqueness rules (serial; one active
certificate per device; one device per public key; a revoked key is never certified again) are enforced
by the store itself, so two processes racing cannot both win.
"""

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CaError, Conflict, Forbidden
from .models import (
    ApiKey,
    BatchItem,
    BatchPage,
    BatchRecord,
    BatchSummary,
    CaRecord,
    CertificatePage,
    CertificateQuery,
    CertificateRecord,
    ChunkState,
    ExpiryWatch,
    Issuance,
    Precheck,
    Principal,
    Revocation,
)


class Ledger(ABC):
    backend: str = "abstract"
    remote: bool = False  # True when reads are network calls (keep them off the event loop)
    expiry_rows_read: int = 0  # rows the expiry reads returned, counted by each store (bench/expiry_scan.py)

    # CA certificates
    @abstractmethod
    def add_ca(self, record: CaRecord) -> None:
        """Conflict if the ID is taken or, for a root, if a root exists."""

    @abstractmethod
    def get_ca(self, ca_id: str) -> CaRecord | None: ...

    @abstractmethod
    def get_root(self) -> CaRecord | None: ...

    @abstractmethod
    def list_cas(self, kind: str | None = None) -> list[CaRecord]:
        """Oldest first."""

    @abstractmethod
    def set_ca_status(self, ca_id: str, status: str) -> CaRecord: ...

    @abstractmethod
    def set_ca_dps(self, ca_id: str, dps: dict[str, Any]) -> CaRecord: ...

    # Device certificates
    @abstractmethod
    def record_issued(self, issuances: Sequence[Issuance]) -> list[CertificateRecord | CaError]:
        """Commit signed certificates durably, each on its own terms, all in one commit.

        For each issuance: the record as stored, or the Conflict that kept it out. When an identical
        request (same device, same key) won a race, its certificate is returned instead.
        """

    async def record_issued_async(self, issuances: Sequence[Issuance]) -> list[CertificateRecord | CaError]:
        """`record_issued` for a coroutine: waits without holding the event loop."""
        return await asyncio.to_thread(self.record_issued, issuances)

    @abstractmethod
    def get_certificate(self, serial: str) -> CertificateRecord | None: ...

    @abstractmethod
    def active_certificates(self, device_ids: Sequence[str]) -> dict[str, CertificateRecord]:
        """The active certificate of each of these devices that has one."""

    @abstractmethod
    def device_owners(self, device_ids: Sequence[str]) -> dict[str, str]:
        """The owner (a principal ID) of each of these devices that has ever been certified."""

    @abstractmethod
    def devices_with_revocations(self, device_ids: Sequence[str]) -> set[str]:
        """Those of these devices that have a revoked certificate (and so an individual DPS enrollment)."""

    @abstractmethod
    def key_bindings(self, public_key_sha256s: Sequence[str]) -> dict[str, tuple[str, bool]]:
        """(device ID, revoked) for each of these public keys that has been certified."""

    def precheck(self, device_ids: Sequence[str], public_key_sha256s: Sequence[str]) -> Precheck:
        """Owners, key bindings and active certificates of these devices and keys, read before signing, as of
        ONE moment: a decision must never mix a state before another process's commit with one after it (a
        device seen without an owner but with the new owner's certificate, say). This default reads them one
        after another; a store overrides it with a consistent read (a snapshot, or one entity holding a
        device's owner and active certificate). A store where each read is a billed call may leave out key
        bindings (see `Precheck`)."""
        return Precheck(
            owners=self.device_owners(device_ids),
            bindings=self.key_bindings(public_key_sha256s),
            actives=self.active_certificates(device_ids),
        )

    @abstractmethod
    def list_certificates(self, query: CertificateQuery) -> CertificatePage:
        """One page of certificates matching every filter given; `next_cursor` continues it (CaError
        "invalid-cursor" for a cursor that another query made). The order is the store's: issue order
        on SQLite, the index's key order on Table Storage."""

    @abstractmethod
    def revoke_certificate(self, serial: str, reason: str, at: datetime) -> Revocation:
        """Revoke a certificate and its key in one commit: the key is never certified again, and every
        active certificate that holds it is revoked with it (DESIGN "Revocation and DPS").
        NotFound for an unknown serial; a certificate already revoked keeps its first reason."""

    # The expiry scan (shared/service/expiry.py): stage records, claimed with a conditional write
    @abstractmethod
    def expiry_watch(self, before: datetime) -> list[ExpiryWatch]:
        """The active device certificates that end at or before `before` (UTC), each with the stage last
        recorded for it (and its record). Reads about one row per certificate returned, however large the
        fleet: an index of active certificates by notAfter on SQLite; on Tables the expiry index and the
        certificate each row points at (two), where a certificate found no longer active has its index
        row retired, so that it is read once."""

    @abstractmethod
    def ca_expiry_watch(self, topic: str = "expiry") -> list[ExpiryWatch]:
        """Every CA certificate (root and intermediates), with the stage last recorded for `topic`."""

    @abstractmethod
    def claim_expiry_stage(self, watch: ExpiryWatch, stage: str, at: datetime) -> ExpiryWatch | None:
        """Record `stage` for the watch's certificate, on condition that its record still holds
        `watch.stage` (insert-if-absent, or compare-and-set): of scans racing, exactly one gets the
        watch as recorded (to release it with), the others None. A device certificate that is no longer
        active is never claimed (None)."""

    @abstractmethod
    def release_expiry_stage(self, claimed: ExpiryWatch, previous: str | None) -> None:
        """Put back `previous` where `claimed` recorded a stage that could not be announced, unless the
        record has changed since (the next scan then announces it)."""

    @abstractmethod
    def mark_expired(self, watch: ExpiryWatch, at: datetime) -> CertificateRecord | None:
        """Give an active device certificate whose notAfter is at or before `at` the status expired
        (its device then has no active certificate), and stop watching it. The record as now stored, or
        None when it was not active (nothing changes but the watch)."""

    @abstractmethod
    def retire_expiry_watch(self, watch: ExpiryWatch) -> None:
        """Stop watching a certificate the scan found no longer active (superseded, revoked, expired)."""

    # Principals and their API keys
    @abstractmethod
    def add_principal(self, principal: Principal) -> None:
        """Conflict if the ID, or the application ID, is taken."""

    @abstractmethod
    def get_principal(self, principal_id: str) -> Principal | None: ...

    @abstractmethod
    def principal_for_app(self, app_id: str) -> Principal | None: ...

    @abstractmethod
    def list_principals(self) -> list[Principal]:
        """Every principal, oldest first."""

    @abstractmethod
    def set_principal_intermediates(self, principal_id: str, intermediates: Sequence[str]) -> Principal:
        """Replace the intermediates a principal may use; NotFound if there is no such principal."""

    @abstractmethod
    def add_api_key(self, key: ApiKey) -> None: ...

    @abstractmethod
    def get_api_key(self, key_id: str) -> ApiKey | None: ...

    def api_key_with_principal(self, key_id: str) -> tuple[ApiKey, Principal] | None:
        """A key and its principal, as authentication needs them (stores may do it in one read)."""
        key = self.get_api_key(key_id)
        principal = self.get_principal(key.principal_id) if key else None
        return (key, principal) if key and principal else None

    @abstractmethod
    def list_api_keys(self) -> list[ApiKey]: ...

    @abstractmethod
    def revoke_api_key(self, key_id: str, at: datetime) -> ApiKey: ...

    @abstractmethod
    def ping(self) -> None:
        """Raise BackendUnavailable when the ledger cannot be read."""

    @abstractmethod
    def describe(self) -> dict[str, str]: ...

    @abstractmethod
    def backup_into(self, home: Path) -> dict[str, int]:
        """Write a consistent copy of the ledger, as of one moment, into the PKI home `home`, laid out as
        this adapter reads it (for `backup`). Returns how many CAs and certificates the copy holds."""

    # Batches (DESIGN "Batches"): items stored before the batch is accepted, results recorded per chunk
    @abstractmethod
    def add_batch(self, batch: BatchRecord, items: Sequence[BatchItem]) -> None:
        """Store a batch and every one of its items durably (items already failed at submission too), the
        batch record last: a batch is found only once all of its items are stored. Conflict if the ID is
        taken. `items` are indexed 0..total-1 and cut into chunks of `batch.chunk_size`."""

    @abstractmethod
    def get_batch(self, batch_id: str) -> BatchSummary | None:
        """The batch with its counts and timing, None when there is none."""

    @abstractmethod
    def list_batches(self, requested_by: str | None, limit: int, cursor: str | None) -> BatchPage:
        """A page of batches in the order they were stored (Table Storage: about that order, see
        tables_batches._listing_key): those `requested_by` sent, or every one for None. Following the cursor
        from the first page to the last (next_cursor None) shows each batch whose store had finished when the
        listing began exactly once; one stored meanwhile may or may not be shown. CaError "invalid-cursor" for
        a cursor this listing did not give."""

    @abstractmethod
    def chunk_items(self, batch_id: str, chunk: int) -> tuple[ChunkState, list[BatchItem]]:
        """One chunk's delivery state and items, in index order (NotFound for a chunk the batch lacks)."""

    @abstractmethod
    def start_chunk(self, batch_id: str, chunk: int, at: datetime) -> ChunkState:
        """Count a delivery of the chunk, and note `at` as its start if it is the first."""

    @abstractmethod
    def note_chunk_failure(self, batch_id: str, chunk: int, reason: str) -> None:
        """Keep the words of a delivery's failure (what a caller may read), for the poison handler."""

    @abstractmethod
    def finish_chunk_items(self, batch_id: str, chunk: int, results: Sequence[BatchItem], at: datetime) -> int:
        """Record finished items of one chunk in one commit. Only items still pending change: a result is
        never overwritten (a redelivered chunk, a poison handler after a late success). Returns how many
        items changed; the chunk is finished at `at` once none of its items is pending."""

    @abstractmethod
    def batch_items(self, batch_id: str, start: int, limit: int) -> list[BatchItem]:
        """Items start..start+limit-1 of a batch (fewer at its end), in index order."""

    @abstractmethod
    def unfinished_chunks(self) -> list[tuple[str, int]]:
        """(batch ID, chunk) of every chunk with a pending item, oldest batch first: what an embedded
        queue, lost with its process, sends again when a server starts."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def key_in_use(device_id: str | None) -> Conflict:
    """The key is bound to another device; `device_id` is named only to callers who may see that device."""
    which = f"device {device_id!r}" if device_id else "another device"
    return Conflict(f"this public key is already certified for {which}; one key serves one device", "key-in-use")


def device_owned_elsewhere(device_id: str) -> Forbidden:
    """A factory asked for a device another principal owns. Names nothing of the owner's (DESIGN)."""
    return Forbidden(
        f"device {device_id!r} was first certified by another factory or by a CA admin, and only its owner or an "
        "admin may certify it",
        "device-owned-by-another-factory",
    )


def invalid_cursor() -> CaError:
    return CaError(
        "the cursor is not one this listing gave: pass nextCursor back with the same filters", "invalid-cursor"
    )


def key_revoked() -> Conflict:
    return Conflict("a certificate for this public key was revoked; the key cannot be certified again", "key-revoked")


def device_has_certificate(current: CertificateRecord) -> Conflict:
    return Conflict(
        f"device {current.device_id!r} already has an active certificate (serial {current.serial}) for another "
        "key; ask for renewal to replace it (renew=true over HTTP, --renew on the CLI)",
        "device-has-certificate",
    )


__all__ = [
    "CertificatePage",
    "CertificateQuery",
    "CertificateRecord",
    "Issuance",
    "Ledger",
    "Precheck",
    "Revocation",
    "device_has_certificate",
    "device_owned_elsewhere",
    "invalid_cursor",
    "key_in_use",
    "key_revoked",
]
