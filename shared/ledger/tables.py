"""The production ledger: Azure Table Storage (or Azure Cosmos DB for Table, through the same client).

Only PartitionKey and RowKey are indexed, and a transaction spans one partition of one table (at most
100 operations, under 4 MiB). So every rule of the ledger is held by one partition's transaction or by
an insert that fails when its key exists (`create_entity`: 409 EntityAlreadyExists), and every update
that depends on what it read carries that read's etag (412 when someone wrote in between). Nothing is
kept on local disk and nothing is held in memory that another instance could contradict: a cached
device head only supplies the etag for a conditional write, which fails when the head moved.

Tables (each named `<prefix><name>`):

| table | PartitionKey / RowKey | what |
| --- | --- | --- |
| devices | `<deviceId>` / `head` | the device head: owner, the active certificate (a full copy), revoked keys |
| devices | `<deviceId>` / `c-<created>-<serial>` | a certificate of the device, with its status |
| keys | `<public key SHA-256>` / `binding` | the device a key is bound to, and whether it is revoked |
| index | `ser-<last hex digit of serial>` / `<serial>` | unique serials; serial → device and row |
| index | `req-<requester>` / `<created>-<serial>` | a requester's certificates, oldest first |
| index | `exp-<yyyy-mm-dd of notAfter>` / `<notAfter>-<serial>` | the expiry window, days; `expiry_stage` announced |
| cas | `ca` / `<id>`, `~root` | CA records (with `expiry_stage`, `key_vault_stage` once announced); the root marker |
| principals | `principal` / `<id>`, `~app-<appId>`; `apikey` / `<key id>` | principals, app ID markers, API keys |

Batches (DESIGN "Batches"; shared/ledger/tables_batches.py), in table `batches`:

| table | PartitionKey / RowKey | what |
| --- | --- | --- |
| batches | `bat-<batchId>` / `batch` | the batch (requester, intermediate, size); written last |
| batches | `bat-<batchId>` / `chunk-<nnnnn>` | a chunk: deliveries, first start, last error, counts |
| batches | `bat-<batchId>` / `item-<nnnnn>` | an item: device ID, CSR, status, result (certificate or error) |
| batches | `req-<requester>` / `<created>-<ns>-<batchId>`; `all` / same | a requester's batches; everyone's |

A chunk's row and its items are written in one transaction (at most 99 items and the row: 100
operations), when the batch is stored and when the chunk's results are recorded. Recording results
replaces the chunk row on the etag it read and changes only items still pending, so two deliveries of
one chunk (or a delivery and the poison handler) never count an item twice nor overwrite a result.

Which write holds each rule:

- **One active certificate per device** and **device ownership**: the device head. A certificate is
  written in one transaction of its device's partition that creates the head (fails if it exists) or
  replaces it with the etag read before, inserts the certificate, and marks the superseded one. The
  owner is set when the head is made and checked against that same etag, so two instances cannot both
  make a device theirs, nor both make a certificate active.
- **One device per key**: the key binding, inserted before the device transaction (fails if the key is
  bound). A request that finds the binding its own (same device) rewrites it with its etag, so that a
  refused request removing a binding it made (delete with its etag) never removes one someone relies on.
- **Revoked keys never again**: a revocation's device transaction (again on the head's etag) revokes the
  certificate and every active one of the key (a key serves one device, so they all live in that
  partition: one commit) and adds the key to the head's revoked keys; the binding is then marked. Every
  issuance checks the head it commits against, so the head alone holds the rule.
- **Unique serials**: the serial index row, inserted (fails if it exists) before the certificate.
- **An expiry stage announced once**: a merge of the stage onto the row the scan read (the expiry index row,
  or the CA record), on that read's etag: of scans racing, one write succeeds and that scan announces.
- **One root**: the `~root` marker, created in the same transaction (partition `ca`) as the root record.
- **Unique CA IDs, principal IDs, application IDs**: inserts in the `ca` / `principal` partitions (the
  app ID marker in the same transaction as its principal).

Order and crashes. An issuance writes its index rows (serial, requester, expiry), then the key binding,
then the device transaction, which is the commit: nothing is returned before it succeeded. A crash (or
a Storage failure that outlasts the retries) between two writes leaves at most index rows that point at
no certificate (every read through an index looks the certificate up in its device partition and skips
what is not there) and a key binding to a device that holds no certificate of that key (the key can
still be certified for that device, and for no other: stricter, never looser). A revocation that stops
after its device transaction has revoked the certificates and the key in the head, which every issuance
checks; repeating it marks the binding. Refused requests remove what they wrote where they can.

Why this layout and not DESIGN's sketch: the head carries a copy of the active certificate (a same-CSR
retry is one read) and the device's revoked keys (so that a revocation and an issuance meet on one etag);
a certificate's RowKey starts with its issue time (a device's history lists in order); serial rows are
spread over sixteen partitions by the serial's last hex digit (the first digit of a 159-bit serial takes
only eight values), few enough that a commit of many certificates shares their transactions. A head
cached from an earlier read only supplies an etag: whatever is decided without a write (the same key's
certificate handed back, another key refused) rests on a head read during that commit.

Queries: by serial (two point reads), by device (one partition), a requester's certificates (its index
partition, then a point read per certificate), the expiry window (a range of day partitions, then point
reads), each paged by the SDK's continuation tokens inside the API's `cursor`. A listing by intermediate
or status alone, or of the whole fleet, **scans** the devices table (filtered by Storage, billed per page).

Costs, in Storage transactions (each HTTP request; an entity group transaction is one): a new device
certificate reads its head once before signing and then writes the key binding and the device
transaction (3); its three index rows go in per-partition transactions shared by every certificate of
a commit, so they cost 3 alone and a fraction of one in a batch. A same-CSR retry reads the head (1).
The key binding is not read before signing: its insert finds a key used elsewhere, after the signature.
"""

import base64
import binascii
import hashlib
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableTransactionError, UpdateMode

from ..errors import BackendUnavailable, CaError, Conflict, NotFound
from ..parameters import unicode_text
from ..tablestore import MAX_ENTITIES_PER_REQUEST, TableStore, storage_errors, storage_failure
from . import Ledger, device_has_certificate, device_owned_elsewhere, invalid_cursor, key_in_use, key_revoked
from .models import (
    CA_ACTIVE,
    CERT_ACTIVE,
    CERT_EXPIRED,
    CERT_REVOKED,
    CERT_SUPERSEDED,
    DEVICE,
    EXPIRY_TOPIC,
    ROOT,
    ApiKey,
    CaRecord,
    CertificatePage,
    CertificateQuery,
    CertificateRecord,
    ExpiryWatch,
    Issuance,
    Precheck,
    Principal,
    Revocation,
)
from .tables_batches import BATCHES, TableBatches

