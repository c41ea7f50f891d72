"""Writes that may have been done though their caller was not told (an answer lost, Storage's 500 "the
operation may or may not have succeeded", an interrupt), and the retries and redeliveries that follow: what
landed is never undone, and the retry finishes the job. Faults are injected at the HTTP level of the Table
Storage ledger (the real SDK against Azurite)."""

import json
from dataclasses import replace
from datetime import timedelta
from urllib.parse import unquote, urlparse

import pytest
import requests
from azure.core.exceptions import ServiceResponseError
from azure.core.pipeline.transport import RequestsTransport, RequestsTransportResponse

from shared.errors import BackendUnavailable, Conflict
from shared.ledger.models import FACTORY, Principal
from shared.service.access import Principals
from shared.service.batches import ChunkMessage

from . import test_ledger_tables
from .azurite import table_prefix
from .csrs import device_key, make_csr
from .fakes.queues import QueueDown
from .test_ledger_tables import RequestHook

tables = test_ledger_tables.tables  # the fixture: a CA on fresh tables, its ledger on a given transport


class Storage(RequestsTransport):
    """The real transport; `decide(request)` (set by a test) may name a fault for a request:
    "lost": sent, and its answer lost (ServiceResponseError: the SDK does not send a POST or PATCH again);
    "500": sent, and answered 500 OperationTimedOut ("may or may not have succeeded"), which the SDK retries;
    "503": not sent, answered 503 ServerBusy; "interrupt": sent, then Ctrl-C (KeyboardInterrupt)."""

    def __init__(self) -> None:
        super().__init__()
        self.decide = None

    def send(self, request, **kwargs):
        fault = self.decide(request) if self.decide else None
        if fault is None:
            return super().send(request, **kwargs)
        if fault == "503":
            return _answer(request, 503, "ServerBusy")
        answer = super().send(request, **kwargs)
        answer.internal_response.close()
        if fault == "lost":
            raise ServiceResponseError("the connection was lost before the answer (injected)")
        if fault == "interrupt":
            raise KeyboardInterrupt
        assert fault == "500"
        return _answer(request, 500, "OperationTimedOut")


def _answer(request, status: int, code: str) -> RequestsTransportResponse:
    response = requests.Response()
    response.status_code = status
    response.reason = code
    response.headers["Content-Type"] = "application/json"
    response.headers["x-ms-error-code"] = code
    response._content = json.dumps({"odata.error": {"code": code, "message": {"value": code}}}).encode()
    return RequestsTransportResponse(request, response)


def _path(request) -> str:
    return unquote(urlparse(request.url).path)


def _insert_into(prefix: str, table: str):
    """An entity inserted on its own (create_entity: POST to the table)."""
    return lambda request: request.method == "POST" and _path(request).endswith(f"/{prefix}{table}")


def _transaction(request) -> bool:
    return request.method == "POST" and "$batch" in request.url


def _once(matches, fault: str):
    """`fault` for the first request that `matches`, then nothing."""
    state = {"done": False}

    def decide(request):
        if not state["done"] and matches(request):
            state["done"] = True
            return fault
        return None

    return decide


def _then(first, second, fault: str, times: int = 1):
    """`fault` for the first `times` requests that match `second` after one that matched `first`."""
    state = {"seen": False, "left": times}

    def decide(request):
        if state["seen"] and state["left"] and second(request):
            state["left"] -= 1
            return fault
        if first(request):
            state["seen"] = True
        return None

    return decide


def test_a_root_whose_creation_is_interrupted_after_its_ledger_write_keeps_its_key(tables):
    """Ctrl-C while the root's record is on its way (the CLI; Storage's retries may take 30 s) and after it
    landed: the key stays, since removing it would leave a root that can never sign and that no new root
    can replace."""
    transport = Storage()
    service = tables(table_prefix(), transport)
    transport.decide = _once(_transaction, "interrupt")
    with pytest.raises(KeyboardInterrupt):
        service.create_root()
    transport.decide = None
    root = service.ledger.get_root()
    assert root is not None, "the root's record reached Storage"
    service.keys.signing_key(root.key_name)  # the key of the root the ledger holds must still be there


