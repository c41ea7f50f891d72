"""Batch storage in the ledger, on both stores (SQLite, and Table Storage on Azurite): items stored with
their batch, chunks' results recorded once, counts and timing, listings by requester and paging."""

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.errors import CaError, Conflict, NotFound
from shared.ledger.models import (
    BATCH_DONE,
    BATCH_DONE_WITH_FAILURES,
    BATCH_QUEUED,
    BATCH_RUNNING,
    ITEM_FAILED,
    ITEM_ISSUED,
    ITEM_PENDING,
    BatchItem,
    BatchPage,
    BatchRecord,
    CertificateRecord,
)
from shared.ledger.sqlite import SqliteLedger

from . import test_ledger

ledger, ledger_spec = test_ledger.ledger, test_ledger.ledger_spec  # the fixtures, on both stores

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _batch(batch_id: str = "b1", total: int = 5, chunk_size: int = 2, by: str = "line-1", at=NOW) -> BatchRecord:
    allowed = None if by == "admin" else ("int-1",)
    return BatchRecord(batch_id, by, "int-1", allowed, at, total, chunk_size)


def _items(batch: BatchRecord, failed_at_submission: tuple[int, ...] = ()) -> list[BatchItem]:
    items = []
    for index in range(batch.total):
        item = BatchItem(batch.id, index, f"dev-{index}", f"CSR {index}")
        if index in failed_at_submission:
            item = BatchItem(
                batch.id, index, "", "", ITEM_FAILED, error_code="invalid-item", error_message="no csr", finished_at=NOW
            )
        items.append(item)
    return items


def _issued(item: BatchItem, serial: str) -> BatchItem:
    record = CertificateRecord(
        serial=serial,
        device_id=item.device_id,
        intermediate_id="int-1",
        requested_by="line-1",
        public_key_sha256="k" + serial,
        not_before=NOW,
        not_after=NOW + timedelta(days=365),
        certificate_pem=f"PEM {serial}",
        created_at=NOW,
    )
    return BatchItem(
        item.batch_id, item.index, item.device_id, item.csr, ITEM_ISSUED, record, True, ("a note",), finished_at=NOW
    )


def _failed(item: BatchItem, code: str = "bad-csr") -> BatchItem:
    return BatchItem(
        item.batch_id, item.index, item.device_id, item.csr, ITEM_FAILED, error_code=code, error_message="why"
    )


def test_a_batch_is_stored_with_its_items_and_read_back(ledger):
    batch = _batch()
    ledger.add_batch(batch, _items(batch, failed_at_submission=(4,)))
    summary = ledger.get_batch("b1")
    assert summary.record == batch and summary.record.chunks == 3
    assert (summary.issued, summary.failed, summary.pending, summary.status) == (0, 1, 4, BATCH_QUEUED)
    assert summary.started_at is None and summary.finished_at is None
    assert ledger.get_batch("nope") is None
    state, items = ledger.chunk_items("b1", 1)
    assert (state.chunk, state.attempts, state.finished_at) == (1, 0, None)
    assert [(i.index, i.device_id, i.csr, i.status) for i in items] == [
        (2, "dev-2", "CSR 2", ITEM_PENDING),
        (3, "dev-3", "CSR 3", ITEM_PENDING),
    ]
    assert {i.batch_id for i in items} == {"b1"} and [i.finished_at for i in items] == [None, None]
    state, (item,) = ledger.chunk_items("b1", 2)  # its only item failed when it was submitted: finished
    assert (item.status, item.error_code, item.error_message) == (ITEM_FAILED, "invalid-item", "no csr")
    assert (item.batch_id, item.finished_at) == ("b1", NOW)
    assert [(i.batch_id, i.index, i.finished_at) for i in ledger.batch_items("b1", 3, 2)] == [
        ("b1", 3, None),
        ("b1", 4, NOW),
    ]
    assert state.finished_at == NOW and state.failed == 1
    with pytest.raises(NotFound):
        ledger.chunk_items("b1", 3)
    with pytest.raises(Conflict) as taken:
        ledger.add_batch(batch, _items(batch))
    assert taken.value.code == "batch-exists"