DEVICES, KEYS, INDEX, CAS, PRINCIPALS = "devices", "keys", "index", "cas", "principals"
TABLES = [DEVICES, KEYS, INDEX, CAS, PRINCIPALS, BATCHES]
HEAD = "head"
BINDING = "binding"
CERT_ROWS = ("c-", "c.")  # RowKey range of a partition's certificates
ROOT_MARKER = "~root"
APP_MARKER = "~app-"
CA_PARTITION = "ca"
PRINCIPAL_PARTITION = "principal"
API_KEY_PARTITION = "apikey"
MAX_TRANSACTION_OPERATIONS = 100  # Table Storage: an entity group transaction holds at most 100
MAX_ATTEMPTS = 20  # conditional writes lost to concurrent writers before the caller is told to retry
SERVER_PAGE = 200  # entities per query request in listings; part of every cursor
PARALLEL_CALLS = 16
_HEAD_CACHE = 4096
IF_NOT_MODIFIED = MatchConditions.IfNotModified
_FORBIDDEN_KEY_CHARACTERS = set("/\\#?%")  # Table Storage: not in keys ('%' is the escape here)
EXPIRY_TABLES = {True: INDEX, False: CAS}  # where a watch's stage is kept: device certificates, CAs


@dataclass(frozen=True)
class _Head:
    """A device head as read: `etag` None when the device has none (never certified)."""

    device_id: str
    etag: str | None
    owner: str | None = None
    created_at: str = ""
    revoked_keys: frozenset[str] = frozenset()
    active: CertificateRecord | None = None


@dataclass
class _Claim:
    """A key binding this request wrote: `created` when it made it (and may remove it if refused)."""

    etag: str
    created: bool