@pytest.mark.parametrize("write", ["principal", "api key"])
def test_a_factory_whose_write_lost_its_answer_is_created_by_that_request(tables, write):
    """The principal's transaction, or its API key's insert, lands and its answer is lost: the ledger reads
    whether it landed, and the request goes on; the admin gets the key (its secret is still in hand), and
    the factory has that one key, not a stored key whose secret was thrown away with a 503."""
    prefix, transport = table_prefix(), Storage()
    service = tables(prefix, transport)
    service.create_root()
    service.create_intermediate("factory-a")
    transport.decide = _once(_transaction if write == "principal" else _insert_into(prefix, "principals"), "lost")
    made = service.principals.create_factory("line-1", ["factory-a"])
    transport.decide = None
    assert service.principals.authenticate(made.secret).id == "line-1"
    assert [key.id for key in service.ledger.list_api_keys()] == [made.key.id]


def test_a_factory_left_without_its_key_is_given_one_by_the_same_request_once_its_creation_is_over(tables, clock):
    """The principal lands, then Storage refuses the key's insert (503): the factory is left without a key.
    The same request again gives it its key, but only once a creation could no longer be writing one (twice
    the ledger's retry time): before, it is 503 principal-being-created, so that two creations at once never
    both get a key. Once it has one, or for another factory of that name, it is 409 principal-exists."""
    prefix, transport = table_prefix(), Storage()
    service = tables(prefix, transport, retry_seconds=0.5)
    service.create_root()
    service.create_intermediate("factory-a")
    service.create_intermediate("factory-b")
    transport.decide = lambda request: "503" if _insert_into(prefix, "principals")(request) else None
    with pytest.raises(BackendUnavailable):
        service.principals.create_factory("line-1", ["factory-a"])
    transport.decide = None
    assert service.ledger.get_principal("line-1") is not None and service.ledger.list_api_keys() == []
    with pytest.raises(BackendUnavailable) as busy:
        service.principals.create_factory("line-1", ["factory-a"])
    creation = 2 * service.settings.ledger_retry_seconds  # LEDGER_RETRY_SECONDS: 30 s, so 60 s
    assert busy.value.code == "principal-being-created" and busy.value.retry_after == creation
    clock.advance(seconds=creation)  # the very instant a creation could no longer be writing its key
    with pytest.raises(Conflict) as other:  # not the same factory: bound to other intermediates
        service.principals.create_factory("line-1", ["factory-a", "factory-b"])
    assert other.value.code == "principal-exists"
    created = service.principals.create_factory("line-1", ["factory-a"])  # the same request again
    assert service.principals.authenticate(created.secret).id == "line-1"
    with pytest.raises(Conflict) as again:  # it has its key now
        service.principals.create_factory("line-1", ["factory-a"])
    assert again.value.code == "principal-exists"
    assert [key.principal_id for key in service.ledger.list_api_keys()] == ["line-1"]


def test_a_creation_time_under_a_second_asks_for_a_retry_after_one_second(embedded_service, clock):
    """Principals takes its creation time from whoever builds it (the service: twice LEDGER_RETRY_SECONDS, a
    whole number); under a second, Retry-After is still 1 s, as it is in whole seconds (RFC 9110 section
    10.2.3) and 0 would ask for a retry at once. A factory written without its key (its creation cut short
    between the two writes, here by writing only the principal) is given its key once the time is over."""
    clock.now = clock.now.replace(microsecond=0)  # the SQLite ledger keeps whole seconds
    principals = Principals(embedded_service.ledger, clock, creation_seconds=0.4)
    left = Principal(id="line-1", role=FACTORY, intermediates=("factory-a",), created_at=clock())
    embedded_service.ledger.add_principal(left)
    with pytest.raises(BackendUnavailable) as busy:
        principals.create_factory("line-1", ["factory-a"])
    assert busy.value.code == "principal-being-created" and busy.value.retry_after == 1
    clock.advance(seconds=0.4)
    made = principals.create_factory("line-1", ["factory-a"])
    assert principals.authenticate(made.secret).id == "line-1"


