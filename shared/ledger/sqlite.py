"""The embedded ledger: SQLite in WAL mode with durable (synchronous=FULL) commits under PKI_HOME."""

# ruff: noqa: S608 - statements are assembled from constant column lists; every value is a bound parameter.

import asyncio
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, CaError, Conflict, NotFound
from . import Ledger, device_has_certificate, device_owned_elsewhere, invalid_cursor, key_in_use, key_revoked
from .groupcommit import GroupCommit
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
from .sqlite_batches import SqliteBatches

SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS cas (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL CHECK (kind IN ('root', 'intermediate')),
  common_name TEXT NOT NULL,
  curve TEXT NOT NULL,
  key_name TEXT NOT NULL,
  key_backend TEXT NOT NULL,
  serial TEXT NOT NULL UNIQUE,
  not_before TEXT NOT NULL,
  not_after TEXT NOT NULL,
  certificate_pem TEXT NOT NULL,
  issuer_id TEXT REFERENCES cas(id),
  created_at TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
  dps TEXT NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX IF NOT EXISTS one_root ON cas(kind) WHERE kind = 'root';

-- A device belongs to the principal whose request first certified it (DESIGN "Who owns a device").
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS key_bindings (
  public_key_sha256 TEXT PRIMARY KEY,
  device_id TEXT NOT NULL,
  revoked INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS certificates (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  serial TEXT NOT NULL UNIQUE,
  device_id TEXT NOT NULL,
  intermediate_id TEXT NOT NULL REFERENCES cas(id),
  requested_by TEXT NOT NULL,
  public_key_sha256 TEXT NOT NULL REFERENCES key_bindings(public_key_sha256),
  not_before TEXT NOT NULL,
  not_after TEXT NOT NULL,
  certificate_pem TEXT NOT NULL,
  created_at TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked', 'expired')),
  status_changed_at TEXT,
  status_reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_certificate_per_device
  ON certificates(device_id) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS certificates_by_device ON certificates(device_id);
CREATE INDEX IF NOT EXISTS certificates_by_intermediate ON certificates(intermediate_id);
CREATE INDEX IF NOT EXISTS certificates_by_not_after ON certificates(not_after);

CREATE TABLE IF NOT EXISTS principals (
  id TEXT PRIMARY KEY,
  role TEXT NOT NULL CHECK (role IN ('admin', 'factory')),
  intermediates TEXT NOT NULL DEFAULT '[]',
  app_id TEXT UNIQUE,
  created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS api_keys (
  id TEXT PRIMARY KEY,
  principal_id TEXT NOT NULL REFERENCES principals(id),
  secret_sha256 TEXT NOT NULL,
  created_at TEXT NOT NULL,
  revoked_at TEXT
);

-- Batches (DESIGN "Batches", schema 3): a batch, its chunks' deliveries and counts, its items and results.
CREATE TABLE IF NOT EXISTS batches (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  requested_by TEXT NOT NULL,
  intermediate_id TEXT NOT NULL,
  allowed_intermediates TEXT,  -- a factory's intermediates as JSON; NULL for an admin
  created_at TEXT NOT NULL,
  total INTEGER NOT NULL,
  chunk_size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_requester ON batches(requested_by, seq);

CREATE TABLE IF NOT EXISTS batch_chunks (
  batch_id TEXT NOT NULL REFERENCES batches(id),
  chunk INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  started_at TEXT,
  finished_at TEXT,
  last_error TEXT,
  issued INTEGER NOT NULL DEFAULT 0,
  failed INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (batch_id, chunk)
);

CREATE TABLE IF NOT EXISTS batch_items (
  batch_id TEXT NOT NULL REFERENCES batches(id),
  item INTEGER NOT NULL,
  chunk INTEGER NOT NULL,
  device_id TEXT NOT NULL,
  csr TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('pending', 'issued', 'failed')),
  result TEXT,  -- JSON (shared/ledger/batchcodec.py): the certificate as committed, or the error
  finished_at TEXT,
  PRIMARY KEY (batch_id, item)
);
CREATE INDEX IF NOT EXISTS batch_items_by_chunk ON batch_items(batch_id, chunk, item);

-- The expiry scan (schema 4): the stage last announced for each certificate (by serial; a CA's Key Vault
-- check as '<serial>:key-vault'), and the active certificates by notAfter, so that the scan reads about as
-- many rows as it finds (superseded, revoked and expired certificates leave this index).
CREATE TABLE IF NOT EXISTS expiry_notices (
  serial TEXT PRIMARY KEY,
  stage TEXT NOT NULL,
  recorded_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS active_certificates_by_not_after ON certificates(not_after) WHERE status = 'active';

-- A certificate's key must be bound to its device and not revoked: the store refuses anything else.
CREATE TRIGGER IF NOT EXISTS certificate_key_bound_to_device BEFORE INSERT ON certificates
WHEN NOT EXISTS (
  SELECT 1 FROM key_bindings b
  WHERE b.public_key_sha256 = NEW.public_key_sha256 AND b.device_id = NEW.device_id AND b.revoked = 0
)
BEGIN SELECT RAISE(ABORT, 'public key is not bound to this device'); END;

-- Every certificate's device has an owner.
CREATE TRIGGER IF NOT EXISTS certificate_device_owned BEFORE INSERT ON certificates
WHEN NOT EXISTS (SELECT 1 FROM devices d WHERE d.device_id = NEW.device_id)
BEGIN SELECT RAISE(ABORT, 'device has no owner'); END;
"""

# Schema 1 had no owners: each device is owned by whoever asked for its first certificate.
OWNERS_FROM_FIRST_CERTIFICATES = """
INSERT OR IGNORE INTO devices (device_id, owner, created_at)
SELECT c.device_id, c.requested_by, c.created_at FROM certificates c
WHERE c.seq = (SELECT MIN(seq) FROM certificates f WHERE f.device_id = c.device_id);
"""

_CERT_COLUMNS = (
    "serial, device_id, intermediate_id, requested_by, public_key_sha256, not_before, not_after, "
    "certificate_pem, created_at, status, status_changed_at, status_reason"
)
_CA_COLUMNS = (
    "id, kind, common_name, curve, key_name, key_backend, serial, not_before, not_after, "
    "certificate_pem, issuer_id, created_at, status, dps"
)


INLINE_COMMIT_SECONDS = 0.002  # a local SSD's fsync takes well under a millisecond


class SqliteLedger(SqliteBatches, Ledger):
    backend = "sqlite"

    def __init__(
        self, path: Path, busy_timeout_seconds: float = 30.0, inline_commit_seconds: float = INLINE_COMMIT_SECONDS
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._timeout = busy_timeout_seconds
        self._local = threading.local()
        self._writer = threading.Lock()
        self._inline_commit_seconds = inline_commit_seconds
        self.expiry_rows_read = 0  # rows the expiry scan's reads returned (bench/expiry_scan.py)
        self._commit_seconds = 0.0  # a moving average of the event loop's commits
        self._lock_file = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._issuances: GroupCommit[Issuance, CertificateRecord | CaError] = GroupCommit(
            self._record_group, self._record_group_async
        )
        self._connection().execute("PRAGMA journal_mode = WAL")
        self._create_schema()

    # -- connections -------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous = FULL")  # a commit survives power loss, not just a crash
            db.execute("PRAGMA foreign_keys = ON")
            self._local.db = db
        return db

    def _create_schema(self) -> None:
        db = self._connection()
        db.execute("PRAGMA foreign_keys = OFF")  # a table rebuilt (schema 4) is dropped and made again
        try:
            db.execute("BEGIN IMMEDIATE")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            _allow_expired_status(db)
            migration = OWNERS_FROM_FIRST_CERTIFICATES if version < 2 else ""
            for statement in _statements(f"{SCHEMA}\n{migration}\nPRAGMA user_version = {SCHEMA_VERSION};"):
                db.execute(statement)
            if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                raise sqlite3.IntegrityError("the ledger's foreign keys do not hold after its migration")
            db.execute("COMMIT")
        except sqlite3.Error:
            _roll_back(db)
            raise
        finally:
            db.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Writers queue on a lock (threads) and a file lock (processes) rather
        than on SQLite's busy handler, which sleeps a millisecond and more before it tries again."""
        with self._writer:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                db = self._begin()
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    _roll_back(db)
                    raise
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    @asynccontextmanager
    async def _write_async(self) -> AsyncIterator[sqlite3.Connection]:
        """`_write` on the event loop: the locks are waited for off the loop, the COMMIT as `_commit_async`
        decides. Sync writes must not run on the loop's thread meanwhile (none do: sync routes run in threads)."""
        if not self._writer.acquire(blocking=False):
            await asyncio.to_thread(self._writer.acquire)
        try:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                await asyncio.to_thread(fcntl.flock, self._lock_file, fcntl.LOCK_EX)
            try:
                db = self._begin()
                try:
                    yield db
                    await self._commit_async(db)
                except BaseException:
                    _roll_back(db)
                    raise
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        finally:
            self._writer.release()

    async def _commit_async(self, db: sqlite3.Connection) -> None:
        """COMMIT, with its fsync, on the loop while fsyncs are quick: a thread costs more than a fast
        disk's fsync, mostly in waiting for the GIL back from a busy loop (bench/http_sign.py: 10-20%
        more certificates a second on the loop). A slow disk would stall the loop, so while commits
        average over `inline_commit_seconds` they run in a thread, timed there, until they are quick again."""
        if self._commit_seconds < self._inline_commit_seconds:
            seconds = _timed_commit(db)
        else:
            seconds = await asyncio.to_thread(_timed_commit, db)
        self._commit_seconds += (seconds - self._commit_seconds) / 8

    def _begin(self) -> sqlite3.Connection:
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            raise BackendUnavailable(f"the ledger is busy: {error}", "ledger-busy") from None
        return db

    def _read(self, sql: str, params: Sequence[Any] = (), db: sqlite3.Connection | None = None) -> list[sqlite3.Row]:
        try:
            return (db or self._connection()).execute(sql, params).fetchall()
        except sqlite3.OperationalError as error:
            raise BackendUnavailable(f"the ledger is unavailable: {error}", "ledger-unavailable") from None

    def describe(self) -> dict[str, str]:
        return {"backend": self.backend, "path": str(self.path)}

    def ping(self) -> None:
        self._read("SELECT count(*) FROM sqlite_master")  # reads the file: "SELECT 1" would not

    def backup_into(self, home: Path) -> dict[str, int]:
        """SQLite's online backup API: a snapshot of the ledger (its WAL included) taken while it is in use,
        written as one file (journal mode DELETE, no -wal beside it), mode 0600."""
        target = Path(home) / self.path.name
        if target.exists():
            raise Conflict(f"{target} already exists; a backup never overwrites a ledger", "backup-exists")
        copy = sqlite3.connect(target, isolation_level=None)
        try:
            try:
                self._connection().backup(copy)
            except sqlite3.OperationalError as error:
                raise BackendUnavailable(f"the ledger could not be copied: {error}", "ledger-busy") from None
            copy.execute("PRAGMA journal_mode = DELETE")
            counts = {
                "cas": copy.execute("SELECT count(*) FROM cas").fetchone()[0],
                "certificates": copy.execute("SELECT count(*) FROM certificates").fetchone()[0],
            }
        finally:
            copy.close()
        os.chmod(target, 0o600)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return counts

    def checkpoint(self) -> bool:
        """Move what the WAL holds into the ledger file and empty the WAL, so that the file alone holds the
        ledger (done on close). False when another connection's reader or writer kept it from finishing."""
        db = getattr(self._local, "db", None) or self._connection()
        try:
            db.execute("PRAGMA busy_timeout = 0")  # never wait on another connection: this is a courtesy
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # whatever no reader still needs
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error:
            return False
        finally:
            db.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        return not busy

    def close(self) -> None:
        self._issuances.close()
        if self._lock_file >= 0:
            self.checkpoint()
        for name in ("db", "snapshot_db"):
            db = getattr(self._local, name, None)
            if db is not None:
                db.close()
                setattr(self._local, name, None)
        if self._lock_file >= 0:
            os.close(self._lock_file)
            self._lock_file = -1

    # -- CA certificates ---------------------------------------------------------------------------

    def add_ca(self, record: CaRecord) -> None:
        try:
            with self._write() as db:
                db.execute(
                    f"INSERT INTO cas ({_CA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.kind,
                        record.common_name,
                        record.curve,
                        record.key_name,
                        record.key_backend,
                        record.serial,
                        _ts(record.not_before),
                        _ts(record.not_after),
                        record.certificate_pem,
                        record.issuer_id,
                        _ts(record.created_at),
                        record.status,
                        json.dumps(record.dps, sort_keys=True),
                    ),
                )
        except sqlite3.IntegrityError as error:
            if record.kind == ROOT and "cas.kind" in str(error):
                raise Conflict("a CA root already exists; this CA keeps one root", "root-exists") from None
            raise Conflict(f"a CA with ID {record.id!r} already exists", "ca-exists") from None

    def get_ca(self, ca_id: str) -> CaRecord | None:
        rows = self._read(f"SELECT {_CA_COLUMNS} FROM cas WHERE id = ?", (ca_id,))
        return _ca(rows[0]) if rows else None

    def get_root(self) -> CaRecord | None:
        rows = self._read(f"SELECT {_CA_COLUMNS} FROM cas WHERE kind = 'root'")
        return _ca(rows[0]) if rows else None

    def list_cas(self, kind: str | None = None) -> list[CaRecord]:
        if kind:
            rows = self._read(f"SELECT {_CA_COLUMNS} FROM cas WHERE kind = ? ORDER BY created_at, rowid", (kind,))
        else:
            rows = self._read(f"SELECT {_CA_COLUMNS} FROM cas ORDER BY created_at, rowid")
        return [_ca(row) for row in rows]

    def set_ca_status(self, ca_id: str, status: str) -> CaRecord:
        return self._update_ca(ca_id, "status = ?", (status,))

    def set_ca_dps(self, ca_id: str, dps: dict[str, Any]) -> CaRecord:
        return self._update_ca(ca_id, "dps = ?", (json.dumps(dps, sort_keys=True),))

    def _update_ca(self, ca_id: str, assignment: str, params: tuple[Any, ...]) -> CaRecord:
        with self._write() as db:
            changed = db.execute(f"UPDATE cas SET {assignment} WHERE id = ?", (*params, ca_id)).rowcount
        if not changed:
            raise NotFound(f"no CA with ID {ca_id!r}", "ca-not-found")
        record = self.get_ca(ca_id)
        assert record is not None
        return record

    # -- device certificates -----------------------------------------------------------------------

    def record_issued(self, issuances: Sequence[Issuance]) -> list[CertificateRecord | CaError]:
        return self._issuances.submit(issuances)

    async def record_issued_async(self, issuances: Sequence[Issuance]) -> list[CertificateRecord | CaError]:
        return await self._issuances.submit_async(issuances)

    def _record_group(self, issuances: list[Issuance]) -> list[CertificateRecord | CaError]:
        if _all_new_candidates(issuances):
            try:
                with self._write() as db:
                    return self._insert_all_new(db, issuances)
            except sqlite3.IntegrityError:
                pass  # a key or device already has rows: settle each issuance on its own below
        with self._write() as db:
            return self._record_each(db, issuances)

    async def _record_group_async(self, issuances: list[Issuance]) -> list[CertificateRecord | CaError]:
        if _all_new_candidates(issuances):
            try:
                async with self._write_async() as db:
                    return self._insert_all_new(db, issuances)
            except sqlite3.IntegrityError:
                pass
        async with self._write_async() as db:
            return self._record_each(db, issuances)

    def _insert_all_new(self, db: sqlite3.Connection, issuances: list[Issuance]) -> list[CertificateRecord | CaError]:
        """The common case, new keys for devices without certificates, in two statements. Any constraint
        the group runs into aborts it whole (IntegrityError), and nothing is written."""
        records = [issuance.record for issuance in issuances]
        db.executemany(
            "INSERT INTO devices (device_id, owner, created_at) VALUES (?, ?, ?)",
            [(i.record.device_id, i.owner or i.record.requested_by, _ts(i.record.created_at)) for i in issuances],
        )
        db.executemany(
            "INSERT INTO key_bindings (public_key_sha256, device_id) VALUES (?, ?)",
            [(r.public_key_sha256, r.device_id) for r in records],
        )
        db.executemany(
            f"INSERT INTO certificates ({_CERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [_certificate_row(r) for r in records],
        )
        return list(records)

    def _record_each(self, db: sqlite3.Connection, issuances: list[Issuance]) -> list[CertificateRecord | CaError]:
        results: list[CertificateRecord | CaError] = []
        for issuance in issuances:
            db.execute("SAVEPOINT issuance")
            try:
                outcome: CertificateRecord | CaError = self._record_one(db, issuance)
            except CaError as error:
                outcome = error
            if outcome is not issuance.record:
                db.execute("ROLLBACK TO issuance")
            db.execute("RELEASE issuance")
            results.append(outcome)
        return results

    def _record_one(self, db: sqlite3.Connection, issuance: Issuance) -> CertificateRecord:
        """Write one certificate, letting the store's constraints find the conflicts (they are rare)."""
        new = issuance.record
        self._claim_device(db, issuance)
        bound = db.execute(
            "INSERT INTO key_bindings (public_key_sha256, device_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (new.public_key_sha256, new.device_id),
        ).rowcount
        if not bound:
            owner, revoked = db.execute(
                "SELECT device_id, revoked FROM key_bindings WHERE public_key_sha256 = ?", (new.public_key_sha256,)
            ).fetchone()
            if owner != new.device_id:
                raise key_in_use(owner if issuance.owner is None else None)
            if revoked:
                raise key_revoked()
        if issuance.retry_since is not None:
            row = db.execute(
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE device_id = ? AND status = 'active'", (new.device_id,)
            ).fetchone()
            current = _certificate(row) if row else None
            if (
                current
                and current.public_key_sha256 == new.public_key_sha256
                and current.created_at >= issuance.retry_since
            ):
                return current  # a retried renewal: the first attempt's certificate
        if issuance.supersede:
            db.execute(
                "UPDATE certificates SET status = ?, status_changed_at = ?, status_reason = ? "
                "WHERE device_id = ? AND status = 'active' AND serial != ?",  # never itself, recorded again
                (CERT_SUPERSEDED, _ts(new.created_at), f"renewed as {new.serial}", new.device_id, new.serial),
            )
        try:
            db.execute(
                f"INSERT INTO certificates ({_CERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _certificate_row(new),
            )
        except sqlite3.IntegrityError as error:
            if "certificates.device_id" not in str(error):
                row = db.execute(
                    f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ? AND device_id = ? "
                    "AND status = 'active'",
                    (new.serial, new.device_id),
                ).fetchone()
                if row:  # this very certificate, committed by an earlier attempt whose answer was lost
                    return _certificate(row)
                raise Conflict(f"the ledger refused certificate {new.serial}: {error}", "ledger-conflict") from None
            row = db.execute(
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE device_id = ? AND status = 'active'", (new.device_id,)
            ).fetchone()
            current = _certificate(row)
            if current.public_key_sha256 == new.public_key_sha256:
                return current  # the same request, committed first by someone else
            raise device_has_certificate(current) from None
        return new

    @staticmethod
    def _claim_device(db: sqlite3.Connection, issuance: Issuance) -> None:
        """The device's owner row: made for a new device, checked against a factory's claim otherwise."""
        new = issuance.record
        db.execute(
            "INSERT INTO devices (device_id, owner, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (new.device_id, issuance.owner or new.requested_by, _ts(new.created_at)),
        )
        if issuance.owner is not None:
            (owner,) = db.execute("SELECT owner FROM devices WHERE device_id = ?", (new.device_id,)).fetchone()
            if owner != issuance.owner:
                raise device_owned_elsewhere(new.device_id)

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        rows = self._read(f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?", (serial,))
        return _certificate(rows[0]) if rows else None

    def active_certificates(
        self, device_ids: Sequence[str], db: sqlite3.Connection | None = None
    ) -> dict[str, CertificateRecord]:
        found: dict[str, CertificateRecord] = {}
        for chunk in _chunks(sorted(set(device_ids))):
            rows = self._read(
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE status = 'active' "
                f"AND device_id IN ({', '.join('?' * len(chunk))})",
                chunk,
                db,
            )
            found.update((row["device_id"], _certificate(row)) for row in rows)
        return found

    def precheck(self, device_ids: Sequence[str], public_key_sha256s: Sequence[str]) -> Precheck:
        """One read transaction on a connection of its own: in WAL mode every SELECT in it sees the same
        snapshot, whatever other processes commit meanwhile."""
        db = self._snapshot_connection()
        try:
            db.execute("BEGIN")
        except sqlite3.OperationalError as error:
            raise BackendUnavailable(f"the ledger is unavailable: {error}", "ledger-unavailable") from None
        try:
            return Precheck(
                owners=self.device_owners(device_ids, db),
                bindings=self.key_bindings(public_key_sha256s, db),
                actives=self.active_certificates(device_ids, db),
            )
        finally:
            db.execute("COMMIT")

    def _snapshot_connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "snapshot_db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            self._local.snapshot_db = db
        return db

    def devices_with_revocations(self, device_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(sorted(set(device_ids))):
            rows = self._read(
                "SELECT DISTINCT device_id FROM certificates WHERE status = 'revoked' "
                f"AND device_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            found.update(row["device_id"] for row in rows)
        return found

    def device_owners(self, device_ids: Sequence[str], db: sqlite3.Connection | None = None) -> dict[str, str]:
        found: dict[str, str] = {}
        for chunk in _chunks(sorted(set(device_ids))):
            rows = self._read(
                f"SELECT device_id, owner FROM devices WHERE device_id IN ({', '.join('?' * len(chunk))})", chunk, db
            )
            found.update((row["device_id"], row["owner"]) for row in rows)
        return found

    def key_bindings(
        self, public_key_sha256s: Sequence[str], db: sqlite3.Connection | None = None
    ) -> dict[str, tuple[str, bool]]:
        found: dict[str, tuple[str, bool]] = {}
        for chunk in _chunks(sorted(set(public_key_sha256s))):
            rows = self._read(
                "SELECT public_key_sha256, device_id, revoked FROM key_bindings "
                f"WHERE public_key_sha256 IN ({', '.join('?' * len(chunk))})",
                chunk,
                db,
            )
            found.update((row["public_key_sha256"], (row["device_id"], bool(row["revoked"]))) for row in rows)
        return found

    def list_certificates(self, query: CertificateQuery) -> CertificatePage:
        clauses, params = [], []
        for column, value in (
            ("device_id", query.device_id),
            ("intermediate_id", query.intermediate_id),
            ("status", query.status),
            ("requested_by", query.requested_by),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.expiring_before is not None:
            clauses.append("not_after <= ?")
            params.append(_ts(query.expiring_before))
        if query.cursor:
            if not query.cursor.isdigit() or len(query.cursor) > 18:
                raise invalid_cursor()
            clauses.append("seq > ?")
            params.append(int(query.cursor))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(
            f"SELECT seq, {_CERT_COLUMNS} FROM certificates {where} ORDER BY seq LIMIT ?", (*params, query.limit + 1)
        )
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        next_cursor = str(rows[-1]["seq"]) if more and rows else None
        return CertificatePage([_certificate(row) for row in rows], next_cursor)

    # -- principals and API keys --------------------------------------------------------------------

    def add_principal(self, principal: Principal) -> None:
        try:
            with self._write() as db:
                db.execute(
                    f"INSERT INTO principals ({PRINCIPAL_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                    (
                        principal.id,
                        principal.role,
                        json.dumps(list(principal.intermediates)),
                        principal.app_id,
                        _ts(principal.created_at),
                    ),
                )
        except sqlite3.IntegrityError as error:
            if "app_id" in str(error):
                raise Conflict(
                    f"application ID {principal.app_id} is already bound to a factory", "app-id-taken"
                ) from None
            raise Conflict(f"a principal called {principal.id!r} already exists", "principal-exists") from None

    def get_principal(self, principal_id: str) -> Principal | None:
        rows = self._read(f"SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE id = ?", (principal_id,))
        return _principal(rows[0]) if rows else None

    def principal_for_app(self, app_id: str) -> Principal | None:
        rows = self._read(f"SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE app_id = ?", (app_id,))
        return _principal(rows[0]) if rows else None

    def list_principals(self) -> list[Principal]:
        return [_principal(row) for row in self._read(f"SELECT {PRINCIPAL_COLUMNS} FROM principals ORDER BY rowid")]

    def set_principal_intermediates(self, principal_id: str, intermediates: Sequence[str]) -> Principal:
        with self._write() as db:
            db.execute(
                "UPDATE principals SET intermediates = ? WHERE id = ?", (json.dumps(list(intermediates)), principal_id)
            )
        principal = self.get_principal(principal_id)
        if principal is None:
            raise NotFound(f"no principal called {principal_id!r}", "principal-not-found")
        return principal

    def add_api_key(self, key: ApiKey) -> None:
        try:
            with self._write() as db:
                db.execute(
                    f"INSERT INTO api_keys ({API_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                    (key.id, key.principal_id, key.secret_sha256, _ts(key.created_at), None),
                )
        except sqlite3.IntegrityError as error:
            if "api_keys.id" not in str(error):  # the principal's foreign key: the service adds it first
                raise
            raise Conflict(f"an API key with ID {key.id} already exists", "key-exists") from None

    def api_key_with_principal(self, key_id: str) -> tuple[ApiKey, Principal] | None:
        rows = self._read(
            f"SELECT {_prefixed('k', API_KEY_COLUMNS)}, {_prefixed('p', PRINCIPAL_COLUMNS, 'p_')} "
            "FROM api_keys k JOIN principals p ON p.id = k.principal_id WHERE k.id = ?",
            (key_id,),
        )
        if not rows:
            return None
        row = rows[0]
        principal = Principal(
            id=row["p_id"],
            role=row["p_role"],
            intermediates=tuple(json.loads(row["p_intermediates"])),
            created_at=_dt(row["p_created_at"]),
            app_id=row["p_app_id"],
        )
        return _api_key(row), principal

    def get_api_key(self, key_id: str) -> ApiKey | None:
        rows = self._read(f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        return _api_key(rows[0]) if rows else None

    def list_api_keys(self) -> list[ApiKey]:
        return [_api_key(row) for row in self._read(f"SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id")]

    def revoke_api_key(self, key_id: str, at: datetime) -> ApiKey:
        with self._write() as db:
            db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (_ts(at), key_id))
        key = self.get_api_key(key_id)
        if key is None:
            raise NotFound(f"no API key with ID {key_id!r}", "key-not-found")
        return key

    def revoke_certificate(self, serial: str, reason: str, at: datetime) -> Revocation:
        with self._write() as db:
            row = db.execute(f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?", (serial,)).fetchone()
            if row is None:
                raise NotFound(f"no certificate with serial {serial}", "certificate-not-found")
            key = _certificate(row).public_key_sha256
            db.execute("UPDATE key_bindings SET revoked = 1 WHERE public_key_sha256 = ?", (key,))
            if row["status"] == CERT_REVOKED:  # revoked before: those revoked with it, as that first answer said
                together = "status = 'revoked' AND status_changed_at = ?", (row["status_changed_at"],)
            else:
                together = "status = 'active'", ()
            also = [
                r["serial"]
                for r in db.execute(
                    f"SELECT serial FROM certificates WHERE public_key_sha256 = ? AND {together[0]} AND serial != ?",
                    (key, *together[1], serial),
                )
            ]
            db.execute(
                "UPDATE certificates SET status = ?, status_changed_at = ?, status_reason = ? "
                "WHERE (serial = ? OR public_key_sha256 = ? AND status = 'active') AND status != ?",
                (CERT_REVOKED, _ts(at), reason, serial, key, CERT_REVOKED),
            )
        record = self.get_certificate(serial)
        assert record is not None
        return Revocation(record, tuple(filter(None, map(self.get_certificate, also))))

    # -- the expiry scan ------------------------------------------------------------------------------

    def expiry_watch(self, before: datetime) -> list[ExpiryWatch]:
        """Active certificates ending by `before`, through the partial index of active certificates by
        notAfter (INDEXED BY: the planner must not pick the one-active-per-device index and scan it)."""
        rows = self._read(
            f"SELECT {_prefixed('c', _CERT_COLUMNS)}, n.stage AS notice_stage FROM certificates c "
            "INDEXED BY active_certificates_by_not_after LEFT JOIN expiry_notices n ON n.serial = c.serial "
            "WHERE c.status = 'active' AND c.not_after <= ? ORDER BY c.not_after",
            (_ts(before),),
        )
        self.expiry_rows_read += len(rows)
        watches = []
        for row in rows:
            record = _certificate(row)
            watches.append(
                ExpiryWatch(
                    record.serial, DEVICE, record.device_id, record.not_after, row["notice_stage"], record=record
                )
            )
        return watches

    def ca_expiry_watch(self, topic: str = EXPIRY_TOPIC) -> list[ExpiryWatch]:
        rows = self._read(
            f"SELECT {_prefixed('c', _CA_COLUMNS)}, n.stage AS notice_stage FROM cas c "
            "LEFT JOIN expiry_notices n ON n.serial = c.serial || ? ORDER BY c.created_at, c.rowid",
            (_notice_suffix(topic),),
        )
        self.expiry_rows_read += len(rows)
        watches = []
        for row in rows:
            ca = _ca(row)
            watches.append(ExpiryWatch(ca.serial, ca.kind, ca.id, ca.not_after, row["notice_stage"], topic, record=ca))
        return watches

    def claim_expiry_stage(self, watch: ExpiryWatch, stage: str, at: datetime) -> ExpiryWatch | None:
        """One transaction: the certificate still active (for a device), and the notice row inserted, or
        changed only where it still holds the stage the scan read (compare-and-set)."""
        key = watch.serial + _notice_suffix(watch.topic)
        with self._write() as db:
            if watch.kind == DEVICE:
                row = db.execute("SELECT status FROM certificates WHERE serial = ?", (watch.serial,)).fetchone()
                if row is None or row["status"] != CERT_ACTIVE:
                    return None
            if watch.stage is None:
                changed = db.execute(
                    "INSERT INTO expiry_notices (serial, stage, recorded_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (key, stage, _ts(at)),
                ).rowcount
            else:
                changed = db.execute(
                    "UPDATE expiry_notices SET stage = ?, recorded_at = ? WHERE serial = ? AND stage = ?",
                    (stage, _ts(at), key, watch.stage),
                ).rowcount
        return replace(watch, stage=stage) if changed else None

    def release_expiry_stage(self, claimed: ExpiryWatch, previous: str | None) -> None:
        key = claimed.serial + _notice_suffix(claimed.topic)
        with self._write() as db:
            if previous is None:
                db.execute("DELETE FROM expiry_notices WHERE serial = ? AND stage = ?", (key, claimed.stage))
            else:
                db.execute(
                    "UPDATE expiry_notices SET stage = ? WHERE serial = ? AND stage = ?", (previous, key, claimed.stage)
                )

    def mark_expired(self, watch: ExpiryWatch, at: datetime) -> CertificateRecord | None:
        with self._write() as db:
            changed = db.execute(
                "UPDATE certificates SET status = ?, status_changed_at = ?, status_reason = ? "
                "WHERE serial = ? AND status = 'active' AND not_after <= ?",
                (CERT_EXPIRED, _ts(at), "expired", watch.serial, _ts(at)),
            ).rowcount
        return self.get_certificate(watch.serial) if changed else None

    def retire_expiry_watch(self, watch: ExpiryWatch) -> None:
        """Nothing to do: a certificate that is not active is not in the index the scan reads."""


PRINCIPAL_COLUMNS = "id, role, intermediates, app_id, created_at"
API_KEY_COLUMNS = "id, principal_id, secret_sha256, created_at, revoked_at"


def _allow_expired_status(db: sqlite3.Connection) -> None:
    """Schema 4: a certificates table whose status CHECK predates 'expired' is rebuilt with it (SQLite
    cannot alter a CHECK: a new table, the rows copied, the old one dropped, the new one renamed; its
    indexes and triggers are then made again by SCHEMA). Runs inside the schema's transaction."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'certificates'").fetchone()
    if row is None or "'expired'" in row[0]:
        return
    old = row[0]
    new = re.sub(r"^CREATE TABLE\s+(IF NOT EXISTS\s+)?\"?certificates\"?", "CREATE TABLE certificates_v4", old)
    new = new.replace("'revoked')", "'revoked', 'expired')", 1)
    if new == old or "'expired'" not in new:
        raise sqlite3.DatabaseError("the ledger's certificates table is not one this version can migrate")
    db.execute(new)
    db.execute("INSERT INTO certificates_v4 SELECT * FROM certificates")
    db.execute("DROP TABLE certificates")
    db.execute("ALTER TABLE certificates_v4 RENAME TO certificates")


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one by one (executescript would commit the open transaction)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        yield pending.strip()


def _notice_suffix(topic: str) -> str:
    """Where a topic's stage is kept: a certificate's serial for its expiry, '<serial>:<topic>' otherwise."""
    return "" if topic == EXPIRY_TOPIC else f":{topic}"


def _roll_back(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        db.execute("ROLLBACK")


def _all_new_candidates(issuances: list[Issuance]) -> bool:
    return len(issuances) > 1 and not any(issuance.supersede for issuance in issuances)


def _certificate_row(record: CertificateRecord) -> tuple[Any, ...]:
    return (
        record.serial,
        record.device_id,
        record.intermediate_id,
        record.requested_by,
        record.public_key_sha256,
        _ts(record.not_before),
        _ts(record.not_after),
        record.certificate_pem,
        _ts(record.created_at),
        CERT_ACTIVE,
        None,
        None,
    )


def _principal(row: sqlite3.Row) -> Principal:
    return Principal(
        id=row["id"],
        role=row["role"],
        intermediates=tuple(json.loads(row["intermediates"])),
        created_at=_dt(row["created_at"]),
        app_id=row["app_id"],
    )


def _api_key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        principal_id=row["principal_id"],
        secret_sha256=row["secret_sha256"],
        created_at=_dt(row["created_at"]),
        revoked_at=_dt(row["revoked_at"]),
    )


def _prefixed(table: str, columns: str, alias_prefix: str = "") -> str:
    return ", ".join(f"{table}.{c} AS {alias_prefix}{c}" for c in (c.strip() for c in columns.split(",")))


def _chunks(values: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None  # "...Z" is UTC


def _timed_commit(db: sqlite3.Connection) -> float:
    started = time.perf_counter()
    db.execute("COMMIT")
    return time.perf_counter() - started


def _ca(row: sqlite3.Row) -> CaRecord:
    return CaRecord(
        id=row["id"],
        kind=row["kind"],
        common_name=row["common_name"],
        curve=row["curve"],
        key_name=row["key_name"],
        key_backend=row["key_backend"],
        serial=row["serial"],
        not_before=_dt(row["not_before"]),
        not_after=_dt(row["not_after"]),
        certificate_pem=row["certificate_pem"],
        issuer_id=row["issuer_id"],
        created_at=_dt(row["created_at"]),
        status=row["status"] or CA_ACTIVE,
        dps=json.loads(row["dps"] or "{}"),
    )


def _certificate(row: sqlite3.Row) -> CertificateRecord:
    return CertificateRecord(
        serial=row["serial"],
        device_id=row["device_id"],
        intermediate_id=row["intermediate_id"],
        requested_by=row["requested_by"],
        public_key_sha256=row["public_key_sha256"],
        not_before=_dt(row["not_before"]),
        not_after=_dt(row["not_after"]),
        certificate_pem=row["certificate_pem"],
        created_at=_dt(row["created_at"]),
        status=row["status"],
        status_changed_at=_dt(row["status_changed_at"]),
        status_reason=row["status_reason"],
    )