class TableLedger(TableBatches, Ledger):
    backend = "tables"
    remote = True

    def __init__(self, store: TableStore) -> None:
        self.store = store
        store.ensure_tables(TABLES)
        self._pool = ThreadPoolExecutor(max_workers=PARALLEL_CALLS, thread_name_prefix="ledger-tables")
        self._heads: OrderedDict[str, _Head] = OrderedDict()
        self._heads_lock = threading.Lock()
        self.expiry_rows_read = 0  # entities the expiry scan's reads returned (bench/expiry_scan.py)

    def _table(self, name: str):
        return self.store.table(name)

    def describe(self) -> dict[str, str]:
        return {"backend": self.backend, **self.store.describe()}

    def ping(self) -> None:
        with storage_errors("read the ledger"), suppress(ResourceNotFoundError):
            self._table(CAS).get_entity(CA_PARTITION, ROOT_MARKER)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()

    # -- CA certificates ---------------------------------------------------------------------------

    def add_ca(self, record: CaRecord) -> None:
        operations: list[Any] = []
        if record.kind == ROOT:
            operations.append(("create", {"PartitionKey": CA_PARTITION, "RowKey": ROOT_MARKER, "ca_id": record.id}))
        operations.append(("create", _ca_entity(record)))
        with storage_errors("record a CA"):
            try:
                self._table(CAS).submit_transaction(operations)
            except TableTransactionError as error:
                if error.status_code != 409:
                    raise
                if record.kind == ROOT and error.index == 0:
                    raise Conflict("a CA root already exists; this CA keeps one root", "root-exists") from None
                raise Conflict(f"a CA with ID {record.id!r} already exists", "ca-exists") from None

    def get_ca(self, ca_id: str) -> CaRecord | None:
        entity = self._get(CAS, CA_PARTITION, _key(ca_id))
        return _ca(entity) if entity else None

    def get_root(self) -> CaRecord | None:
        marker = self._get(CAS, CA_PARTITION, ROOT_MARKER)
        return self.get_ca(marker["ca_id"]) if marker else None

    def list_cas(self, kind: str | None = None) -> list[CaRecord]:
        entities = self._query(
            CAS, "PartitionKey eq @p and RowKey lt @marker", {"p": CA_PARTITION, "marker": "~"}, "list CAs"
        )
        records = sorted(entities, key=lambda e: (e["created_at"], e["seq"]))
        return [_ca(e) for e in records if kind is None or e["kind"] == kind]

    def set_ca_status(self, ca_id: str, status: str) -> CaRecord:
        return self._update_ca(ca_id, {"status": status})

    def set_ca_dps(self, ca_id: str, dps: dict[str, Any]) -> CaRecord:
        return self._update_ca(ca_id, {"dps": json.dumps(dps, sort_keys=True)})

    def _update_ca(self, ca_id: str, changes: dict[str, Any]) -> CaRecord:
        entity = {"PartitionKey": CA_PARTITION, "RowKey": _key(ca_id), **changes}
        with storage_errors("update a CA"):
            try:
                self._table(CAS).update_entity(entity, mode=UpdateMode.MERGE)
            except ResourceNotFoundError:
                raise NotFound(f"no CA with ID {ca_id!r}", "ca-not-found") from None
        record = self.get_ca(ca_id)
        assert record is not None
        return record

    # -- reads of devices and keys ---------------------------------------------------------------------

    def _read_head(self, device_id: str) -> _Head:
        entity = self._get(DEVICES, _key(device_id), HEAD)
        head = _head(device_id, entity)
        self._remember(head)
        return head

    def _read_heads(self, device_ids: Sequence[str]) -> dict[str, _Head]:
        unique = sorted(set(device_ids))
        return dict(zip(unique, self._parallel(self._read_head, unique), strict=True))

    def _remember(self, head: _Head) -> None:
        with self._heads_lock:
            self._heads[head.device_id] = head
            self._heads.move_to_end(head.device_id)
            while len(self._heads) > _HEAD_CACHE:
                self._heads.popitem(last=False)

    def _known_head(self, device_id: str) -> _Head:
        """The head last read or written here (its etag makes a stale one fail the commit), else a read."""
        with self._heads_lock:
            head = self._heads.get(device_id)
        return head if head is not None else self._read_head(device_id)

    def precheck(self, device_ids: Sequence[str], public_key_sha256s: Sequence[str]) -> Precheck:
        """One read per device (its head): owner, active certificate, and the keys the head knows (the
        active one, the revoked ones). Other keys are checked when the binding is inserted."""
        heads = self._read_heads(device_ids)
        bindings: dict[str, tuple[str, bool]] = {}
        wanted = set(public_key_sha256s)
        for head in heads.values():
            for key in head.revoked_keys & wanted:
                bindings[key] = (head.device_id, True)
            if head.active is not None and head.active.public_key_sha256 in wanted:
                bindings.setdefault(head.active.public_key_sha256, (head.device_id, False))
        return Precheck(
            owners={d: h.owner for d, h in heads.items() if h.owner is not None},
            bindings=bindings,
            actives={d: h.active for d, h in heads.items() if h.active is not None},
        )

    def backup_into(self, home: Path) -> dict[str, int]:
        """Refused: this ledger lives in Table Storage, not under PKI_HOME. Back the account up with Azure's
        own means (an AzCopy export of the tables, or Azure Backup for the Storage account)."""
        raise CaError(
            "the ledger is in Table Storage, not under PKI_HOME: back up its tables with Azure's tools "
            "(AzCopy, or Azure Backup for the Storage account); `backup` copies a SQLite ledger",
            "backup-not-local",
        )

    def devices_with_revocations(self, device_ids: Sequence[str]) -> set[str]:
        """From each device's head as this process last wrote or read it, at no Storage cost after a commit:
        a commit is conditional on the head's etag, so the head it wrote holds every revocation before it,
        and a revocation after it keeps DPS in step itself."""
        return {device_id for device_id in set(device_ids) if self._known_head(device_id).revoked_keys}

    def active_certificates(self, device_ids: Sequence[str]) -> dict[str, CertificateRecord]:
        return {d: h.active for d, h in self._read_heads(device_ids).items() if h.active is not None}

    def device_owners(self, device_ids: Sequence[str]) -> dict[str, str]:
        return {d: h.owner for d, h in self._read_heads(device_ids).items() if h.owner is not None}

    def key_bindings(self, public_key_sha256s: Sequence[str]) -> dict[str, tuple[str, bool]]:
        unique = sorted(set(public_key_sha256s))
        entities = self._parallel(lambda key: self._get(KEYS, _key(key), BINDING), unique)
        return {key: (e["device_id"], bool(e["revoked"])) for key, e in zip(unique, entities, strict=True) if e}

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        row = self._get(INDEX, _serial_partition(serial), _key(serial))
        if row is None:
            return None
        entity = self._get(DEVICES, _key(row["device_id"]), row["cert_row"])
        return _certificate(entity) if entity else None

    # -- issuing ---------------------------------------------------------------------------------------

    def record_issued(self, issuances: Sequence[Issuance]) -> list[CertificateRecord | CaError]:
        """Index rows first (grouped into one transaction per index partition), then for each issuance its
        key binding and its device transaction. Issuances that share a device or a key are committed one
        after another in the order given; the others in parallel."""
        issuances = list(issuances)
        results: list[CertificateRecord | CaError | None] = [None] * len(issuances)
        written = self._write_index_rows(issuances, results)
        pending = [i for i, result in enumerate(results) if result is None]
        for cluster, outcomes in zip(
            clusters := _clusters([issuances[i] for i in pending]),
            self._parallel(lambda group: [self._commit_guarded(issuances[pending[i]]) for i in group], clusters),
            strict=True,
        ):
            for position, outcome in zip(cluster, outcomes, strict=True):
                results[pending[position]] = outcome
        refused = [
            (issuance.record, rows)
            for issuance, result, rows in zip(issuances, results, written, strict=True)
            if rows and not (isinstance(result, CertificateRecord) and result.serial == issuance.record.serial)
        ]
        held = self._parallel(self._holds, [record for record, _ in refused])
        leftovers = [row for (_, rows), kept in zip(refused, held, strict=True) if not kept for row in rows]
        if leftovers:
            self._delete_quietly(INDEX, leftovers)
        return results  # type: ignore[return-value]

    def _holds(self, record: CertificateRecord) -> bool:
        """Whether the device's partition holds `record`, committed by an earlier attempt (this same
        certificate recorded again, and refused now because the device was renewed since): the index rows
        found or rewritten for it are then its own, and deleting them would leave it unfindable by serial.
        True when it cannot be read, for the same reason: an index row pointing at nothing is harmless."""
        try:
            return self._get(DEVICES, _key(record.device_id), _cert_row(record)) is not None
        except CaError:
            return True

    def _write_index_rows(
        self, issuances: list[Issuance], results: list[CertificateRecord | CaError | None]
    ) -> list[list[tuple[str, str]]]:
        """Insert each issuance's serial row (refused if the serial is taken) and upsert its requester and
        expiry rows. Returns, per issuance, the rows written for it; failures land in `results`."""
        written: list[list[tuple[str, str]]] = [[] for _ in issuances]
        by_partition: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        for index, issuance in enumerate(issuances):
            for operation, entity in _index_entities(issuance.record):
                by_partition.setdefault(entity["PartitionKey"], []).append((index, operation, entity))
        chunks = [
            rows[start : start + MAX_TRANSACTION_OPERATIONS]
            for rows in by_partition.values()
            for start in range(0, len(rows), MAX_TRANSACTION_OPERATIONS)
        ]
        for chunk, outcome in zip(chunks, self._parallel(self._write_index_chunk, chunks), strict=True):
            for (index, _, entity), failure in zip(chunk, outcome, strict=True):
                if failure is None:
                    written[index].append((entity["PartitionKey"], entity["RowKey"]))
                elif results[index] is None:
                    results[index] = failure
        return written

    def _write_index_chunk(self, chunk: list[tuple[int, str, dict[str, Any]]]) -> list[CaError | None]:
        table = self._table(INDEX)
        try:
            with storage_errors("write index rows"):
                try:
                    table.submit_transaction([(operation, entity) for _, operation, entity in chunk])
                    return [None] * len(chunk)
                except TableTransactionError as error:
                    if error.status_code != 409:
                        raise
        except CaError as error:
            return [error] * len(chunk)
        return [self._write_index_row(table, operation, entity) for _, operation, entity in chunk]

    @staticmethod
    def _write_index_row(table: Any, operation: str, entity: dict[str, Any]) -> CaError | None:
        """One index row on its own, after its partition's transaction found a row taken."""
        try:
            with storage_errors("write an index row"):
                if operation == "upsert":
                    table.upsert_entity(entity, mode=UpdateMode.REPLACE)
                    return None
                try:
                    table.create_entity(entity)
                    return None
                except ResourceExistsError:
                    existing = table.get_entity(entity["PartitionKey"], entity["RowKey"])
        except CaError as error:
            return error
        if existing.get("device_id") == entity["device_id"] and existing.get("cert_row") == entity["cert_row"]:
            return None  # this very row, written by an earlier attempt
        return Conflict(f"the ledger refused certificate {entity['RowKey']}: its serial is taken", "ledger-conflict")

    def _commit_guarded(self, issuance: Issuance) -> CertificateRecord | CaError:
        try:
            return self._commit(issuance)
        except CaError as error:
            return error
        except AzureError as error:
            failure = storage_failure(error, "commit a certificate")
            if isinstance(failure, CaError):
                return failure
            raise

    def _commit(self, issuance: Issuance) -> CertificateRecord:
        new = issuance.record
        head = self._known_head(new.device_id)
        fresh = False  # read during this commit: what is decided without a write must rest on such a read
        claim: _Claim | None = None
        try:
            for _ in range(MAX_ATTEMPTS):
                refusal = _refusal(issuance, head)  # an owner never changes, revoked keys only grow
                if refusal is not None:
                    raise refusal
                if claim is None:
                    claim = self._claim_key(issuance)
                active = head.active
                if active is not None and active.serial == new.serial:
                    if not fresh:
                        head, fresh = self._read_head(new.device_id), True
                        continue
                    return active  # this very certificate, committed by an earlier attempt whose answer was lost
                if active is not None and issuance.retry_since is not None and _retried(issuance, active):
                    if not fresh:
                        head, fresh = self._read_head(new.device_id), True
                        continue
                    return active  # a retried renewal: the first attempt's certificate
                if active is not None and not issuance.supersede:
                    if not fresh:
                        head, fresh = self._read_head(new.device_id), True
                        continue
                    if active.public_key_sha256 == new.public_key_sha256:
                        return active  # the same request, committed first (or by an earlier attempt)
                    raise device_has_certificate(active)
                operations = _device_operations(issuance, head)
                try:
                    answers = self._table(DEVICES).submit_transaction(operations)
                except TableTransactionError as error:
                    if error.status_code not in (409, 412):
                        raise
                    head, fresh = self._read_head(new.device_id), True
                    certificate_taken = error.status_code == 409 and error.index == len(operations) - 1
                    if certificate_taken and (head.active is None or head.active.serial != new.serial):
                        taken = f"certificate {new.serial} is already in the ledger"
                        raise Conflict(taken, "ledger-conflict") from None
                    continue
                self._remember(_committed_head(issuance, head, answers[0]["etag"]))
                return new  # the binding now holds a certificate: nothing after the commit may release it
            raise BackendUnavailable(
                f"device {new.device_id!r} is being changed by many requests at once; try again",
                "ledger-busy",
                retry_after=1,
            )
        except CaError as error:
            # Released only on a refusal: after a Storage failure the transaction may have landed (a 500
            # sent again meets its own write, then the head read fails), and a binding whose certificate is
            # committed must stay. A binding left pointing at nothing is stricter, never looser.
            if claim is not None and claim.created and not isinstance(error, BackendUnavailable):
                self._release(new.public_key_sha256, claim)
            raise

    def _claim_key(self, issuance: Issuance) -> _Claim:
        """Bind the key to the device (insert), or confirm and rewrite the binding that already does."""
        new = issuance.record
        table = self._table(KEYS)
        partition = _key(new.public_key_sha256)
        for _ in range(MAX_ATTEMPTS):
            try:
                answer = table.create_entity(
                    {"PartitionKey": partition, "RowKey": BINDING, "device_id": new.device_id, "revoked": False}
                )
                return _Claim(answer["etag"], created=True)
            except ResourceExistsError:
                pass
            existing = self._get(KEYS, partition, BINDING)
            if existing is None:
                continue  # removed by a refused request a moment ago: insert it again
            if existing["device_id"] != new.device_id or existing["revoked"]:
                head = self._read_head(new.device_id)  # owner first, as the service decides
                refusal = _refusal(issuance, head)
                if refusal is not None:
                    raise refusal
                if existing["device_id"] != new.device_id:
                    raise key_in_use(existing["device_id"] if issuance.owner is None else None)
                raise key_revoked()
            try:
                answer = table.update_entity(
                    existing,
                    mode=UpdateMode.REPLACE,
                    etag=existing.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
                return _Claim(answer["etag"], created=False)
            except (ResourceModifiedError, ResourceNotFoundError):
                continue
        raise BackendUnavailable("a device key is being claimed by many requests at once; try again", "ledger-busy")

    def _release(self, public_key_sha256: str, claim: _Claim) -> None:
        """Remove a binding this request made and then did not use, unless someone has since relied on it."""
        try:
            self._table(KEYS).delete_entity(
                _key(public_key_sha256), BINDING, etag=claim.etag, match_condition=MatchConditions.IfNotModified
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            pass
        except AzureError:
            pass  # left bound to its device: stricter, never looser (see the module's docstring)

    def _delete_quietly(self, table_name: str, keys: list[tuple[str, str]]) -> None:
        table = self._table(table_name)

        def delete(key: tuple[str, str]) -> None:
            with suppress(AzureError):  # an index row that points at nothing is skipped by every read
                table.delete_entity(*key)

        self._parallel(delete, keys)

    # -- revocation ------------------------------------------------------------------------------------

    def revoke_certificate(self, serial: str, reason: str, at: datetime) -> Revocation:
        row = self._get(INDEX, _serial_partition(serial), _key(serial))
        stamp = _ts(at)
        with storage_errors("revoke a certificate"):
            for _ in range(MAX_ATTEMPTS):
                entity = self._get(DEVICES, _key(row["device_id"]), row["cert_row"]) if row else None
                if entity is None:
                    raise NotFound(f"no certificate with serial {serial}", "certificate-not-found")
                record = _certificate(entity)
                head = self._read_head(record.device_id)
                revoked = {"status": CERT_REVOKED, "status_changed_at": stamp, "status_reason": reason}
                operations: list[Any] = []
                also: list[CertificateRecord] = []
                if record.status != CERT_REVOKED:
                    operations.append(("update", {**_keys_of(entity), **revoked}, {"mode": UpdateMode.MERGE}))
                    record = replace(record, status=CERT_REVOKED, status_changed_at=_dt(stamp), status_reason=reason)
                else:  # revoked before (a repeat, or this call's own write sent again): as that first answer said
                    also = self._revoked_with(record)
                active = head.active
                if active is not None and active.public_key_sha256 == record.public_key_sha256:
                    if active.serial != record.serial:
                        keys = {"PartitionKey": _key(active.device_id), "RowKey": _cert_row(active)}
                        operations.append(("update", {**keys, **revoked}, {"mode": UpdateMode.MERGE}))
                        also.append(
                            replace(active, status=CERT_REVOKED, status_changed_at=_dt(stamp), status_reason=reason)
                        )
                    active = None
                new_head = replace(head, active=active, revoked_keys=head.revoked_keys | {record.public_key_sha256})
                head_entity = _head_entity(new_head)
                conditions = {"mode": UpdateMode.REPLACE, "etag": head.etag, "match_condition": IF_NOT_MODIFIED}
                operations.insert(0, ("update", head_entity, conditions))
                try:
                    answers = self._table(DEVICES).submit_transaction(operations)
                except TableTransactionError as error:
                    if error.status_code == 412:  # the head changed since it was read (only updates here: no 409)
                        continue
                    raise
                self._remember(replace(new_head, etag=answers[0]["etag"]))
                break
            else:
                raise BackendUnavailable("the device is being changed by many requests at once; retry", "ledger-busy")
            self._table(KEYS).upsert_entity(
                {
                    "PartitionKey": _key(record.public_key_sha256),
                    "RowKey": BINDING,
                    "device_id": record.device_id,
                    "revoked": True,
                },
                mode=UpdateMode.MERGE,
            )
        return Revocation(record, tuple(also))

    def _revoked_with(self, record: CertificateRecord) -> list[CertificateRecord]:
        """The device's other certificates of `record`'s key revoked at the same moment: those its revocation
        revoked too (one key is bound to one device, so its partition holds them all)."""
        where = (
            "PartitionKey eq @d and RowKey ge @lo and RowKey lt @hi and public_key_sha256 eq @k "
            "and status eq @s and status_changed_at eq @t"
        )
        params = {
            "d": _key(record.device_id),
            "lo": "c-",
            "hi": "c.",
            "k": record.public_key_sha256,
            "s": CERT_REVOKED,
            "t": _ts(record.status_changed_at),
        }
        rows = self._query(DEVICES, where, params, "read a revocation")
        return [other for other in map(_certificate, rows) if other.serial != record.serial]

    # -- listing ---------------------------------------------------------------------------------------

    def list_certificates(self, query: CertificateQuery) -> CertificatePage:
        fingerprint = _fingerprint(query)
        token, skip = _read_cursor(query.cursor, fingerprint)
        if query.device_id is not None:
            table, where, params = (
                DEVICES,
                "PartitionKey eq @d and RowKey ge @lo and RowKey lt @hi",
                {
                    "d": _key(query.device_id),
                    "lo": CERT_ROWS[0],
                    "hi": CERT_ROWS[1],
                },
            )
            where, params = _with_property_filters(where, params, query)
            resolve = self._as_certificates
        elif query.requested_by is not None:
            table, where, params = INDEX, "PartitionKey eq @p", {"p": _key(f"req-{query.requested_by}")}
            resolve = self._through_index
        elif query.expiring_before is not None and query.status == CERT_ACTIVE:
            # the expiry scan retires other certificates' rows from the index: only active ones are all there
            table, where = INDEX, "PartitionKey gt @lo and PartitionKey le @hi"
            params = {"lo": "exp-", "hi": f"exp-{query.expiring_before.astimezone(UTC):%Y-%m-%d}"}
            resolve = self._through_index
        else:  # no index serves this: a scan of the devices table, filtered by Storage
            table, where, params = DEVICES, "RowKey ge @lo and RowKey lt @hi", {"lo": CERT_ROWS[0], "hi": CERT_ROWS[1]}
            where, params = _with_property_filters(where, params, query)
            resolve = self._as_certificates

        def wanted(record: CertificateRecord) -> bool:
            return _matches(record, query)

        with storage_errors("list certificates"):
            items, resume = self._page(table, where, params, token, skip, query.limit, resolve, wanted)
        return CertificatePage(items, _write_cursor(resume, fingerprint) if resume else None)

    def _page(
        self,
        table_name: str,
        where: str,
        params: dict[str, Any],
        token: Any,
        skip: int,
        limit: int,
        resolve: Callable[[list[dict[str, Any]]], list[CertificateRecord | None]],
        wanted: Callable[[CertificateRecord], bool],
    ) -> tuple[list[CertificateRecord], tuple[Any, int] | None]:
        """Up to `limit` records from the query's pages, starting `skip` rows into the page at `token`; and
        where to resume (a page's continuation token and the rows of it already used), or None at the end."""
        table = self._table(table_name)
        items: list[CertificateRecord] = []
        while True:
            pages = table.query_entities(where, parameters=params, results_per_page=SERVER_PAGE).by_page(
                continuation_token=token
            )
            rows = list(next(pages))
            following = pages.continuation_token
            position = skip
            while position < len(rows):
                need = max(limit + 1 - len(items), 1)
                batch = rows[position : position + need]
                for offset, record in enumerate(resolve(batch)):
                    if record is None or not wanted(record):
                        continue
                    if len(items) == limit:
                        return items, (token, position + offset)
                    items.append(record)
                position += len(batch)
            if following is None:
                return items, None
            token, skip = following, 0

    def _as_certificates(self, rows: list[dict[str, Any]]) -> list[CertificateRecord | None]:
        return [_certificate(row) for row in rows]

    def _through_index(self, rows: list[dict[str, Any]]) -> list[CertificateRecord | None]:
        entities = self._parallel(lambda row: self._get(DEVICES, _key(row["device_id"]), row["cert_row"]), rows)
        return [_certificate(entity) if entity else None for entity in entities]

    # -- the expiry scan ---------------------------------------------------------------------------------

    def expiry_watch(self, before: datetime) -> list[ExpiryWatch]:
        """The expiry index's day partitions up to `before`'s day (one range query, paged by Storage), and
        each row's certificate by the pointer it holds (a point read): two rows per certificate. The
        index keeps every certificate ever issued until the scan retires it, so a certificate found no
        longer active (superseded, revoked, expired) has its row deleted here, and is read once. A row
        whose certificate is missing (an issuance in flight, or one a crash cut short) is left alone. The
        stage last announced is kept on the index row itself (`expiry_stage`)."""
        bound = _ts(before)
        where = "PartitionKey gt @lo and PartitionKey le @hi"
        params = {"lo": "exp-", "hi": f"exp-{before.astimezone(UTC):%Y-%m-%d}"}
        with storage_errors("read the expiry index"):
            returned = list(
                self._table(INDEX).query_entities(where, parameters=params, results_per_page=MAX_ENTITIES_PER_REQUEST)
            )
            self.expiry_rows_read += len(returned)  # the last day's rows after `before` too: Storage read them
            rows = [row for row in returned if _ts(_expiry_row_not_after(row["RowKey"])) <= bound]
            entities = self._parallel(lambda row: self._get(DEVICES, _key(row["device_id"]), row["cert_row"]), rows)
        self.expiry_rows_read += sum(1 for entity in entities if entity)
        watches = []
        for row, entity in zip(rows, entities, strict=True):
            if entity is None:
                continue
            record = _certificate(entity)
            watch = ExpiryWatch(
                record.serial,
                DEVICE,
                record.device_id,
                record.not_after,
                row.get("expiry_stage") or None,
                version=(row["PartitionKey"], row["RowKey"], row.metadata["etag"]),
                record=record,
            )
            if record.status == CERT_ACTIVE:
                watches.append(watch)
            else:
                self.retire_expiry_watch(watch)
        return sorted(watches, key=lambda w: w.not_after)

    def ca_expiry_watch(self, topic: str = EXPIRY_TOPIC) -> list[ExpiryWatch]:
        """The CA records, each with the stage kept on it for `topic` (the `ca` partition: a few rows)."""
        entities = self._query(
            CAS, "PartitionKey eq @p and RowKey lt @marker", {"p": CA_PARTITION, "marker": "~"}, "list CAs"
        )
        self.expiry_rows_read += len(entities)
        prop = _stage_property(topic)
        return [
            ExpiryWatch(
                e["serial"],
                e["kind"],
                e["id"],
                _dt(e["not_after"]),
                e.get(prop) or None,
                topic,
                (e["PartitionKey"], e["RowKey"], e.metadata["etag"]),
                _ca(e),
            )
            for e in sorted(entities, key=lambda e: (e["created_at"], e["seq"]))
        ]

    def claim_expiry_stage(self, watch: ExpiryWatch, stage: str, at: datetime) -> ExpiryWatch | None:
        """A merge of the stage onto the row the watch was read from, on that read's etag: a concurrent
        scan's claim changed the etag, so this one fails (412) and announces nothing. A device certificate
        is read first: one that is no longer active is not claimed."""
        if watch.kind == DEVICE:
            entity = self._get(DEVICES, _key(watch.subject), _cert_row(watch.record))
            self.expiry_rows_read += entity is not None
            if entity is None or entity["status"] != CERT_ACTIVE:
                return None
        table = EXPIRY_TABLES[watch.kind == DEVICE]
        partition, row, etag = watch.version
        claim = secrets.token_hex(8)  # tells this claim from another scan's when the answer goes astray
        stage_property = _stage_property(watch.topic)
        changes = {"PartitionKey": partition, "RowKey": row, stage_property: stage, f"{stage_property}_claim": claim}
        with storage_errors("record an expiry stage"):
            try:
                answer = self._table(table).update_entity(
                    changes, mode=UpdateMode.MERGE, etag=etag, match_condition=IF_NOT_MODIFIED
                )
                return replace(watch, stage=stage, version=(partition, row, answer["etag"]))
            except (ResourceModifiedError, ResourceNotFoundError):
                held = self._held(table, changes)  # Storage's 500 sent again meets its own write, or another's
            except AzureError:
                held = self._landed(table, changes)  # the merge may have landed, its answer lost
                if held is None:
                    raise
        return None if held is None else replace(watch, stage=stage, version=(partition, row, held.metadata["etag"]))

    def release_expiry_stage(self, claimed: ExpiryWatch, previous: str | None) -> None:
        table = EXPIRY_TABLES[claimed.kind == DEVICE]
        partition, row, etag = claimed.version
        changes = {"PartitionKey": partition, "RowKey": row, _stage_property(claimed.topic): previous or ""}
        with storage_errors("release an expiry stage"), suppress(ResourceModifiedError, ResourceNotFoundError):
            self._table(table).update_entity(changes, mode=UpdateMode.MERGE, etag=etag, match_condition=IF_NOT_MODIFIED)

    def mark_expired(self, watch: ExpiryWatch, at: datetime) -> CertificateRecord | None:
        """The device's transaction on its head's etag: the head loses its active certificate and the
        certificate's row gets the status expired, together (as a revocation does). Then the index row goes."""
        stamp = _ts(at)
        marked: CertificateRecord | None = None
        with storage_errors("mark a certificate expired"):
            for _ in range(MAX_ATTEMPTS):
                record = self.get_certificate(watch.serial)
                if record is not None and record.status == CERT_ACTIVE and record.not_after > at:
                    return None  # not over yet: still watched
                if record is None or record.status != CERT_ACTIVE:
                    break
                head = self._read_head(record.device_id)
                if head.active is None or head.active.serial != record.serial:
                    break  # superseded or revoked since it was read (the head names the active one): not expired
                expired = {"status": CERT_EXPIRED, "status_changed_at": stamp, "status_reason": "expired"}
                keys = {"PartitionKey": _key(record.device_id), "RowKey": _cert_row(record)}
                operations: list[Any] = [("update", {**keys, **expired}, {"mode": UpdateMode.MERGE})]
                new_head = replace(head, active=None)
                conditions = {"mode": UpdateMode.REPLACE, "etag": head.etag, "match_condition": IF_NOT_MODIFIED}
                operations.insert(0, ("update", _head_entity(new_head), conditions))
                try:
                    answers = self._table(DEVICES).submit_transaction(operations)
                except TableTransactionError as error:
                    if error.status_code == 412:  # the head changed since it was read (only updates here: no 409)
                        continue
                    raise
                self._remember(replace(new_head, etag=answers[0]["etag"]))
                marked = replace(record, status=CERT_EXPIRED, status_changed_at=_dt(stamp), status_reason="expired")
                break
            else:
                raise BackendUnavailable("the device is being changed by many requests at once; retry", "ledger-busy")
        self.retire_expiry_watch(watch)
        return marked

    def retire_expiry_watch(self, watch: ExpiryWatch) -> None:
        """Delete the certificate's expiry index row (a listing of expiring certificates that are not
        active then scans the devices table: see `list_certificates`)."""
        partition, row, _ = watch.version
        with storage_errors("retire an expiry index row"), suppress(ResourceNotFoundError):
            self._table(INDEX).delete_entity(partition, row)

    # -- principals and API keys -----------------------------------------------------------------------

    def add_principal(self, principal: Principal) -> None:
        entity = _principal_entity(principal)
        operations: list[Any] = [("create", entity)]
        if principal.app_id:
            marker = {"PartitionKey": PRINCIPAL_PARTITION, "RowKey": _key(APP_MARKER + principal.app_id)}
            operations.append(("create", {**marker, "principal_id": principal.id}))
        with storage_errors("record a principal"):
            try:
                self._table(PRINCIPALS).submit_transaction(operations)
            except TableTransactionError as error:
                if error.status_code != 409:
                    raise
                if self._held(PRINCIPALS, entity) is not None:
                    return  # its own write: Storage's 500 ("may or may not have succeeded") sent again by the SDK
                if error.index == 1:
                    raise Conflict(
                        f"application ID {principal.app_id} is already bound to a factory", "app-id-taken"
                    ) from None
                raise Conflict(f"a principal called {principal.id!r} already exists", "principal-exists") from None
            except AzureError:
                if self._landed(PRINCIPALS, entity) is None:
                    raise

    def get_principal(self, principal_id: str) -> Principal | None:
        entity = self._get(PRINCIPALS, PRINCIPAL_PARTITION, _key(principal_id))
        return _principal(entity) if entity else None

    def principal_for_app(self, app_id: str) -> Principal | None:
        marker = self._get(PRINCIPALS, PRINCIPAL_PARTITION, _key(APP_MARKER + app_id))
        return self.get_principal(marker["principal_id"]) if marker else None

    def list_principals(self) -> list[Principal]:
        entities = self._query(
            PRINCIPALS, "PartitionKey eq @p and RowKey lt @m", {"p": PRINCIPAL_PARTITION, "m": "~"}, "list principals"
        )
        return [_principal(e) for e in sorted(entities, key=lambda e: e["seq"])]

    def set_principal_intermediates(self, principal_id: str, intermediates: Sequence[str]) -> Principal:
        entity = {
            "PartitionKey": PRINCIPAL_PARTITION,
            "RowKey": _key(principal_id),
            "intermediates": json.dumps(list(intermediates)),
        }
        with storage_errors("update a principal"):
            try:
                self._table(PRINCIPALS).update_entity(entity, mode=UpdateMode.MERGE)
            except ResourceNotFoundError:
                raise NotFound(f"no principal called {principal_id!r}", "principal-not-found") from None
        principal = self.get_principal(principal_id)
        assert principal is not None
        return principal

    def add_api_key(self, key: ApiKey) -> None:
        entity = {
            "PartitionKey": API_KEY_PARTITION,
            "RowKey": _key(key.id),
            "principal_id": key.principal_id,
            "secret_sha256": key.secret_sha256,
            "created_at": _ts(key.created_at),
            "revoked_at": _ts(key.revoked_at) if key.revoked_at else "",
        }
        with storage_errors("record an API key"):
            try:
                self._table(PRINCIPALS).create_entity(entity)
            except ResourceExistsError:
                if self._held(PRINCIPALS, entity) is not None:
                    return  # its own write: Storage's 500 ("may or may not have succeeded") sent again by the SDK
                raise Conflict(f"an API key with ID {key.id} already exists", "key-exists") from None
            except AzureError:
                if self._landed(PRINCIPALS, entity) is None:
                    raise

    def get_api_key(self, key_id: str) -> ApiKey | None:
        entity = self._get(PRINCIPALS, API_KEY_PARTITION, _key(key_id))
        return _api_key(entity) if entity else None

    def list_api_keys(self) -> list[ApiKey]:
        entities = self._query(PRINCIPALS, "PartitionKey eq @p", {"p": API_KEY_PARTITION}, "list API keys")
        return sorted((_api_key(e) for e in entities), key=lambda k: (k.created_at, k.id))

    def revoke_api_key(self, key_id: str, at: datetime) -> ApiKey:
        with storage_errors("revoke an API key"):
            for _ in range(MAX_ATTEMPTS):
                entity = self._get(PRINCIPALS, API_KEY_PARTITION, _key(key_id))
                if entity is None:
                    raise NotFound(f"no API key with ID {key_id!r}", "key-not-found")
                if entity["revoked_at"]:
                    return _api_key(entity)
                entity["revoked_at"] = _ts(at)
                try:
                    self._table(PRINCIPALS).update_entity(
                        entity,
                        mode=UpdateMode.REPLACE,
                        etag=entity.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified,
                    )
                    return _api_key(entity)
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue
        raise BackendUnavailable("the API key is being changed by many requests at once; try again", "ledger-busy")

    # -- helpers ---------------------------------------------------------------------------------------

    def _held(self, table: str, entity: dict[str, Any]) -> Any | None:
        """The stored entity when `table` holds `entity` as it is, every property, else None: a write found
        taken was this very write (its unique values, a nanosecond sequence, a secret's hash, a claim's
        token, make another one differ)."""
        existing = self._get(table, entity["PartitionKey"], entity["RowKey"])
        if existing is None or any(existing.get(name) != value for name, value in entity.items()):
            return None
        return existing

    def _landed(self, table: str, entity: dict[str, Any]) -> Any | None:
        """After a write failed without an answer (the connection lost: it may have been done), the stored
        entity when it landed; None when it did not, or Storage cannot tell either (the write's own failure
        is then the one to name)."""
        try:
            return self._held(table, entity)
        except CaError:
            return None

    def _get(self, table: str, partition: str, row: str) -> Any:
        """One entity, or None when there is none."""
        with storage_errors("read the ledger"):
            try:
                return self._table(table).get_entity(partition, row)
            except ResourceNotFoundError:
                return None

    def _query(self, table: str, where: str, params: dict[str, Any], action: str) -> list[Any]:
        with storage_errors(action):
            return list(self._table(table).query_entities(where, parameters=params))

    def _parallel(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1:
            return [function(item) for item in items]
        return list(self._pool.map(function, items))


# -- entities ----------------------------------------------------------------------------------------------


def _key(text: str) -> str:
    """A PartitionKey or RowKey for `text`: '/', '\\', '#', '?', '%' and control characters escaped as %XX."""
    if not any(c in _FORBIDDEN_KEY_CHARACTERS or ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        return text
    return "".join(
        f"%{ord(c):02X}" if c in _FORBIDDEN_KEY_CHARACTERS or ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text
    )


def _serial_partition(serial: str) -> str:
    """Sixteen partitions by the serial's last hex digit (random): a commit's serial rows share a few."""
    return f"ser-{serial[-1:].upper() or '0'}"


def _compact(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S")


def _cert_row(record: CertificateRecord) -> str:
    return f"c-{_compact(record.created_at)}-{record.serial}"


def _keys_of(entity: dict[str, Any]) -> dict[str, str]:
    return {"PartitionKey": entity["PartitionKey"], "RowKey": entity["RowKey"]}


def _index_entities(record: CertificateRecord) -> list[tuple[str, dict[str, Any]]]:
    pointer = {"device_id": record.device_id, "cert_row": _cert_row(record), "serial": record.serial}
    return [
        ("create", {"PartitionKey": _serial_partition(record.serial), "RowKey": _key(record.serial), **pointer}),
        (
            "upsert",
            {
                "PartitionKey": _key(f"req-{record.requested_by}"),
                "RowKey": f"{_compact(record.created_at)}-{record.serial}",
                **pointer,
            },
        ),
        (
            "upsert",
            {
                "PartitionKey": f"exp-{record.not_after.astimezone(UTC):%Y-%m-%d}",
                "RowKey": f"{_compact(record.not_after)}-{record.serial}",
                **pointer,
            },
        ),
    ]


def _record_fields(record: CertificateRecord) -> dict[str, Any]:
    return {
        "serial": record.serial,
        "device_id": record.device_id,
        "intermediate_id": record.intermediate_id,
        "requested_by": record.requested_by,
        "public_key_sha256": record.public_key_sha256,
        "not_before": _ts(record.not_before),
        "not_after": _ts(record.not_after),
        "certificate_pem": record.certificate_pem,
        "created_at": _ts(record.created_at),
        "status": record.status,
        "status_changed_at": _ts(record.status_changed_at) if record.status_changed_at else "",
        "status_reason": record.status_reason or "",
    }


def _certificate(fields: dict[str, Any]) -> CertificateRecord:
    return CertificateRecord(
        serial=fields["serial"],
        device_id=fields["device_id"],
        intermediate_id=fields["intermediate_id"],
        requested_by=fields["requested_by"],
        public_key_sha256=fields["public_key_sha256"],
        not_before=_dt(fields["not_before"]),
        not_after=_dt(fields["not_after"]),
        certificate_pem=fields["certificate_pem"],
        created_at=_dt(fields["created_at"]),
        status=fields["status"],
        status_changed_at=_dt(fields.get("status_changed_at")),
        status_reason=fields.get("status_reason") or None,
    )


def _head(device_id: str, entity: Any) -> _Head:
    if entity is None:
        return _Head(device_id, None)
    active = json.loads(entity["active"]) if entity.get("active") else None
    return _Head(
        device_id=device_id,
        etag=entity.metadata["etag"],
        owner=entity["owner"],
        created_at=entity["created_at"],
        revoked_keys=frozenset(json.loads(entity.get("revoked_keys") or "[]")),
        active=_certificate(active) if active else None,
    )


def _head_entity(head: _Head) -> dict[str, Any]:
    """The head as stored. Its revoked keys are a JSON list in one property (32K characters: ~480 keys)."""
    return {
        "PartitionKey": _key(head.device_id),
        "RowKey": HEAD,
        "owner": head.owner,
        "created_at": head.created_at,
        "revoked_keys": json.dumps(sorted(head.revoked_keys)),
        "active": json.dumps(_record_fields(head.active)) if head.active else "",
    }


def _expiry_row_not_after(row_key: str) -> datetime:
    """The notAfter an expiry index row's RowKey (`<yyyymmddhhmmss>-<serial>`) starts with."""
    return datetime.strptime(row_key[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def _stage_property(topic: str) -> str:
    """The property that keeps a topic's stage: `expiry_stage`, `key_vault_stage`."""
    return f"{topic.replace('-', '_')}_stage"


def _retried(issuance: Issuance, active: CertificateRecord) -> bool:
    """Whether this renewal retries the one that made `active`: the same key, made since `retry_since`."""
    assert issuance.retry_since is not None
    return active.public_key_sha256 == issuance.record.public_key_sha256 and active.created_at >= issuance.retry_since


def _refusal(issuance: Issuance, head: _Head) -> CaError | None:
    """What the head says against this issuance before the key: its owner, then its revoked keys."""
    new = issuance.record
    if head.etag is not None and issuance.owner is not None and head.owner != issuance.owner:
        return device_owned_elsewhere(new.device_id)
    if new.public_key_sha256 in head.revoked_keys:
        return key_revoked()
    return None


def _new_head(issuance: Issuance, head: _Head) -> _Head:
    new = issuance.record
    if head.etag is None:
        head = replace(head, owner=issuance.owner or new.requested_by, created_at=_ts(new.created_at))
    return replace(head, active=new)


def _device_operations(issuance: Issuance, head: _Head) -> list[Any]:
    """The commit of one certificate: the head (created, or replaced on its etag), the superseded
    certificate marked, the new certificate inserted. One partition, so one atomic transaction."""
    new = issuance.record
    head_entity = _head_entity(_new_head(issuance, head))
    operations: list[Any] = []
    if head.etag is None:
        operations.append(("create", head_entity))
    else:
        conditions = {"mode": UpdateMode.REPLACE, "etag": head.etag, "match_condition": MatchConditions.IfNotModified}
        operations.append(("update", head_entity, conditions))
        if head.active is not None:  # only a superseding issuance gets this far with an active certificate
            superseded = {
                "PartitionKey": _key(new.device_id),
                "RowKey": _cert_row(head.active),
                "status": CERT_SUPERSEDED,
                "status_changed_at": _ts(new.created_at),
                "status_reason": f"renewed as {new.serial}",
            }
            operations.append(("update", superseded, {"mode": UpdateMode.MERGE}))
    cert = {"PartitionKey": _key(new.device_id), "RowKey": _cert_row(new), **_record_fields(new)}
    operations.append(("create", cert))
    return operations


def _committed_head(issuance: Issuance, head: _Head, etag: str) -> _Head:
    return replace(_new_head(issuance, head), etag=etag)


def _clusters(issuances: list[Issuance]) -> list[list[int]]:
    """Positions of issuances linked by a device or a key, each group in the order given."""
    parent = list(range(len(issuances)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, issuance in enumerate(issuances):
        for link in (("d", issuance.record.device_id), ("k", issuance.record.public_key_sha256)):
            if link in first:
                parent[root(i)] = root(first[link])
            else:
                first[link] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(issuances)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _with_property_filters(where: str, params: dict[str, Any], query: CertificateQuery) -> tuple[str, dict[str, Any]]:
    """Filters on certificate properties, applied by Storage (which still reads every row of the range)."""
    for name, value in (
        ("intermediate_id", query.intermediate_id),
        ("status", query.status),
        ("requested_by", query.requested_by),
    ):
        if value is not None:
            where += f" and {name} eq @{name}"
            params[name] = value
    if query.expiring_before is not None:
        where += " and not_after le @not_after"
        params["not_after"] = _ts(query.expiring_before)
    return where, params


def _matches(record: CertificateRecord, query: CertificateQuery) -> bool:
    return (
        (query.device_id is None or record.device_id == query.device_id)
        and (query.intermediate_id is None or record.intermediate_id == query.intermediate_id)
        and (query.status is None or record.status == query.status)
        and (query.requested_by is None or record.requested_by == query.requested_by)
        and (query.expiring_before is None or record.not_after <= query.expiring_before)
    )


def _fingerprint(query: CertificateQuery) -> str:
    """Which listing a cursor belongs to (the expiry bound moves with the clock between pages: left out)."""
    text = json.dumps([query.device_id, query.intermediate_id, query.status, query.requested_by, SERVER_PAGE])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _write_cursor(resume: tuple[Any, int], fingerprint: str) -> str:
    token, skip = resume
    text = json.dumps({"f": fingerprint, "t": token, "s": skip}, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _read_cursor(cursor: str | None, fingerprint: str) -> tuple[Any, int]:
    if not cursor:
        return None, 0
    try:
        document = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        token, skip = document["t"], int(document["s"])
        valid = document["f"] == fingerprint and skip >= 0 and (token is None or _continuation(token))
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        valid = False
    if not valid:
        raise invalid_cursor()
    return token, skip


def _continuation(token: Any) -> bool:
    """Whether `token` is a Storage continuation token as azure-data-tables gives one: {"PartitionKey",
    "RowKey"}, each the text of a key (or None); a forged one (a lone surrogate, another shape) is no
    cursor, and must not reach Storage."""
    if not isinstance(token, dict) or set(token) != {"PartitionKey", "RowKey"}:
        return False
    for key in token.values():
        if key is not None and not (isinstance(key, str) and key.isprintable() and unicode_text(key)):
            return False
    return True


def _seq() -> str:
    """An order of creation for records made in the same second (nanoseconds; ties between instances
    are broken by ID)."""
    return f"{time.time_ns():020d}"


def _ca_entity(record: CaRecord) -> dict[str, Any]:
    return {
        "PartitionKey": CA_PARTITION,
        "RowKey": _key(record.id),
        "id": record.id,
        "kind": record.kind,
        "common_name": record.common_name,
        "curve": record.curve,
        "key_name": record.key_name,
        "key_backend": record.key_backend,
        "serial": record.serial,
        "not_before": _ts(record.not_before),
        "not_after": _ts(record.not_after),
        "certificate_pem": record.certificate_pem,
        "issuer_id": record.issuer_id or "",
        "created_at": _ts(record.created_at),
        "status": record.status,
        "dps": json.dumps(record.dps, sort_keys=True),
        "seq": _seq(),
    }


def _ca(entity: dict[str, Any]) -> CaRecord:
    return CaRecord(
        id=entity["id"],
        kind=entity["kind"],
        common_name=entity["common_name"],
        curve=entity["curve"],
        key_name=entity["key_name"],
        key_backend=entity["key_backend"],
        serial=entity["serial"],
        not_before=_dt(entity["not_before"]),
        not_after=_dt(entity["not_after"]),
        certificate_pem=entity["certificate_pem"],
        issuer_id=entity["issuer_id"] or None,
        created_at=_dt(entity["created_at"]),
        status=entity["status"] or CA_ACTIVE,
        dps=json.loads(entity["dps"] or "{}"),
    )


def _principal_entity(principal: Principal) -> dict[str, Any]:
    return {
        "PartitionKey": PRINCIPAL_PARTITION,
        "RowKey": _key(principal.id),
        "id": principal.id,
        "role": principal.role,
        "intermediates": json.dumps(list(principal.intermediates)),
        "app_id": principal.app_id or "",
        "created_at": _ts(principal.created_at),
        "seq": _seq(),
    }


def _principal(entity: dict[str, Any]) -> Principal:
    return Principal(
        id=entity["id"],
        role=entity["role"],
        intermediates=tuple(json.loads(entity["intermediates"])),
        created_at=_dt(entity["created_at"]),
        app_id=entity["app_id"] or None,
    )


def _api_key(entity: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=entity["RowKey"],
        principal_id=entity["principal_id"],
        secret_sha256=entity["secret_sha256"],
        created_at=_dt(entity["created_at"]),
        revoked_at=_dt(entity["revoked_at"]),
    )


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


__all__ = ["TABLES", "TableLedger"]