def test_two_admins_creating_one_factory_at_once_do_not_both_get_a_key(tables):
    """Admin A's create_factory writes the principal; before A's API key is written, admin B creates the same
    factory. B's request finds it keyless but young, so it is told to try again (503): only A gets a key."""
    prefix = table_prefix()
    hook = RequestHook(_insert_into(prefix, "principals"))  # the API key's insert (the principal's is a $batch)
    admin_a = tables(prefix, hook)
    admin_b = tables(prefix)
    admin_a.create_root()
    admin_a.create_intermediate("factory-a")
    outcomes: dict[str, object] = {}

    def admin_b_creates():
        with pytest.raises(BackendUnavailable) as busy:
            admin_b.principals.create_factory("line-1", ["factory-a"])
        outcomes["b"] = busy.value.code

    hook.before = admin_b_creates
    made = admin_a.principals.create_factory("line-1", ["factory-a"])
    assert hook.before is None and outcomes["b"] == "principal-being-created"
    assert [key.id for key in admin_a.ledger.list_api_keys()] == [made.key.id]
    with pytest.raises(Conflict) as taken:
        admin_b.principals.create_factory("line-1", ["factory-a"])
    assert taken.value.code == "principal-exists"


def _block_in_dps(service, device_id: str) -> None:
    """The device certified, then its certificate revoked: DPS blocks it (a disabled individual enrollment)."""
    first = service.sign_csr(make_csr(device_id), device_id)
    service.revoke(first.record.serial)
    assert service.dps.documents.get("individual-enrollments", device_id)["provisioningStatus"] == "disabled"


def test_a_recertified_device_whose_commit_lost_its_answer_is_put_in_step_with_dps_by_the_retry(tables):
    """A device whose certificate was revoked is blocked in DPS (a disabled individual enrollment). It gets a
    new certificate for a new key; the commit lands but its answer is lost (503 to the caller). The retry with
    the same CSR is answered from the ledger (created False), and it is the one left to admit the device in
    DPS with that certificate."""
    prefix, transport = table_prefix(), Storage()
    service = tables(prefix, transport)
    service.create_root()
    service.create_intermediate("factory-a")
    _block_in_dps(service, "dev-1")
    csr = make_csr("dev-1", key=device_key())
    # the key binding's insert, then the device's transaction: that one's answer is lost
    transport.decide = _then(_insert_into(prefix, "keys"), _transaction, "lost")
    with pytest.raises(BackendUnavailable):
        service.sign_csr(csr, "dev-1")
    transport.decide = None
    again = service.sign_csr(csr, "dev-1")  # the same request again
    assert not again.created  # answered from the ledger: the first attempt's commit landed
    assert service.ledger.active_certificates(["dev-1"])["dev-1"].serial == again.record.serial
    enrollment = service.dps.documents.get("individual-enrollments", "dev-1")
    certificate = enrollment["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"]
    assert (enrollment["provisioningStatus"], certificate) == ("enabled", again.record.certificate_pem)
    assert again.warnings == ()


