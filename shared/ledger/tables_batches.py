"""Batches in the Table Storage ledger: table `batches` (layout in tables.py's docstring).

Mixed into `TableLedger`, whose `_table`, `_get`, `_parallel` these use. A batch's partition holds its
record, its chunks' rows and its items; a chunk's row and its items are written in one transaction (at
most 100 operations: a chunk holds at most MAX_CHUNK_ITEMS items), both when the batch is stored and
when a chunk's results are recorded, so a chunk's counts always agree with its items.
"""

import json
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
from azure.data.tables import TableTransactionError, UpdateMode

from ..errors import BackendUnavailable, Conflict, NotFound
from ..tablestore import MAX_ENTITIES_PER_REQUEST, storage_errors
from . import invalid_cursor
from .batchcodec import moment, result_json, stamp, with_result
from .models import (
    ITEM_FAILED,
    ITEM_ISSUED,
    ITEM_PENDING,
    MAX_CHUNK_ITEMS,
    BatchItem,
    BatchPage,
    BatchRecord,
    BatchSummary,
    ChunkState,
)

BATCHES = "batches"
BATCH_ROW = "batch"
ALL_BATCHES = "all"
_CURSOR = re.compile(r"[0-9]{14}-[0-9]{20}-[0-9A-Za-z_-]{1,200}")
_ATTEMPTS = 20  # conditional writes lost to concurrent deliveries of the same chunk before giving up