def test_a_chunks_results_are_recorded_once_and_never_overwritten(ledger):
    batch = _batch()
    ledger.add_batch(batch, _items(batch))
    state = ledger.start_chunk("b1", 0, NOW + timedelta(seconds=5))
    assert (state.attempts, state.started_at) == (1, NOW + timedelta(seconds=5))
    assert ledger.get_batch("b1").status == BATCH_RUNNING
    _, (first, second) = ledger.chunk_items("b1", 0)
    later = NOW + timedelta(seconds=9)
    assert ledger.finish_chunk_items("b1", 0, [_issued(first, "0A"), _failed(second)], later) == 2

    # a redelivery, or the poison handler after a late success, changes nothing
    assert ledger.finish_chunk_items("b1", 0, [_failed(first, "late"), _failed(second, "late")], later) == 0
    state, (first, second) = ledger.chunk_items("b1", 0)
    assert (state.issued, state.failed, state.finished_at) == (1, 1, later)
    assert first.status == ITEM_ISSUED and first.certificate.serial == "0A" and first.created
    assert first.warnings == ("a note",) and first.certificate.not_after == NOW + timedelta(days=365)
    assert (second.status, second.error_code, second.error_message) == (ITEM_FAILED, "bad-csr", "why")
    # each item is stamped with the time its chunk's results were recorded (not a time the result carries)
    assert (first.batch_id, first.finished_at, second.finished_at) == ("b1", later, later)

    again = ledger.start_chunk("b1", 0, NOW + timedelta(seconds=30))
    assert (again.attempts, again.started_at) == (2, NOW + timedelta(seconds=5))  # the first start stays
    ledger.note_chunk_failure("b1", 0, "Key Vault is unavailable")
    assert ledger.chunk_items("b1", 0)[0].last_error == "Key Vault is unavailable"


