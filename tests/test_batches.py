"""Batch signing as a use case, on both ledgers: submit, the chunk handler (through the embedded in-process
queue's worker, or called as the queue functions call it), redelivery, poison, ownership and reading rights."""

import base64
import logging

import pytest

from shared.errors import BackendUnavailable, CaError, Forbidden, NotFound
from shared.ledger.models import (
    BATCH_DONE,
    BATCH_DONE_WITH_FAILURES,
    BATCH_QUEUED,
    ITEM_FAILED,
    ITEM_ISSUED,
    CertificateQuery,
)
from shared.queues import InProcessQueue, MessageQueue
from shared.service import SignRequest
from shared.service.batches import CHUNK_SIZE, MAX_BATCH_ITEMS, ChunkMessage

from .certrules import check_device, load
from .csrs import csr_with_broken_signature, make_csr


def _items(prefix: str, count: int) -> list[dict]:
    return [{"deviceId": f"{prefix}-{n}", "csr": make_csr(f"{prefix}-{n}").decode()} for n in range(count)]


def _pem(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _all_results(service, batch_id: str, reader=None) -> list:
    results, cursor = [], None
    while True:
        page = service.batch_results(batch_id, reader, limit=40, cursor=cursor)
        results += page.results
        cursor = page.next_cursor
        if cursor is None:
            return results


def _messages(service) -> list[str]:
    """The chunk messages waiting on a service's batch queue (taken off it)."""
    queue = service.batch_queue
    taken = []
    while (text := queue.take()) is not None:
        taken.append(text)
    return taken


def _certificates(service) -> int:
    return len(service.ledger.list_certificates(CertificateQuery(limit=1000)).items)


def test_a_batch_is_signed_by_the_embedded_queues_worker(service):
    """The embedded default: the service's in-process queue has a worker running the chunk handler."""
    assert isinstance(service.batch_queue, InProcessQueue)
    items = _items("emb", CHUNK_SIZE + 3)  # two chunks
    submitted = service.submit_batch(items, requested_by="cli:test")
    assert submitted.record.chunks == 2 and submitted.record.intermediate_id == "factory-a"
    service.batch_queue.wait_idle()
    summary = service.batch(submitted.record.id)
    assert (summary.status, summary.issued, summary.failed, summary.pending) == (BATCH_DONE, CHUNK_SIZE + 3, 0, 0)
    assert summary.started_at is not None and summary.finished_at is not None
    results = _all_results(service, submitted.record.id)
    assert [r.index for r in results] == list(range(CHUNK_SIZE + 3))
    intermediate = load(service.intermediate("factory-a").certificate_pem)
    for result, item in zip(results, items, strict=True):
        assert result.status == ITEM_ISSUED and result.device_id == item["deviceId"]
        assert service.ledger.get_certificate(result.issued.record.serial) == result.issued.record
        check_device(load(result.issued.record.certificate_pem), intermediate, item["deviceId"])
    assert _certificates(service) == CHUNK_SIZE + 3


@pytest.fixture
def quiet(service):
    """The service with a queue that only keeps messages: the test delivers them itself."""
    service.batch_queue = InProcessQueue("held")
    return service


def test_bad_items_fail_alone_and_the_batch_finishes_done_with_failures(quiet):
    service = quiet
    good = _items("mix", 3)
    items = [
        good[0],
        {"deviceId": "mix-x", "csr": _pem(csr_with_broken_signature("mix-x"))},
        "not an object",
        {"deviceId": "mix-y"},
        {"deviceId": "mix-z", "csr": make_csr("someone-else").decode()},
        good[1],
        {"deviceId": "mix-w", "csr": "x", "extra": 1},
        good[2],
    ]
    submitted = service.submit_batch(items, requested_by="cli:test")
    assert (submitted.failed, submitted.status) == (3, BATCH_QUEUED)  # the malformed ones, at submission
    (message,) = _messages(service)
    outcome = service.sign_batch_chunk(message)
    assert (outcome.recorded, outcome.issued, outcome.already_finished) == (5, 3, False)
    summary = service.batch(submitted.record.id)
    assert (summary.status, summary.issued, summary.failed) == (BATCH_DONE_WITH_FAILURES, 3, 5)
    results = _all_results(service, submitted.record.id)
    failed = {r.index: r.error for r in results if r.status == ITEM_FAILED}
    assert sorted(failed) == [1, 2, 3, 4, 6]
    assert failed[1][0] == "bad-signature"
    assert failed[2] == ("invalid-item", "item 2: an item must be an object with deviceId and csr")
    assert failed[3] == ("invalid-item", "item 3: csr is missing or not a string (PEM)")
    assert failed[4][0] == "cn-mismatch"
    assert failed[6] == ("invalid-item", "item 6: unknown field(s): 'extra'")
    assert [r.device_id for r in results if r.status == ITEM_ISSUED] == ["mix-0", "mix-1", "mix-2"]


def test_a_redelivered_message_issues_nothing_new(quiet):
    service = quiet
    items = _items("again", 4)
    # an earlier delivery that committed two certificates and stopped before recording any result
    earlier = service.sign_csrs([SignRequest(i["csr"], i["deviceId"]) for i in items[:2]], requested_by="cli:test")
    submitted = service.submit_batch(items, requested_by="cli:test")
    (message,) = _messages(service)
    first = service.sign_batch_chunk(message)
    assert (first.recorded, first.issued) == (4, 2)  # two new, two found in the ledger
    results = _all_results(service, submitted.record.id)
    assert [r.issued.record.serial for r in results[:2]] == [e.record.serial for e in earlier]
    assert [r.issued.created for r in results] == [False, False, True, True]
    count = _certificates(service)
    again = service.sign_batch_chunk(message)
    assert again.already_finished and (again.recorded, again.issued) == (0, 0)
    assert _certificates(service) == count == 4
    assert _all_results(service, submitted.record.id) == results
    assert service.ledger.chunk_items(submitted.record.id, 0)[0].attempts == 1


def test_a_factory_reads_only_its_own_batches_and_an_admin_reads_all(quiet):
    service = quiet
    service.create_intermediate("factory-b")
    mine = service.submit_batch(_items("own", 1), requested_by="line-a", allowed_intermediates=["factory-a"])
    theirs = service.submit_batch(_items("their", 1), requested_by="line-b", allowed_intermediates=["factory-b"])
    assert theirs.record.intermediate_id == "factory-b"
    assert service.batch(mine.record.id, "line-a").record.id == mine.record.id
    for batch_id in (theirs.record.id, "0123456789abcdef", "../etc"):
        with pytest.raises(NotFound) as hidden:
            service.batch(batch_id, "line-a")
        assert hidden.value.code == "batch-not-found"
    with pytest.raises(NotFound):
        service.batch_results(theirs.record.id, "line-a")
    assert service.batch(theirs.record.id).record.requested_by == "line-b"  # an admin
    assert [b.record.id for b in service.batches("line-a").items] == [mine.record.id]
    assert [b.record.id for b in service.batches().items] == [mine.record.id, theirs.record.id]


def test_items_for_a_device_another_factory_owns_fail_with_the_ownership_error(quiet):
    service = quiet
    service.principals.create_factory("line-a", ["factory-a"])
    service.principals.create_factory("line-b", ["factory-a"])
    service.sign_csr(make_csr("owned-by-b"), "owned-by-b", requested_by="line-b", allowed_intermediates=["factory-a"])
    items = [*_items("line-a-new", 1), {"deviceId": "owned-by-b", "csr": make_csr("owned-by-b").decode()}]
    submitted = service.submit_batch(items, requested_by="line-a", allowed_intermediates=["factory-a"])
    service.sign_batch_chunk(_messages(service)[0])
    results = _all_results(service, submitted.record.id, "line-a")
    assert results[0].status == ITEM_ISSUED
    assert results[1].status == ITEM_FAILED and results[1].error[0] == "device-owned-by-another-factory"
    assert "line-b" not in results[1].error[1]


def test_a_factory_unbound_after_submitting_gets_its_items_refused(quiet):
    service = quiet
    service.create_intermediate("factory-b")
    service.principals.create_factory("line-a", ["factory-a"])
    submitted = service.submit_batch(_items("unbound", 2), requested_by="line-a", allowed_intermediates=["factory-a"])
    service.principals.bind_factory("line-a", ["factory-b"])
    service.sign_batch_chunk(_messages(service)[0])
    results = _all_results(service, submitted.record.id)
    assert {r.error[0] for r in results} == {"intermediate-not-allowed"}
    assert _certificates(service) == 0


def test_the_poison_handler_fails_the_unfinished_items_with_the_last_failure(quiet):
    service = quiet
    submitted = service.submit_batch(_items("poison", 3), requested_by="cli:test")
    (message,) = _messages(service)
    service.ledger.start_chunk(submitted.record.id, 0, service._now())
    service.ledger.note_chunk_failure(submitted.record.id, 0, "backend-unavailable: Key Vault is away")
    outcome = service.fail_batch_chunk(message)
    assert outcome.recorded == 3
    summary = service.batch(submitted.record.id)
    assert (summary.status, summary.failed) == (BATCH_DONE_WITH_FAILURES, 3)
    (code, words), *_ = {r.error for r in _all_results(service, submitted.record.id)}
    assert code == "chunk-failed" and "(1)" in words and "Key Vault is away" in words
    assert service.fail_batch_chunk(message).recorded == 0  # a poison message seen twice changes nothing
    assert service.sign_batch_chunk(message).already_finished


def test_submission_is_checked(quiet):
    service = quiet
    with pytest.raises(CaError) as empty:
        service.submit_batch([], requested_by="cli:test")
    assert empty.value.code == "empty-batch"
    with pytest.raises(CaError) as many:
        service.submit_batch([{}] * (MAX_BATCH_ITEMS + 1), requested_by="cli:test")
    assert many.value.code == "too-many-items"
    service.create_intermediate("factory-b")
    with pytest.raises(Forbidden):
        service.submit_batch(
            _items("x", 1), requested_by="l", allowed_intermediates=["factory-a"], intermediate_id="factory-b"
        )
    with pytest.raises(NotFound):
        service.submit_batch(_items("x", 1), requested_by="cli:test", intermediate_id="nope")
    assert service.batches().items == []  # nothing stored by a refused submission
    long_id = {"deviceId": "d" * 129, "csr": "x"}
    big_csr = {"deviceId": "big", "csr": "x" * (8 * 1024 + 1)}
    blank = {"deviceId": "", "csr": "x"}
    all_bad = service.submit_batch([long_id, big_csr, blank], requested_by="cli:test")
    assert (all_bad.status, all_bad.failed) == (BATCH_DONE_WITH_FAILURES, 3)
    assert _messages(service) == []  # nothing to sign: nothing queued
    errors = [r.error[1] for r in _all_results(service, all_bad.record.id)]
    assert errors == [
        "item 0: deviceId is longer than 128 characters",
        "item 1: csr is longer than 8192 characters",
        "item 2: deviceId is missing or not a string",
    ]


def test_messages_that_name_no_stored_chunk_are_refused(quiet):
    service = quiet
    for text in ("{}", "not json", '{"batchId": "0123456789abcdef", "chunk": -1}', '{"batchId": "x", "chunk": 0}'):
        with pytest.raises(CaError) as refused:
            service.sign_batch_chunk(text)
        assert refused.value.code == "invalid-message"
    with pytest.raises(NotFound):
        service.sign_batch_chunk(ChunkMessage(batchId="0123456789abcdef", chunk=0).text())
    submitted = service.submit_batch(_items("one", 1), requested_by="cli:test")
    with pytest.raises(NotFound) as missing:
        service.sign_batch_chunk(ChunkMessage(batchId=submitted.record.id, chunk=7).text())
    assert missing.value.code == "chunk-not-found"
    loose = ('{"batchId": "%s", "chunk": true}', '{"batchId": "%s", "chunk": "0"}', '{"batchId": "%s", "chunk": 0.0}')
    for text in loose:  # never what this app sends: not read as chunk 1 or 0
        with pytest.raises(CaError) as refused:
            service.sign_batch_chunk(text % submitted.record.id)
        assert refused.value.code == "invalid-message"
    assert service.batch(submitted.record.id).status == BATCH_QUEUED


def test_result_pages_follow_the_cursor(quiet):
    service = quiet
    submitted = service.submit_batch(_items("page", 5), requested_by="cli:test")
    page = service.batch_results(submitted.record.id, limit=2)
    assert [r.index for r in page.results] == [0, 1] and page.next_cursor == "2"
    assert all(r.status == "pending" and r.issued is None and r.error is None for r in page.results)
    last = service.batch_results(submitted.record.id, limit=2, cursor="4")
    assert [r.index for r in last.results] == [4] and last.next_cursor is None
    for cursor in ("abc", "1234567"):
        with pytest.raises(CaError) as refused:
            service.batch_results(submitted.record.id, cursor=cursor)
        assert refused.value.code == "invalid-cursor"


class _UnreachableQueue(MessageQueue):
    """A queue whose Storage account does not answer: the port's failure, as StorageQueue reports it."""

    name = "unreachable"

    def send(self, text: str, delay_seconds: int = 0) -> None:
        if ChunkMessage.read(text).chunk > 0:  # the first message went through
            raise BackendUnavailable("Queue Storage is unreachable: ServiceRequestError")


def test_chunks_that_cannot_be_queued_have_their_items_failed(quiet):
    service = quiet
    service.batch_queue = _UnreachableQueue()
    with pytest.raises(BackendUnavailable) as refused:
        service.submit_batch(_items("unq", CHUNK_SIZE * 2 + 1), requested_by="cli:test")
    assert refused.value.code == "batch-not-queued" and "2 of its 3 chunks" in refused.value.message
    assert "(chunks 1, 2)" in refused.value.message
    (batch,) = service.batches().items
    assert (batch.failed, batch.pending) == (CHUNK_SIZE + 1, CHUNK_SIZE)  # chunk 0 was queued
    results = _all_results(service, batch.record.id)
    assert {r.error[0] for r in results[CHUNK_SIZE:]} == {"not-queued"}


def test_a_cancelled_batch_fails_its_unfinished_items_and_keeps_the_rest(quiet):
    service = quiet
    submitted = service.submit_batch(_items("cancel", CHUNK_SIZE + 1), requested_by="cli:test")
    first, _ = _messages(service)
    service.sign_batch_chunk(first)
    assert service.cancel_batch(submitted.record.id, "stopped by its command") == 1
    summary = service.batch(submitted.record.id)
    assert (summary.status, summary.issued, summary.failed) == (BATCH_DONE_WITH_FAILURES, CHUNK_SIZE, 1)
    last = service.batch_results(submitted.record.id, cursor=str(CHUNK_SIZE)).results[0]
    assert last.error == ("batch-cancelled", "stopped by its command")


def test_a_restarted_embedded_server_queues_unfinished_chunks_again(quiet):
    service = quiet
    submitted = service.submit_batch(_items("restart", 2), requested_by="cli:test")
    _messages(service)  # the in-process queue is lost with its process
    service.batch_queue = InProcessQueue("after-restart")
    service.batch_queue.serve(service.sign_batch_chunk, service.fail_batch_chunk)
    assert service.resume_batches() == 1
    service.batch_queue.wait_idle()
    assert service.batch(submitted.record.id).status == BATCH_DONE
    assert service.resume_batches() == 0


def test_a_server_whose_workers_still_sign_some_chunks_queues_them_again_from_the_last(quiet):
    # serve --workers after one died: the living ones sign their batches from the first chunk, the parent
    # from the last, so that they meet once in each batch rather than sign the same chunks side by side
    service = quiet
    first = service.submit_batch(_items("older", CHUNK_SIZE + 1), requested_by="cli:test").record.id
    second = service.submit_batch(_items("newer", 1), requested_by="cli:test").record.id
    _messages(service)
    assert service.resume_batches() == 3
    oldest_first = [(m.batchId, m.chunk) for m in map(ChunkMessage.read, _messages(service))]
    assert sorted(oldest_first) == sorted([(first, 0), (first, 1), (second, 0)])
    assert oldest_first.index((first, 0)) < oldest_first.index((first, 1))
    assert service.resume_batches(last_first=True) == 3
    assert [(m.batchId, m.chunk) for m in map(ChunkMessage.read, _messages(service))] == oldest_first[::-1]


def _committed_then_stopped(service, items, submitted, **rights) -> list:
    """What a delivery that stopped between its two writes leaves: certificates committed for `items` under
    the batch's intermediate and submitter, and no result recorded."""
    record = submitted.record
    requests = [SignRequest(i["csr"], i["deviceId"]) for i in items]
    issued = service.sign_csrs(
        requests, intermediate_id=record.intermediate_id, requested_by=record.requested_by, **rights
    )
    assert all(not isinstance(i, CaError) for i in issued)
    return [i.record.serial for i in issued]


def test_a_factory_unbound_after_a_delivery_committed_keeps_those_certificates_as_results(quiet):
    service = quiet
    service.create_intermediate("factory-b")
    service.principals.create_factory("line-a", ["factory-a"])
    items = _items("stopped", 3)
    submitted = service.submit_batch(items, requested_by="line-a", allowed_intermediates=["factory-a"])
    serials = _committed_then_stopped(service, items[:2], submitted, allowed_intermediates=["factory-a"])
    service.principals.bind_factory("line-a", ["factory-b"])
    service.sign_batch_chunk(_messages(service)[0])  # the redelivery, after the unbinding
    results = _all_results(service, submitted.record.id, "line-a")
    assert [r.status for r in results] == [ITEM_ISSUED, ITEM_ISSUED, ITEM_FAILED]
    assert [r.issued.record.serial for r in results[:2]] == serials
    assert results[2].error[0] == "intermediate-not-allowed"
    assert _certificates(service) == 2
    summary = service.batch(submitted.record.id)
    assert (summary.status, summary.issued, summary.failed) == (BATCH_DONE_WITH_FAILURES, 2, 1)


def test_the_poison_handler_gives_committed_certificates_not_failures(quiet, clock):
    """Only a certificate the batch's deliveries committed: for the item's key, by its submitter, since it was
    submitted; an older one of the same CSR, or another requester's, is not the batch's to give."""
    service = quiet
    older = make_csr("older-0")
    service.sign_csr(older, "older-0", requested_by="cli:submitter")
    clock.advance(seconds=5)
    items = [{"deviceId": "older-0", "csr": older.decode()}, *_items("late", 2)]
    submitted = service.submit_batch(items, requested_by="cli:submitter")
    (message,) = _messages(service)
    (serial,) = _committed_then_stopped(service, items[1:2], submitted)
    service.sign_csr(items[2]["csr"], "late-1", requested_by="cli:someone-else")
    service.ledger.note_chunk_failure(submitted.record.id, 0, "key-vault-unavailable: away")
    assert service.fail_batch_chunk(message).recorded == 3
    results = _all_results(service, submitted.record.id)
    assert [r.status for r in results] == [ITEM_FAILED, ITEM_ISSUED, ITEM_FAILED]
    assert results[1].issued.record.serial == serial and not results[1].issued.created
    assert {r.error[0] for r in (results[0], results[2])} == {"chunk-failed"}


def test_the_embedded_worker_drops_a_message_it_can_never_sign_at_once(embedded_service, caplog):
    """As the queue functions do: a message that is not this app's, or names no stored chunk, is dropped with
    one warning, not delivered again and again (with backoff) until the poison handler refuses it too."""
    queue = embedded_service.batch_queue
    assert isinstance(queue, InProcessQueue)
    with caplog.at_level(logging.WARNING):
        for text in ("not json", ChunkMessage(batchId="0123456789abcdef", chunk=0).text()):
            queue.send(text)
        queue.wait_idle()
    dropped = [r.getMessage() for r in caplog.records if r.name == "device_ca.queues"]
    assert [line.split(": ")[0] for line in dropped] == ["queue message dropped"] * 2
    assert "invalid-message" in dropped[0] and "batch-not-found" in dropped[1]
    assert not [r for r in caplog.records if "delivery" in r.getMessage()]