def test_a_device_commit_storage_timed_out_on_keeps_its_key_binding_when_the_head_cannot_be_read(tables):
    """The device transaction is carried out but answered 500; the SDK sends it again and gets 409, and the
    head read that follows fails (Storage busy). The key binding made for it stays (the certificate holding
    the key is committed), so the key is never certified for a second device."""
    prefix, transport = table_prefix(), Storage()
    service = tables(prefix, transport, retry_seconds=0.3)
    service.create_root()
    service.create_intermediate("factory-a")
    key = device_key()
    state = {"stage": 0}

    def decide(request):
        if state["stage"] == 0 and _insert_into(prefix, "keys")(request):
            state["stage"] = 1  # the binding is inserted; the device transaction comes next
        elif state["stage"] == 1 and _transaction(request):
            state["stage"] = 2
            return "500"
        elif state["stage"] == 2 and request.method == "GET" and "head" in unquote(request.url):
            return "503"
        return None

    transport.decide = decide
    with pytest.raises(BackendUnavailable):
        service.sign_csr(make_csr("dev-1", key=key), "dev-1")
    transport.decide = None
    committed = service.ledger.active_certificates(["dev-1"])["dev-1"]  # dev-1's certificate is committed
    assert service.ledger.key_bindings([committed.public_key_sha256]) == {committed.public_key_sha256: ("dev-1", False)}
    with pytest.raises(Conflict) as refused:
        service.sign_csr(make_csr("dev-2", key=key), "dev-2")
    assert refused.value.code == "key-in-use"


def test_a_batch_chunk_redelivered_after_its_commit_lost_its_answer_puts_a_recertified_device_in_step_with_dps(
    tables,
):
    """The queue handler's form: a chunk recertifies a revoked device; its commit lands but the answer is
    lost, so the delivery raises (transient). The redelivery finds the certificate in the ledger (created
    False), records the item issued and admits the device in DPS."""
    prefix, transport = table_prefix(), Storage()
    service = tables(prefix, transport)
    service.create_root()
    service.create_intermediate("factory-a")
    _block_in_dps(service, "dev-1")
    items = [{"deviceId": "dev-1", "csr": make_csr("dev-1", key=device_key()).decode()}]
    batch = service.submit_batch(items, requested_by="cli", enqueue=False)
    message = ChunkMessage(batchId=batch.record.id, chunk=0).text()
    transport.decide = _then(_insert_into(prefix, "keys"), _transaction, "lost")
    with pytest.raises(BackendUnavailable):
        service.sign_batch_chunk(message)
    transport.decide = None
    assert service.sign_batch_chunk(message).recorded == 1  # delivered again
    (result,) = service.batch_results(batch.record.id).results
    assert result.status == "issued"
    enrollment = service.dps.documents.get("individual-enrollments", "dev-1")
    certificate = enrollment["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"]
    assert (enrollment["provisioningStatus"], certificate) == ("enabled", result.issued.record.certificate_pem)


@pytest.mark.parametrize("write", ["principal", "api key"])
def test_a_principal_or_key_whose_insert_storage_timed_out_after_doing_it_is_created(tables, write):
    """Storage answers 500 OperationTimedOut ("may or may not have succeeded") to an insert it carried out;
    the SDK sends it again and meets its own write (409). That is this very record, not another one with
    its name or its fresh random ID: the factory is created and gets its key."""
    prefix, transport = table_prefix(), Storage()
    service = tables(prefix, transport)
    service.create_root()
    service.create_intermediate("factory-a")
    inserted = _transaction if write == "principal" else _insert_into(prefix, "principals")
    timed_out: list[str] = []

    def decide(request):
        if not timed_out and inserted(request):
            timed_out.append(request.url)
            return "500"
        return None

    transport.decide = decide
    made = service.principals.create_factory("line-1", ["factory-a"])
    transport.decide = None
    assert timed_out, "the insert was answered 500"
    assert service.principals.authenticate(made.secret).id == "line-1"
    assert [key.id for key in service.ledger.list_api_keys()] == [made.key.id]


