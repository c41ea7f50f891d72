"""Batches in the SQLite ledger (tables `batches`, `batch_chunks`, `batch_items` in sqlite.SCHEMA).

Mixed into `SqliteLedger`, whose `_write` (one write transaction) and `_read` these use. A batch and all
of its items go in one transaction; a chunk's results and its counts in another.
"""

# ruff: noqa: S608 - statements are assembled from constant column lists; every value is a bound parameter.

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..errors import Conflict, NotFound
from . import invalid_cursor
from .batchcodec import moment, result_json, stamp, with_result
from .models import (
    ITEM_FAILED,
    ITEM_ISSUED,
    ITEM_PENDING,
    BatchItem,
    BatchPage,
    BatchRecord,
    BatchSummary,
    ChunkState,
)

_BATCH_COLUMNS = "id, requested_by, intermediate_id, allowed_intermediates, created_at, total, chunk_size"
_ITEM_COLUMNS = "batch_id, item, chunk, device_id, csr, status, result, finished_at"
_CHUNK_COLUMNS = "chunk, attempts, started_at, finished_at, last_error, issued, failed"
_SUMMARY = (
    f"SELECT b.seq, {', '.join('b.' + c.strip() for c in _BATCH_COLUMNS.split(','))}, "
    "sum(c.issued) AS issued, sum(c.failed) AS failed, min(c.started_at) AS started_at, "
    "max(c.finished_at) AS finished_at FROM batches b JOIN batch_chunks c ON c.batch_id = b.id"
)