@pytest.fixture
def local_zone_not_utc(monkeypatch):
    """The process's local time zone set to UTC+05:30 for one test (Azure Functions hosts honour
    WEBSITE_TIME_ZONE, so a host's local zone need not be UTC)."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_batch_times_are_kept_in_utc_whatever_the_hosts_local_zone(ledger, local_zone_not_utc):
    assert datetime(2026, 1, 1, tzinfo=UTC).astimezone().utcoffset() == timedelta(hours=5, minutes=30)
    batch = _batch(total=2)
    ledger.add_batch(batch, _items(batch))
    _, (first, second) = ledger.chunk_items("b1", 0)
    later = datetime(2026, 1, 1, 17, 39, 9, tzinfo=timezone(timedelta(hours=5, minutes=30)))  # 12:09:09 UTC
    ledger.finish_chunk_items("b1", 0, [_issued(first, "0A"), _failed(second)], later)
    state, (first, second) = ledger.chunk_items("b1", 0)
    in_utc = NOW + timedelta(hours=12, minutes=9, seconds=9)
    assert state.finished_at == first.finished_at == second.finished_at == in_utc
    assert first.finished_at.utcoffset() == timedelta(0)


def test_a_long_chunk_failure_is_kept_to_what_the_store_holds(ledger):
    """SQLite keeps the whole reason; Table Storage its first 4,000 characters (a property holds 64 KiB)."""
    batch = _batch(total=2)
    ledger.add_batch(batch, _items(batch))
    reason = "".join(f"{n:05d} " for n in range(1000))  # 6,000 characters
    ledger.note_chunk_failure("b1", 0, reason)
    kept = ledger.chunk_items("b1", 0)[0].last_error
    assert kept == (reason if isinstance(ledger, SqliteLedger) else reason[:4000])


def test_counts_status_and_timing_follow_the_chunks(ledger):
    batch = _batch(total=3)
    ledger.add_batch(batch, _items(batch))
    ledger.start_chunk("b1", 1, NOW + timedelta(seconds=1))
    _, (last,) = ledger.chunk_items("b1", 1)
    ledger.finish_chunk_items("b1", 1, [_issued(last, "0C")], NOW + timedelta(seconds=2))
    summary = ledger.get_batch("b1")
    assert (summary.issued, summary.pending, summary.status, summary.finished_at) == (1, 2, BATCH_RUNNING, None)
    assert ledger.unfinished_chunks() == [("b1", 0)]

    _, (a, b) = ledger.chunk_items("b1", 0)
    ledger.finish_chunk_items("b1", 0, [_issued(a, "0D")], NOW + timedelta(seconds=3))  # one of two
    assert ledger.get_batch("b1").pending == 1 and ledger.unfinished_chunks() == [("b1", 0)]
    ledger.finish_chunk_items("b1", 0, [_issued(b, "0E")], NOW + timedelta(seconds=4))
    summary = ledger.get_batch("b1")
    assert (summary.issued, summary.failed, summary.status) == (3, 0, BATCH_DONE)
    assert (summary.started_at, summary.finished_at) == (NOW + timedelta(seconds=1), NOW + timedelta(seconds=4))
    assert ledger.unfinished_chunks() == []


def test_a_batch_with_failures_finishes_done_with_failures(ledger):
    batch = _batch(total=2, chunk_size=2)
    ledger.add_batch(batch, _items(batch, failed_at_submission=(1,)))
    _, items = ledger.chunk_items("b1", 0)
    ledger.finish_chunk_items("b1", 0, [_failed(items[0])], NOW + timedelta(seconds=7))
    summary = ledger.get_batch("b1")
    assert (summary.issued, summary.failed, summary.status) == (0, 2, BATCH_DONE_WITH_FAILURES)
    assert summary.finished_at == NOW + timedelta(seconds=7)


def test_items_finished_before_they_are_stored_count_as_what_they_are(ledger):
    batch = _batch(total=3, chunk_size=2)
    items = _items(batch)
    items[0], items[2] = _issued(items[0], "0A"), _failed(items[2])
    ledger.add_batch(batch, items)
    summary = ledger.get_batch("b1")
    assert (summary.issued, summary.failed, summary.pending, summary.status) == (1, 1, 1, BATCH_QUEUED)
    state, (first, second) = ledger.chunk_items("b1", 0)
    assert (state.issued, state.failed, state.finished_at) == (1, 0, None)
    assert (first.status, first.certificate.serial, first.finished_at) == (ITEM_ISSUED, "0A", NOW)
    assert state.last_error is None  # no delivery yet, so no error either
    state, _ = ledger.chunk_items("b1", 1)  # its only item is finished: so is the chunk, when it was stored
    assert (state.issued, state.failed, state.finished_at) == (0, 1, NOW)
    assert ledger.unfinished_chunks() == [("b1", 0)]  # a server's restart queues again only the chunk with work
    ledger.finish_chunk_items("b1", 0, [_failed(second)], NOW + timedelta(seconds=3))
    summary = ledger.get_batch("b1")
    assert (summary.issued, summary.failed, summary.status) == (1, 2, BATCH_DONE_WITH_FAILURES)
    assert summary.finished_at == NOW + timedelta(seconds=3)


def test_items_are_read_in_pages_by_index(ledger):
    batch = _batch(total=7, chunk_size=3)
    ledger.add_batch(batch, _items(batch))
    assert [i.index for i in ledger.batch_items("b1", 0, 4)] == [0, 1, 2, 3]
    assert [i.index for i in ledger.batch_items("b1", 4, 4)] == [4, 5, 6]
    assert ledger.batch_items("b1", 7, 4) == []


def test_batches_are_listed_by_requester_oldest_first_in_pages(ledger):
    for number, by in enumerate(["line-1", "line-2", "line-1", "admin", "line-1"]):
        batch = _batch(f"b{number}", total=1, by=by, at=NOW + timedelta(seconds=number))
        ledger.add_batch(batch, _items(batch))
    page = ledger.list_batches("line-1", 2, None)
    assert [b.record.id for b in page.items] == ["b0", "b2"] and page.next_cursor
    rest = ledger.list_batches("line-1", 2, page.next_cursor)
    assert [b.record.id for b in rest.items] == ["b4"] and rest.next_cursor is None
    everyone = ledger.list_batches(None, 10, None)
    assert [b.record.id for b in everyone.items] == ["b0", "b1", "b2", "b3", "b4"]
    assert everyone.items[3].record.allowed_intermediates is None
    assert everyone.items[0].record.allowed_intermediates == ("int-1",)
    assert ledger.list_batches("line-9", 10, None).items == []


def test_batches_list_in_the_order_stored_whatever_each_hosts_time_zone(ledger, monkeypatch):
    """Instances whose local zones differ (Azure Functions honours WEBSITE_TIME_ZONE), or one whose zone
    changes, still list batches in the order they were stored: the listing order is kept in UTC."""
    try:
        for batch_id, zone in (("b1", "EAST-14"), ("b2", "WEST+12")):  # UTC+14, then UTC-12 (POSIX forms)
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            batch = _batch(batch_id, total=1)
            ledger.add_batch(batch, _items(batch))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert [b.record.id for b in ledger.list_batches(None, 10, None).items] == ["b1", "b2"]
    assert [b.record.id for b in ledger.list_batches("line-1", 10, None).items] == ["b1", "b2"]


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 5, 6])
def test_following_the_cursor_lists_every_batch_once_and_the_last_page_says_so(ledger, limit):
    for number in range(5):
        batch = _batch(f"b{number}", total=1, at=NOW + timedelta(seconds=number))
        ledger.add_batch(batch, _items(batch))
    pages, cursor = [], None
    while True:
        page = ledger.list_batches(None, limit, cursor)
        pages.append([b.record.id for b in page.items])
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    # full pages, then the rest; a page that ends the listing has no next cursor, even when it is full
    ids = [f"b{number}" for number in range(5)]
    assert pages == [ids[start : start + limit] for start in range(0, 5, limit)]


def test_a_cursor_from_elsewhere_is_refused(ledger):
    batch = _batch(total=1)
    ledger.add_batch(batch, _items(batch))
    for cursor in ("not-a-cursor!", "-1", "9" * 19, "1" + "0" * 40):
        with pytest.raises(CaError) as refused:
            ledger.list_batches("line-1", 2, cursor)
        assert refused.value.code == "invalid-cursor"


def test_a_sqlite_cursor_is_a_batch_number_of_up_to_18_digits(tmp_path):
    # 18 digits always fit SQLite's 64-bit integers; a longer cursor is refused rather than overflowing
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    batch = _batch(total=1)
    ledger.add_batch(batch, _items(batch))
    assert [b.record.id for b in ledger.list_batches(None, 2, "0" * 18).items] == ["b1"]
    assert ledger.list_batches(None, 2, "9" * 18) == BatchPage([], None)
    with pytest.raises(CaError) as refused:
        ledger.list_batches(None, 2, "9" * 19)
    assert refused.value.code == "invalid-cursor"
    ledger.close()


def test_two_deliveries_recording_one_chunk_at_once_count_each_item_once(ledger):
    batch = _batch(total=6, chunk_size=6)
    ledger.add_batch(batch, _items(batch))
    _, items = ledger.chunk_items("b1", 0)
    first = [_issued(item, f"1{item.index}") for item in items[:4]]
    second = [_issued(item, f"2{item.index}") for item in items[2:]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        changed = list(pool.map(lambda results: ledger.finish_chunk_items("b1", 0, results, NOW), [first, second]))
    assert sum(changed) == 6
    state, items = ledger.chunk_items("b1", 0)
    assert (state.issued, state.failed, state.finished_at) == (6, 0, NOW)
    assert {item.certificate.serial[1:] for item in items} == {str(n) for n in range(6)}
    assert ledger.get_batch("b1").status == BATCH_DONE


def test_a_chunk_with_results_for_some_of_its_items_is_not_finished(ledger):
    batch = _batch(total=3, chunk_size=3)
    ledger.add_batch(batch, _items(batch))
    _, items = ledger.chunk_items("b1", 0)
    assert ledger.finish_chunk_items("b1", 0, [_issued(items[0], "10")], NOW) == 1
    state, _ = ledger.chunk_items("b1", 0)
    assert (state.issued, state.failed, state.finished_at) == (1, 0, None)
    assert ledger.finish_chunk_items("b1", 0, [_issued(item, f"1{item.index}") for item in items[1:]], NOW) == 2
    assert ledger.chunk_items("b1", 0)[0].finished_at == NOW


def test_a_batch_stored_after_a_cursor_was_given_is_reached_by_following_it(ledger):
    """A large batch takes seconds to store (its chunks first, then its listing rows, then the batch):
    one that arrived first can finish after a smaller one that arrived later. Batches list in the order
    they were stored, so a listing going on from a cursor given before reaches it (on Table Storage the
    listing key was once the arrival time, which put such a batch behind the cursor)."""
    for number in (1, 2):
        batch = _batch(f"b{number}", total=1, at=NOW + timedelta(seconds=number))
        ledger.add_batch(batch, _items(batch))
    first = ledger.list_batches(None, 1, None)
    assert [b.record.id for b in first.items] == ["b1"] and first.next_cursor
    slow = _batch("slow", total=1, at=NOW)  # arrived before b1, stored only now
    ledger.add_batch(slow, _items(slow))
    seen, cursor = [], first.next_cursor
    while cursor is not None:
        page = ledger.list_batches(None, 1, cursor)
        seen += [b.record.id for b in page.items]
        cursor = page.next_cursor
    assert "slow" in seen, f"following the cursor reached {seen}, never the batch stored after it was given"