def test_an_intermediate_whose_dps_step_failed_after_its_record_is_created_and_says_retry_dps(tables):
    """The intermediate's record lands, then Storage fails every call of the DPS registration step (offline
    DPS keeps its documents beside the ledger): the creation stands, with a warning naming retry-dps, rather
    than a 503 whose retry would meet ca-exists and leave the intermediate with no DPS state at all. Running
    retry-dps then registers it (offline: records its enrollment group's document)."""
    prefix, transport = table_prefix(), Storage()
    service = tables(prefix, transport, retry_seconds=0.3)
    service.create_root()
    transport.decide = _then(_transaction, lambda request: True, "503", times=10_000)
    created = service.create_intermediate("factory-b")
    transport.decide = None
    assert created.record == replace(service.ledger.get_ca("factory-b"), dps={})
    assert any("run retry-dps factory-b" in warning for warning in created.warnings), created.warnings
    record, _ = service.retry_dps("factory-b")
    assert record.dps["mode"] == "offline" and service.ledger.get_ca("factory-b") == record
    assert service.dps.documents.get("enrollment-groups", "factory-b") is not None


@pytest.mark.parametrize(("write", "fault"), [("own row", "lost"), ("own row", "500"), ("chunk", "500")])
def test_a_batch_whose_own_row_landed_unanswered_is_stored_and_queued(tables, write, fault):
    """The batch's own row (written last: the batch exists from then on) lands, and its answer is lost, or
    is Storage's 500, which the SDK sends again into its own write. The batch is stored and its chunk queued,
    and the caller gets it, not a 503 or a 409 batch-exists for a random ID it never chose (whose retry would
    store a second batch while the first waited unqueued). A chunk's transaction answered 500 the same way
    is that chunk."""
    prefix, transport = table_prefix(), Storage()
    service = tables(prefix, transport)
    service.create_root()
    service.create_intermediate("factory-a")
    items = [{"deviceId": f"dev-{n}", "csr": make_csr(f"dev-{n}").decode()} for n in range(3)]
    transport.decide = _once(_insert_into(prefix, "batches") if write == "own row" else _transaction, fault)
    submitted = service.submit_batch(items, requested_by="cli")
    transport.decide = None
    assert service.ledger.get_batch(submitted.record.id).record == submitted.record
    message = service.batch_queue.take()
    assert message == ChunkMessage(batchId=submitted.record.id, chunk=0).text() and service.batch_queue.take() is None
    assert service.sign_batch_chunk(message).recorded == 3


def _a_device_20_days_before_its_expiry(tables, clock):
    """A CA on fresh tables whose ledger talks through a `Storage` transport, and dev-1's certificate, with
    the clock 20 days before its notAfter (its 30-day stage is due): (service, transport, record)."""
    transport = Storage()
    service = tables(table_prefix(), transport)
    service.create_root()
    service.create_intermediate("factory-a")
    record = service.sign_csr(make_csr("dev-1"), "dev-1").record
    clock.now = record.not_after - timedelta(days=20)
    return service, transport, record


def _merged_onto_expiry_row(request) -> bool:
    """An expiry index row is merged onto: a stage claimed or released."""
    return request.method in ("PATCH", "MERGE") and "PartitionKey='exp-" in unquote(request.url)


@pytest.mark.parametrize("fault", ["lost", "500"])
def test_an_expiry_stage_whose_claim_went_unanswered_is_announced_once(tables, clock, fault):
    """The scan claims a certificate's stage (a merge on the row's etag, with a token of its own); the merge
    lands and its answer is lost, or is Storage's 500 that the SDK sends again into a 412 on its own write.
    The row holds this scan's token, so the claim is this scan's: the stage is announced now, and once,
    rather than never (a later scan takes the recorded stage for announced)."""
    service, transport, _ = _a_device_20_days_before_its_expiry(tables, clock)

    transport.decide = _once(_merged_onto_expiry_row, fault)
    first = service.scan_expiring()
    transport.decide = None
    assert [(f.subject, f.stage, f.announced) for f in first.findings] == [("dev-1", "30d", True)]
    assert first.failures == ()
    notices = [json.loads(text) for text in iter(service.expiry_queue.take, None)]
    assert [(n["deviceId"], n["stage"]) for n in notices] == [("dev-1", "30d")]
    again = service.scan_expiring()
    assert [(f.subject, f.announced) for f in again.findings] == [("dev-1", False)]
    assert service.expiry_queue.take() is None