class SqliteBatches:
    """The batch part of the Ledger contract on SQLite."""

    _write: Any
    _read: Any

    def add_batch(self, batch: BatchRecord, items: Sequence[BatchItem]) -> None:
        chunks: dict[int, list[int]] = {}
        for item in items:
            counts = chunks.setdefault(item.index // batch.chunk_size, [0, 0, 0])
            counts[0 if item.status == ITEM_PENDING else 1 if item.status == ITEM_ISSUED else 2] += 1
        try:
            with self._write() as db:
                db.execute(
                    f"INSERT INTO batches ({_BATCH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        batch.id,
                        batch.requested_by,
                        batch.intermediate_id,
                        None if batch.allowed_intermediates is None else json.dumps(list(batch.allowed_intermediates)),
                        stamp(batch.created_at),
                        batch.total,
                        batch.chunk_size,
                    ),
                )
                db.executemany(
                    f"INSERT INTO batch_items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        (
                            batch.id,
                            item.index,
                            item.index // batch.chunk_size,
                            item.device_id,
                            item.csr,
                            item.status,
                            result_json(item),
                            stamp(item.finished_at),
                        )
                        for item in items
                    ),
                )
                db.executemany(
                    "INSERT INTO batch_chunks (batch_id, chunk, issued, failed, finished_at) VALUES (?, ?, ?, ?, ?)",
                    (
                        (batch.id, chunk, issued, failed, None if pending else stamp(batch.created_at))
                        for chunk, (pending, issued, failed) in sorted(chunks.items())
                    ),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"a batch with ID {batch.id!r} already exists", "batch-exists") from None

    def get_batch(self, batch_id: str) -> BatchSummary | None:
        rows = self._read(f"{_SUMMARY} WHERE b.id = ? GROUP BY b.id", (batch_id,))
        return _summary(rows[0]) if rows else None

    def list_batches(self, requested_by: str | None, limit: int, cursor: str | None) -> BatchPage:
        clauses, params = [], []
        if requested_by is not None:
            clauses.append("b.requested_by = ?")
            params.append(requested_by)
        if cursor is not None:
            if not cursor.isdigit() or len(cursor) > 18:
                raise invalid_cursor()
            clauses.append("b.seq > ?")
            params.append(int(cursor))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(f"{_SUMMARY} {where} GROUP BY b.id ORDER BY b.seq LIMIT ?", (*params, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        return BatchPage([_summary(row) for row in rows], str(rows[-1]["seq"]) if more and rows else None)

    def chunk_items(self, batch_id: str, chunk: int) -> tuple[ChunkState, list[BatchItem]]:
        state = self._chunk_state(batch_id, chunk)
        rows = self._read(
            f"SELECT {_ITEM_COLUMNS} FROM batch_items WHERE batch_id = ? AND chunk = ? ORDER BY item", (batch_id, chunk)
        )
        return state, [_item(row) for row in rows]

    def _chunk_state(self, batch_id: str, chunk: int, db: sqlite3.Connection | None = None) -> ChunkState:
        rows = self._read(
            f"SELECT {_CHUNK_COLUMNS} FROM batch_chunks WHERE batch_id = ? AND chunk = ?", (batch_id, chunk), db
        )
        if not rows:
            raise NotFound(f"batch {batch_id!r} has no chunk {chunk}", "chunk-not-found")
        return _chunk(rows[0])

    def start_chunk(self, batch_id: str, chunk: int, at: datetime) -> ChunkState:
        with self._write() as db:
            db.execute(
                "UPDATE batch_chunks SET attempts = attempts + 1, started_at = coalesce(started_at, ?) "
                "WHERE batch_id = ? AND chunk = ?",
                (stamp(at), batch_id, chunk),
            )
            return self._chunk_state(batch_id, chunk, db)

    def note_chunk_failure(self, batch_id: str, chunk: int, reason: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE batch_chunks SET last_error = ? WHERE batch_id = ? AND chunk = ?", (reason, batch_id, chunk)
            )

    def finish_chunk_items(self, batch_id: str, chunk: int, results: Sequence[BatchItem], at: datetime) -> int:
        with self._write() as db:
            pending = {
                row[0]
                for row in db.execute(
                    "SELECT item FROM batch_items WHERE batch_id = ? AND chunk = ? AND status = 'pending'",
                    (batch_id, chunk),
                )
            }
            changing = [item for item in results if item.status != ITEM_PENDING and item.index in pending]
            db.executemany(
                "UPDATE batch_items SET status = ?, result = ?, finished_at = ? WHERE batch_id = ? AND item = ?",
                ((item.status, result_json(item), stamp(at), batch_id, item.index) for item in changing),
            )
            issued = sum(item.status == ITEM_ISSUED for item in changing)
            failed = sum(item.status == ITEM_FAILED for item in changing)
            still = len(pending) - len(changing)
            db.execute(
                "UPDATE batch_chunks SET issued = issued + ?, failed = failed + ?, "
                "finished_at = CASE WHEN ? = 0 THEN coalesce(finished_at, ?) END WHERE batch_id = ? AND chunk = ?",
                (issued, failed, still, stamp(at), batch_id, chunk),
            )
        return len(changing)

    def batch_items(self, batch_id: str, start: int, limit: int) -> list[BatchItem]:
        rows = self._read(
            f"SELECT {_ITEM_COLUMNS} FROM batch_items WHERE batch_id = ? AND item >= ? ORDER BY item LIMIT ?",
            (batch_id, start, limit),
        )
        return [_item(row) for row in rows]

    def unfinished_chunks(self) -> list[tuple[str, int]]:
        rows = self._read(
            "SELECT c.batch_id, c.chunk FROM batch_chunks c JOIN batches b ON b.id = c.batch_id "
            "WHERE c.finished_at IS NULL ORDER BY b.seq, c.chunk"
        )
        return [(row["batch_id"], row["chunk"]) for row in rows]


def _summary(row: sqlite3.Row) -> BatchSummary:
    allowed = row["allowed_intermediates"]
    record = BatchRecord(
        id=row["id"],
        requested_by=row["requested_by"],
        intermediate_id=row["intermediate_id"],
        allowed_intermediates=None if allowed is None else tuple(json.loads(allowed)),
        created_at=moment(row["created_at"]),  # type: ignore[arg-type]
        total=row["total"],
        chunk_size=row["chunk_size"],
    )
    return BatchSummary(record, row["issued"], row["failed"], moment(row["started_at"]), _finished(row, record))


def _finished(row: sqlite3.Row, record: BatchRecord) -> datetime | None:
    return moment(row["finished_at"]) if row["issued"] + row["failed"] == record.total else None


def _chunk(row: sqlite3.Row) -> ChunkState:
    return ChunkState(
        chunk=row["chunk"],
        attempts=row["attempts"],
        started_at=moment(row["started_at"]),
        finished_at=moment(row["finished_at"]),
        last_error=row["last_error"],
        issued=row["issued"],
        failed=row["failed"],
    )


def _item(row: sqlite3.Row) -> BatchItem:
    item = BatchItem(
        batch_id=row["batch_id"],
        index=row["item"],
        device_id=row["device_id"],
        csr=row["csr"],
        status=row["status"],
        finished_at=moment(row["finished_at"]),
    )
    return with_result(item, row["result"])