class TableBatches:
    """The batch part of the Ledger contract on Table Storage."""

    _table: Any
    _get: Any
    _parallel: Any
    _held: Any

    def add_batch(self, batch: BatchRecord, items: Sequence[BatchItem]) -> None:
        if batch.chunk_size > MAX_CHUNK_ITEMS:
            raise ValueError(f"a chunk holds at most {MAX_CHUNK_ITEMS} items on Table Storage")
        partition = _partition(batch.id)
        chunks: dict[int, list[BatchItem]] = {}
        for item in items:
            chunks.setdefault(item.index // batch.chunk_size, []).append(item)
        created = stamp(batch.created_at)

        def write_chunk(chunk: int) -> None:
            members = chunks[chunk]
            issued = sum(item.status == ITEM_ISSUED for item in members)
            failed = sum(item.status == ITEM_FAILED for item in members)
            row = {
                "PartitionKey": partition,
                "RowKey": _chunk_row(chunk),
                "attempts": 0,
                "issued": issued,
                "failed": failed,
                "finished": issued + failed == len(members),
                "finished_at": created if issued + failed == len(members) else "",
                "started_at": "",
                "last_error": "",
                "created_at": created,
                "first": members[0].index,
                "size": len(members),
            }
            operations = [("create", row), *(("create", _item_entity(partition, item)) for item in members)]
            try:
                self._table(BATCHES).submit_transaction(operations)
            except TableTransactionError as error:
                if error.status_code != 409:
                    raise
                if self._held(BATCHES, row) is None:  # else its own write, sent again after Storage's 500
                    raise Conflict(f"a batch with ID {batch.id!r} already exists", "batch-exists") from None

        with storage_errors("store a batch"):
            self._parallel(write_chunk, sorted(chunks))
            index = {"batch_id": batch.id}
            order = _listing_key(batch.id)
            table = self._table(BATCHES)
            table.upsert_entity({"PartitionKey": _requester_partition(batch.requested_by), "RowKey": order, **index})
            table.upsert_entity({"PartitionKey": ALL_BATCHES, "RowKey": order, **index})
            header = _batch_entity(partition, batch)
            try:
                table.create_entity(header)  # last: the batch exists from here on
            except ResourceExistsError:
                if self._held(BATCHES, header) is None:  # else its own write, sent again after Storage's 500
                    raise Conflict(f"a batch with ID {batch.id!r} already exists", "batch-exists") from None

    def get_batch(self, batch_id: str) -> BatchSummary | None:
        partition = _partition(batch_id)
        header = self._get(BATCHES, partition, BATCH_ROW)
        if header is None:
            return None
        with storage_errors("read a batch"):
            rows = list(
                self._table(BATCHES).query_entities(
                    "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi",
                    parameters={"p": partition, "lo": "chunk-", "hi": "chunk."},
                )
            )
        return _summary(_batch(header), [_chunk(row) for row in rows])

    def list_batches(self, requested_by: str | None, limit: int, cursor: str | None) -> BatchPage:
        if cursor is not None and not _CURSOR.fullmatch(cursor):
            raise invalid_cursor()
        partition = ALL_BATCHES if requested_by is None else _requester_partition(requested_by)
        where, params = "PartitionKey eq @p", {"p": partition}
        if cursor is not None:
            where, params = where + " and RowKey gt @after", {**params, "after": cursor}
        with storage_errors("list batches"):
            # a page of the largest size needs a second request for the row that says there is more
            size = min(limit + 1, MAX_ENTITIES_PER_REQUEST)
            pages = self._table(BATCHES).query_entities(where, parameters=params, results_per_page=size)
            rows: list[Any] = []
            for answered in pages.by_page():
                rows.extend(answered)
                if len(rows) > limit:
                    break
        more = len(rows) > limit
        rows = rows[:limit]
        found = self._parallel(lambda row: self.get_batch(row["batch_id"]), rows)
        # a listing row without its batch is a batch still being stored, or one whose store failed: not listed
        summaries = [summary for summary in found if summary is not None]
        return BatchPage(summaries, rows[-1]["RowKey"] if more and rows else None)

    def chunk_items(self, batch_id: str, chunk: int) -> tuple[ChunkState, list[BatchItem]]:
        row, items = self._read_chunk(batch_id, chunk)
        return _chunk(row), items

    def _read_chunk(self, batch_id: str, chunk: int) -> tuple[Any, list[BatchItem]]:
        partition = _partition(batch_id)
        row = self._get(BATCHES, partition, _chunk_row(chunk))
        if row is None:
            raise NotFound(f"batch {batch_id!r} has no chunk {chunk}", "chunk-not-found")
        with storage_errors("read a batch chunk"):
            entities = self._table(BATCHES).query_entities(
                "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi",
                parameters={"p": partition, "lo": _item_row(row["first"]), "hi": _item_row(row["first"] + row["size"])},
            )
            items = sorted((_item(batch_id, e) for e in entities), key=lambda item: item.index)
        return row, items

    def start_chunk(self, batch_id: str, chunk: int, at: datetime) -> ChunkState:
        def change(row: Any) -> dict[str, Any]:
            return {"attempts": row["attempts"] + 1, "started_at": row["started_at"] or stamp(at)}

        return _chunk(self._update_chunk(batch_id, chunk, change))

    def note_chunk_failure(self, batch_id: str, chunk: int, reason: str) -> None:
        self._update_chunk(batch_id, chunk, lambda row: {"last_error": reason[:4000]})

    def _update_chunk(self, batch_id: str, chunk: int, change: Any) -> Any:
        partition = _partition(batch_id)
        table = self._table(BATCHES)
        with storage_errors("update a batch chunk"):
            for _ in range(_ATTEMPTS):
                row = self._get(BATCHES, partition, _chunk_row(chunk))
                if row is None:
                    raise NotFound(f"batch {batch_id!r} has no chunk {chunk}", "chunk-not-found")
                changes = change(row)
                try:
                    table.update_entity(
                        {"PartitionKey": partition, "RowKey": row["RowKey"], **changes},
                        mode=UpdateMode.MERGE,
                        etag=row.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified,
                    )
                except ResourceModifiedError:
                    continue
                return {**row, **changes}
        raise BackendUnavailable("a batch chunk is being changed by many deliveries at once", "ledger-busy")

    def finish_chunk_items(self, batch_id: str, chunk: int, results: Sequence[BatchItem], at: datetime) -> int:
        partition = _partition(batch_id)
        finished = {item.index: item for item in results if item.status != ITEM_PENDING}
        with storage_errors("record a chunk's results"):
            for _ in range(_ATTEMPTS):
                row, items = self._read_chunk(batch_id, chunk)
                changing = [
                    finished[item.index] for item in items if item.status == ITEM_PENDING and item.index in finished
                ]
                if not changing:
                    return 0
                issued = sum(item.status == ITEM_ISSUED for item in changing)
                failed = len(changing) - issued
                done = row["issued"] + row["failed"] + len(changing) == len(items)
                counts = {
                    "PartitionKey": partition,
                    "RowKey": row["RowKey"],
                    "issued": row["issued"] + issued,
                    "failed": row["failed"] + failed,
                    "finished": done,
                    "finished_at": stamp(at) if done else "",
                }
                operations: list[Any] = [
                    (
                        "update",
                        counts,
                        {
                            "mode": UpdateMode.MERGE,
                            "etag": row.metadata["etag"],
                            "match_condition": MatchConditions.IfNotModified,
                        },
                    )
                ]
                for item in changing:
                    entity = {
                        "PartitionKey": partition,
                        "RowKey": _item_row(item.index),
                        "status": item.status,
                        "result": result_json(item),
                        "finished_at": stamp(at),
                    }
                    operations.append(("update", entity, {"mode": UpdateMode.MERGE}))
                try:
                    self._table(BATCHES).submit_transaction(operations)
                except TableTransactionError as error:
                    if error.status_code == 412:
                        continue  # another delivery recorded first: read again, change only what is pending
                    raise
                return len(changing)
        raise BackendUnavailable("a batch chunk is being changed by many deliveries at once", "ledger-busy")

    def batch_items(self, batch_id: str, start: int, limit: int) -> list[BatchItem]:
        with storage_errors("read a batch's items"):
            entities = self._table(BATCHES).query_entities(
                "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi",
                parameters={"p": _partition(batch_id), "lo": _item_row(start), "hi": _item_row(start + limit)},
            )
            return sorted((_item(batch_id, e) for e in entities), key=lambda item: item.index)

    def unfinished_chunks(self) -> list[tuple[str, int]]:
        with storage_errors("find unfinished batch chunks"):
            rows = list(
                self._table(BATCHES).query_entities(
                    "RowKey ge @lo and RowKey lt @hi and finished eq false", parameters={"lo": "chunk-", "hi": "chunk."}
                )
            )
        found = sorted((row["created_at"], row["PartitionKey"], int(row["RowKey"][6:])) for row in rows)
        return [(partition.removeprefix("bat-"), chunk) for _, partition, chunk in found]


def _key(text: str) -> str:
    from .tables import _key as key  # tables.py imports this module

    return key(text)


def _partition(batch_id: str) -> str:
    return _key(f"bat-{batch_id}")


def _listing_key(batch_id: str) -> str:
    """A batch's RowKey in the listings, taken once its chunks are stored, just before its listing rows are
    written: "YYYYmmddHHMMSS-<nanoseconds since the epoch, 20 digits>-<batch ID>" of that moment (UTC), so
    that batches list in about the order they were stored, as on SQLite (by arrival, a large batch stored
    after a smaller one that came later would be placed before it, behind a cursor already given). Not
    exactly that order: the key is taken before the rows are written, and instances' clocks differ; the
    listing promises only the batches stored before it began (Ledger.list_batches)."""
    now = time.time_ns()
    return f"{datetime.fromtimestamp(now // 1_000_000_000, UTC):%Y%m%d%H%M%S}-{now:020d}-{batch_id}"


def _requester_partition(requested_by: str) -> str:
    return _key(f"req-{requested_by}")


def _chunk_row(chunk: int) -> str:
    return f"chunk-{chunk:05d}"


def _item_row(index: int) -> str:
    return f"item-{index:05d}"


def _batch_entity(partition: str, batch: BatchRecord) -> dict[str, Any]:
    allowed = batch.allowed_intermediates
    return {
        "PartitionKey": partition,
        "RowKey": BATCH_ROW,
        "batch_id": batch.id,
        "requested_by": batch.requested_by,
        "intermediate_id": batch.intermediate_id,
        "allowed_intermediates": "" if allowed is None else json.dumps(list(allowed)),
        "created_at": stamp(batch.created_at),
        "total": batch.total,
        "chunk_size": batch.chunk_size,
    }


def _batch(entity: Any) -> BatchRecord:
    allowed = entity["allowed_intermediates"]
    return BatchRecord(
        id=entity["batch_id"],
        requested_by=entity["requested_by"],
        intermediate_id=entity["intermediate_id"],
        allowed_intermediates=tuple(json.loads(allowed)) if allowed else None,
        created_at=moment(entity["created_at"]),  # type: ignore[arg-type]
        total=entity["total"],
        chunk_size=entity["chunk_size"],
    )


def _item_entity(partition: str, item: BatchItem) -> dict[str, Any]:
    return {
        "PartitionKey": partition,
        "RowKey": _item_row(item.index),
        "device_id": item.device_id,
        "csr": item.csr,
        "status": item.status,
        "result": result_json(item) or "",
        "finished_at": stamp(item.finished_at) or "",
    }


def _item(batch_id: str, entity: Any) -> BatchItem:
    item = BatchItem(
        batch_id=batch_id,
        index=int(entity["RowKey"][5:]),
        device_id=entity["device_id"],
        csr=entity["csr"],
        status=entity["status"],
        finished_at=moment(entity["finished_at"]),
    )
    return with_result(item, entity["result"])


def _chunk(row: Any) -> ChunkState:
    return ChunkState(
        chunk=int(row["RowKey"][6:]),
        attempts=row["attempts"],
        started_at=moment(row["started_at"]),
        finished_at=moment(row["finished_at"]),
        last_error=row["last_error"] or None,
        issued=row["issued"],
        failed=row["failed"],
    )


def _summary(batch: BatchRecord, chunks: list[ChunkState]) -> BatchSummary:
    issued = sum(chunk.issued for chunk in chunks)
    failed = sum(chunk.failed for chunk in chunks)
    starts = [chunk.started_at for chunk in chunks if chunk.started_at]
    ends = [chunk.finished_at for chunk in chunks if chunk.finished_at]
    finished = max(ends) if ends and issued + failed == batch.total else None
    return BatchSummary(batch, issued, failed, min(starts) if starts else None, finished)