@pytest.mark.parametrize("fault", ["lost", "500"])
def test_an_expiry_stage_claimed_unanswered_then_not_announced_is_released_for_the_next_scan(tables, clock, fault):
    """As above, the claim's answer goes astray and the row shows the claim is this scan's; then its notice
    cannot be sent. The claim is released on the etag the row was read back with (not the one the scan
    first read, which the claim itself changed), so the next scan announces the stage, once."""
    service, transport, _ = _a_device_20_days_before_its_expiry(tables, clock)

    transport.decide = _once(_merged_onto_expiry_row, fault)
    working, service.expiry_queue = service.expiry_queue, QueueDown("expiring-certificates")
    first = service.scan_expiring()
    transport.decide, service.expiry_queue = None, working
    assert first.announced == () and len(first.failures) == 1, first.failures
    assert [(f.subject, f.stage) for f in service.scan_expiring().announced] == [("dev-1", "30d")]
    assert [json.loads(text)["stage"] for text in iter(service.expiry_queue.take, None)] == ["30d"]
    assert service.scan_expiring().announced == ()


@pytest.mark.parametrize("fault", ["lost", "500"])
def test_a_claim_read_back_after_its_answer_went_astray_is_the_watch_as_claimed(tables, clock, fault):
    """The ledger's own answer when it read its claim back: the watch with the stage claimed, on the version
    the row now has (the claim changed its etag), which the release then matches."""
    service, transport, record = _a_device_20_days_before_its_expiry(tables, clock)
    later = record.not_after + timedelta(days=1)
    (watch,) = service.ledger.expiry_watch(later)
    transport.decide = _once(_merged_onto_expiry_row, fault)
    claimed = service.ledger.claim_expiry_stage(watch, "30d", clock.now)
    transport.decide = None
    assert claimed == replace(watch, stage="30d", version=claimed.version)
    assert claimed.version[:2] == watch.version[:2] and claimed.version[2] != watch.version[2]
    assert service.ledger.expiry_watch(later) == [claimed]  # as the row now is
    service.ledger.release_expiry_stage(claimed, watch.stage)
    assert [w.stage for w in service.ledger.expiry_watch(later)] == [watch.stage]


@pytest.mark.parametrize("fault", ["lost", "500"])
def test_a_revocation_whose_transaction_went_unanswered_names_what_it_also_revoked(tables, clock, fault):
    """Revoking a superseded certificate also revokes the active one holding its key. The device transaction
    lands, and its answer is lost (the caller retries) or is Storage's 500 (the SDK sends it again into a 412
    on itself): the answer still names the certificate revoked with it, as the first would have."""
    prefix, transport = table_prefix(), Storage()
    service = tables(prefix, transport)
    service.create_root()
    service.create_intermediate("factory-a")
    key = device_key()
    first = service.sign_csr(make_csr("dev-1", key=key), "dev-1").record
    clock.advance(minutes=30)  # a renewal, not a retry of the first request
    second = service.sign_csr(make_csr("dev-1", key=key), "dev-1", renew=True).record
    transport.decide = _once(_transaction, fault)
    if fault == "lost":
        with pytest.raises(BackendUnavailable):
            service.revoke(first.serial, "keyCompromise")
        transport.decide = None
    revocation, _ = service.revoke(first.serial, "keyCompromise")
    transport.decide = None
    assert revocation.record == service.certificate(first.serial) and revocation.record.status == "revoked"
    assert revocation.also_revoked == (service.certificate(second.serial),)
    assert revocation.also_revoked[0].status == "revoked"
