"""What is Table Storage's own: a crash at every Storage call of an issuance, Storage that keeps failing
(503 with Retry-After, nothing recorded), transactions counted, and a service that keeps nothing on disk."""

import base64
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests
from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import HttpTransport, RequestsTransport, RequestsTransportResponse
from fastapi.testclient import TestClient

from shared.api import create_app
from shared.composition import ledger_and_dps
from shared.config import Settings
from shared.dps.offline import OfflineDps
from shared.errors import BackendUnavailable, CaError, Conflict
from shared.keys.keyvault import KeyVaultKeyStore
from shared.keys.local import LocalKeyStore
from shared.ledger import tables as tables_module
from shared.ledger.models import ApiKey, BatchPage, CertificateQuery, CertificateRecord, Issuance, Principal
from shared.ledger.tables import INDEX, TableLedger, _index_entities
from shared.ledger.tables_batches import ALL_BATCHES, BATCH_ROW, BATCHES, _partition
from shared.parameters import MAX_PAGE
from shared.service import RENEWAL_RETRY_WINDOW, DeviceCA
from shared.tablestore import TableDocuments, connect

from .apiclient import bearer
from .azurite import table_prefix
from .certrules import check_device, check_ledger, load
from .conftest import close_checked
from .csrs import device_key, make_csr
from .fakes.keyvault import VAULT_URL, FakeCredential, FakeKeyVault
from .ledgers import check_table_rules, everything_stored, table_rows
from .test_keyvault import QUICK
from .test_ledger import NOW, _ca, _cert
from .test_ledger_batches import _batch, _issued, _items


class FaultyTransport(HttpTransport):
    """The real transport, until `fail_from`: from that request on every request fails, as if the process
    had died there. `mode` "lost" sends the failing request and loses its answer (Storage did the
    write); "unsent" never sends it; "503" answers Storage's 503 Server Busy without sending."""

    def __init__(self) -> None:
        self.inner = RequestsTransport()
        self.count = 0
        self.fail_from: int | None = None
        self.mode = "unsent"
        self.only: str | None = None  # when set, only the requests whose URL holds it fail
        self.method: str | None = None  # when set, only the requests of that HTTP method fail

    def send(self, request, **kwargs):
        self.count += 1
        spared = (self.only and self.only not in request.url) or (self.method and request.method != self.method)
        if self.fail_from is None or self.count < self.fail_from or spared:
            return self.inner.send(request, **kwargs)
        if self.mode == "503":
            return _busy(request)
        if self.mode == "lost" and self.count == self.fail_from:
            self.inner.send(request, **kwargs)
            raise ServiceResponseError("the connection was lost before the answer (injected)")
        raise ServiceRequestError("the connection was refused (injected)")

    @contextmanager
    def failing(self, only: str | None = None, method: str | None = None) -> Iterator[None]:
        """Storage's 503 for every request from the next one on (those whose URL holds `only`, or of HTTP
        `method`, when given) while the block runs; the real transport again after it."""
        self.fail_from, self.mode, self.only, self.method = self.count + 1, "503", only, method
        try:
            yield
        finally:
            self.fail_from, self.only, self.method = None, None, None

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *args) -> None:
        self.inner.__exit__(*args)


def _busy(request) -> RequestsTransportResponse:
    response = requests.Response()
    response.status_code = 503
    response.reason = "Server Busy"
    response.headers["Content-Type"] = "application/json"
    response.headers["x-ms-error-code"] = "ServerBusy"
    response._content = b'{"odata.error":{"code":"ServerBusy","message":{"value":"The server is busy."}}}'
    return RequestsTransportResponse(request, response)


@pytest.fixture
def tables(azurite, tmp_path, clock):
    """`open_service(prefix, transport=None)`: a CA on the tables under `prefix`, its ledger talking
    through `transport`; every one is closed at the end of the test."""
    made: list[DeviceCA] = []

    def open_service(prefix: str, transport: FaultyTransport | None = None, retry_seconds: float = 10) -> DeviceCA:
        store = connect(
            azurite.connection_string, prefix, retry_seconds=retry_seconds, transport=transport, backoff_seconds=0.01
        )
        home = tmp_path / prefix
        settings = Settings(pki_home=home, ledger_tables=azurite.connection_string, ledger_table_prefix=prefix)
        ledger, dps = TableLedger(store), OfflineDps(documents=TableDocuments(store))
        service = DeviceCA(LocalKeyStore(home), ledger, dps, settings, clock=clock)
        made.append(service)
        return service

    yield open_service
    for service in made:
        service.close()


def test_a_forged_cursor_with_the_listings_own_fingerprint_is_refused_before_storage(tables):
    """The cursor's fingerprint is no secret (a hash of the query): a cursor forged with it, whose token is not
    a continuation token as Storage gives one (a lone surrogate, another shape), is 400 invalid-cursor, not
    a 500 from the SDK; a well-formed forged token only resumes the caller's own listing."""
    ledger = tables(table_prefix()).ledger
    query = CertificateQuery(requested_by="factory-a", limit=2)

    def forged(token) -> str:
        document = {"f": tables_module._fingerprint(query), "t": token, "s": 0}
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")

    for token in (
        {"PartitionKey": "\ud800", "RowKey": "c-"},
        {"PartitionKey": "req-factory-a", "RowKey": "\udc00"},
        {"PartitionKey": "req-factory-a"},
        {"PartitionKey": "req-factory-a", "RowKey": "c-", "Table": "cas"},
        {"PartitionKey": 5, "RowKey": "c-"},
        {"PartitionKey": "req-\u0007", "RowKey": "c-"},
        ["req-factory-a", "c-"],
    ):
        with pytest.raises(CaError) as refused:
            ledger.list_certificates(replace(query, cursor=forged(token)))
        assert refused.value.code == "invalid-cursor", token
    resumed = ledger.list_certificates(replace(query, cursor=forged({"PartitionKey": "req-factory-b", "RowKey": None})))
    assert resumed.items == []  # the listing's own filter still holds: another requester's rows are not read


SCENARIOS = ["new device", "renewal with a new key", "renewal with the same key"]
DEVICE = "dev-1"


class CasWriteGoesWrong(RequestsTransport):
    """The real transport, until the first write (POST) once `armed`: in mode "lost" Storage carries it out
    and its answer is lost (the SDK does not send a POST again); in mode "down" it, and every request after
    it, gets Storage's 503."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode, self.armed, self.down = mode, False, False

    def send(self, request, **kwargs):
        if self.armed and request.method == "POST":
            self.armed, self.down = False, self.mode == "down"
            if self.mode == "lost":
                super().send(request, **kwargs)
                raise ServiceResponseError("the connection was lost before the answer (injected)")
        if self.down:
            return _busy(request)
        return super().send(request, **kwargs)


@pytest.mark.parametrize("kind", ["root", "intermediate"])
def test_a_ca_whose_ledger_write_lost_its_answer_stands_with_its_key(tables, kind):
    """The CA's record reaches Storage but the answer is lost: the creation stands (the ledger holds it with
    the key just made), its key is kept, and it signs. Removing the key as for a failed creation would leave
    a CA that can never sign again, and that no new root can replace."""
    transport = CasWriteGoesWrong("lost")
    service = tables(table_prefix(), transport)
    if kind == "intermediate":
        service.create_root()
    transport.armed = True
    created = service.create_root() if kind == "root" else service.create_intermediate("factory-a")
    assert not transport.armed, "the CA's record was written through the failing transport"
    assert created.record == service.ledger.get_ca(created.record.id)
    assert service.keys.signing_key(created.record.key_name) is not None
    if kind == "root":
        service.create_intermediate("factory-a")
    issued = service.sign_csr(make_csr("dev-1"), "dev-1")
    check_device(load(issued.record.certificate_pem), load(service.intermediate("factory-a").certificate_pem), "dev-1")
    check_table_rules(service.ledger)


def test_a_ca_whose_ledger_write_failed_keeps_its_key_when_the_ledger_cannot_tell(tables, tmp_path):
    """Storage fails the CA's record and the read that would tell whether it landed: the key is kept (it
    may be the key of a CA the ledger holds), and the error says so."""
    transport = CasWriteGoesWrong("down")
    prefix = table_prefix()
    service = tables(prefix, transport, retry_seconds=0.2)
    transport.armed = True
    with pytest.raises(BackendUnavailable) as failed:
        service.create_root()
    assert "was kept: the ledger could not be read to tell whether CA 'root' was recorded" in failed.value.message
    assert [path.name for path in (tmp_path / prefix / "keys").glob("device-ca-root-*.key.pem")] != []


def _ca_tables(open_service) -> tuple[str, DeviceCA, DeviceCA]:
    """Fresh tables with a root and an intermediate: one CA for every crash of a test, each crash on a device
    of its own, so what one crash left stays in the tables the later ones run on. Returns the prefix, the
    CA that made them (it prepares each device), and one opened apart that checks and retries after each
    crash (each crash's device is new to it, as to a process started after the crash)."""
    prefix = table_prefix()
    setup = open_service(prefix)
    setup.create_root()
    setup.create_intermediate("factory-a")
    return prefix, setup, open_service(prefix)


def _crashing(open_service, prefix: str, n: int, mode: str) -> DeviceCA:
    """A CA opened afresh on `prefix` (a process of its own) whose Nth Storage call after opening fails, and
    every call after it: the process died there."""
    transport = FaultyTransport()
    service = open_service(prefix, transport)
    transport.fail_from, transport.mode = transport.count + n, mode
    return service


def _a_crash_while_opening_changes_nothing(open_service, setup: DeviceCA, mode: str) -> None:
    """The Storage calls a CA makes as it opens (creating its tables when missing) fail in turn, as the
    process dies there: each is a 503 with Retry-After and the tables hold what they held. (A crash at the
    operation's first call leaves the same state, and its retry is checked there.)"""
    prefix, ledger = setup.ledger.store.prefix, setup.ledger
    before = everything_stored(ledger)
    counting = FaultyTransport()
    open_service(prefix, counting)
    for n in range(1, counting.count + 1):
        transport = FaultyTransport()
        transport.fail_from, transport.mode = n, mode
        with pytest.raises(BackendUnavailable) as crashed:
            open_service(prefix, transport)
        assert crashed.value.status == 503 and crashed.value.retry_after > 0
    assert everything_stored(ledger) == before


def _after_crash_then_retry(service: DeviceCA, device: str, csr: bytes, renew: bool) -> CertificateRecord:
    """The rules hold on what was left (on every device of the tables), and the same request, sent again,
    gets its certificate."""
    check_table_rules(service.ledger)
    check_ledger(service.ledger)
    issued = service.sign_csr(csr, device, renew=renew)
    again = service.sign_csr(csr, device)
    assert again.record == issued.record and not again.created
    assert service.ledger.active_certificates([device]) == {device: issued.record}
    intermediate = load(service.intermediate("factory-a").certificate_pem)
    check_device(load(issued.record.certificate_pem), intermediate, device)
    check_table_rules(service.ledger)
    return issued.record


@pytest.mark.parametrize("mode", ["unsent", "lost"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_crash_at_any_storage_call_of_an_issuance_leaves_the_rules_holding(tables, scenario, mode):
    """For each N, the Nth Storage call of one issuance fails and so does everything after it (the process
    died there): the caller got a 503 or its certificate, the rules hold, and sending it again works. One
    CA's tables serve every N, each N a device and key of its own: what a crash left must not break the
    issuances after it, nor they the devices before them."""
    prefix, setup, checker = _ca_tables(tables)
    devices = (f"dev-{n}" for n in itertools.count(1))

    def prepared() -> tuple[str, bytes, bool]:
        """A new device: for a renewal, with its certificate; the CSR to send and whether it asks for renewal."""
        device, key = next(devices), device_key()
        if scenario != "new device":
            setup.sign_csr(make_csr(device, key=key), device)
        csr = make_csr(device, key=key if scenario == "renewal with the same key" else None)
        return device, csr, scenario != "new device"

    _a_crash_while_opening_changes_nothing(tables, setup, mode)
    device, csr, renew = prepared()
    counting = FaultyTransport()
    first = tables(prefix, counting)
    opened = counting.count
    finished = {device: first.sign_csr(csr, device, renew=renew).record}
    calls = counting.count - opened
    # CA lookup, device head, index rows, key binding, device transaction; a renewal with the same key within
    # the retry window is answered from the ledger: the device head and the intermediate
    assert calls >= (2 if scenario == "renewal with the same key" else 5)
    for n in range(1, calls + 2):
        device, csr, renew = prepared()
        try:
            issued = _crashing(tables, prefix, n, mode).sign_csr(csr, device, renew=renew)
        except BackendUnavailable as error:
            assert error.status == 503 and error.retry_after > 0
            assert n <= calls, "the issuance made more Storage calls than the first one"
        else:  # nothing is returned that the ledger does not hold
            assert n == calls + 1
            assert checker.certificate(issued.record.serial) == issued.record
        finished[device] = _after_crash_then_retry(checker, device, csr, renew)
    assert checker.ledger.active_certificates(list(finished)) == finished


@pytest.mark.parametrize("mode", ["unsent", "lost"])
def test_a_crash_at_any_storage_call_of_a_revocation_leaves_the_key_unusable(tables, clock, mode):
    """A device renewed with the same key holds two certificates of it; revoking the old one crashes at each
    Storage call in turn: no certificate of the key stays usable, and revoking again finishes the job. One
    CA's tables serve every N, each N a device and key of its own."""
    prefix, setup, service = _ca_tables(tables)
    devices = (f"dev-{n}" for n in itertools.count(1))

    def prepared() -> tuple[str, str, str, object]:
        device, key = next(devices), device_key()
        old = setup.sign_csr(make_csr(device, key=key), device).record.serial
        clock.advance(seconds=RENEWAL_RETRY_WINDOW.total_seconds() + 1)  # a renewal, not a retry of the first
        active = setup.sign_csr(make_csr(device, key=key), device, renew=True).record.serial
        return device, old, active, key

    _a_crash_while_opening_changes_nothing(tables, setup, mode)
    device, old, active, key = prepared()
    counting = FaultyTransport()
    first = tables(prefix, counting)
    opened = counting.count
    first.revoke(old, "keyCompromise")
    calls = counting.count - opened
    revoked = [device]
    for n in range(1, calls + 2):
        device, old, active, key = prepared()
        try:
            _, dps = _crashing(tables, prefix, n, mode).revoke(old, "keyCompromise")
        except BackendUnavailable:
            assert n <= calls, "the revocation made more Storage calls than the first one"
        else:  # the ledger's commit went through; a crash in the DPS step after it is reported, not raised
            assert n == calls + 1 or dps["mode"] == "failed", (n, dps)
        check_table_rules(service.ledger)
        still_active = service.ledger.active_certificates([device])
        assert still_active in ({}, {device: service.certificate(active)}), "only the untouched state or none"
        if still_active:  # the revocation's commit never happened: nothing of it is visible
            assert service.certificate(old).status == "superseded"
        revocation, _ = service.revoke(old, "keyCompromise")
        assert revocation.record.status == "revoked"
        assert service.certificate(active).status == "revoked"
        assert service.ledger.key_bindings([revocation.record.public_key_sha256]) == {
            revocation.record.public_key_sha256: (device, True)
        }
        with pytest.raises(CaError) as refused:
            service.sign_csr(make_csr(device, key=key), device, renew=True)
        assert refused.value.code == "key-revoked"
        check_table_rules(service.ledger)
        revoked.append(device)
    assert service.ledger.active_certificates(revoked) == {}


def test_storage_that_keeps_failing_is_a_503_with_retry_after_and_nothing_recorded(tables):
    transport = FaultyTransport()
    service = tables(table_prefix(), transport, retry_seconds=2)
    service.create_root()
    service.create_intermediate("factory-a")
    admin = service.principals.create_admin_key().secret
    client = TestClient(create_app(service), raise_server_exceptions=False)
    before = len(service.ledger.list_certificates(CertificateQuery()).items)
    for mode in ("503", "unsent"):
        transport.fail_from, transport.mode = transport.count + 1, mode
        sent_before = transport.count
        response = client.post(
            "/api/devices/dev-1/certificate",
            content=make_csr("dev-1"),
            headers={"Content-Type": "application/pkcs10", **bearer(admin)},
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "ledger-unavailable"
        assert int(response.headers["retry-after"]) > 0
        assert transport.count - sent_before > 1, "the SDK's policy retried before giving up"
        transport.fail_from = None
    assert len(service.ledger.list_certificates(CertificateQuery()).items) == before
    response = client.post(
        "/api/devices/dev-1/certificate",
        content=make_csr("dev-1"),
        headers={"Content-Type": "application/pkcs10", **bearer(admin)},
    )
    assert response.status_code == 201


def test_storage_failing_in_a_step_names_the_step_that_failed(tables, clock):
    """What the operator reads when Storage keeps failing (503 ledger-unavailable): which step could not
    be done, for the listings, the expiry scan's writes (an expired certificate's transaction alone), the
    batches, revocations, CAs, principals and API keys."""
    transport = FaultyTransport()
    service = tables(table_prefix(), transport, retry_seconds=1)
    service.create_root()
    service.create_intermediate("factory-a")
    serial = service.sign_csr(make_csr(DEVICE), DEVICE).record.serial
    revoked_before = service.sign_csr(make_csr("dev-r"), "dev-r").record.serial
    service.revoke(revoked_before)
    ledger = service.ledger
    later = clock.now + timedelta(days=3 * 365)  # past the device certificate's notAfter
    (watch,) = ledger.expiry_watch(later)
    claimed = ledger.claim_expiry_stage(watch, "7d", clock.now)
    ca_watch = ledger.ca_expiry_watch()[0]
    batch = _batch("b1", total=2)
    ledger.add_batch(batch, _items(batch))
    results = [_issued(item, f"0{item.index}") for item in _items(batch)]
    ledger.add_api_key(ApiKey("k-1", "factory-a", "0" * 64, clock.now))
    ca_id = ledger.list_cas()[-1].id
    steps = [
        ("read the ledger", ledger.ping, None),
        ("list CAs", ledger.ca_expiry_watch, None),
        ("record an expiry stage", lambda: ledger.claim_expiry_stage(ca_watch, "90d", clock.now), None),
        ("list principals", ledger.list_principals, None),
        ("list API keys", ledger.list_api_keys, None),
        ("update a principal", lambda: ledger.set_principal_intermediates("factory-a", ["int-1"]), None),
        ("find unfinished batch chunks", ledger.unfinished_chunks, None),
        ("list batches", lambda: ledger.list_batches(None, 10, None), None),
        ("read the expiry index", lambda: ledger.expiry_watch(later), None),
        ("release an expiry stage", lambda: ledger.release_expiry_stage(claimed, None), None),
        ("retire an expiry index row", lambda: ledger.retire_expiry_watch(claimed), None),
        ("mark a certificate expired", lambda: ledger.mark_expired(claimed, later), "$batch"),
        ("store a batch", lambda: ledger.add_batch(_batch("b2", total=1), _items(_batch("b2", total=1))), "$batch"),
        ("read a batch", lambda: ledger.get_batch("b1"), "filter"),  # its chunks, after its row
        ("read a batch chunk", lambda: ledger.chunk_items("b1", 0), "filter"),  # its items, after its row
        ("read a batch's items", lambda: ledger.batch_items("b1", 0, 10), None),
        ("update a batch chunk", lambda: ledger.start_chunk("b1", 0, clock.now), "PATCH"),  # after reading it
        ("record a chunk's results", lambda: ledger.finish_chunk_items("b1", 0, results, clock.now), "$batch"),
        ("revoke a certificate", lambda: ledger.revoke_certificate(serial, "keyCompromise", later), "$batch"),
        # revoked before: its answer names the certificates revoked with it, which a query finds
        ("read a revocation", lambda: ledger.revoke_certificate(revoked_before, "keyCompromise", later), "filter"),
        ("record a CA", lambda: ledger.add_ca(_ca("int-9")), None),
        ("update a CA", lambda: ledger.set_ca_status(ca_id, "disabled"), None),
        ("record a principal", lambda: ledger.add_principal(Principal("factory-z", "factory", (), clock.now)), None),
        ("record an API key", lambda: ledger.add_api_key(ApiKey("k-2", "factory-a", "0" * 64, clock.now)), None),
        ("revoke an API key", lambda: ledger.revoke_api_key("k-1", later), "PUT"),  # after reading it
    ]
    for step, call, only in steps:
        failing = transport.failing(method=only) if only in ("PATCH", "PUT") else transport.failing(only=only)
        with failing, pytest.raises(BackendUnavailable) as failed:
            call()
        assert failed.value.code == "ledger-unavailable"
        assert f"could not {step} (503 ServerBusy)" in failed.value.message, step


def test_a_refused_issuances_index_rows_that_storage_will_not_delete_are_left_and_it_is_refused(tables):
    """A refused issuance's index rows are deleted on a best-effort basis: Storage failing every delete leaves
    them (each read skips an index row that points at nothing), and the answer is still the refusal, not an
    error; the certificate the device holds stays the one found by its serial and by its requester."""
    transport = FaultyTransport()
    ledger = tables(table_prefix(), transport, retry_seconds=1).ledger
    first = _cert("01", "dev-1", "k1")
    assert ledger.record_issued([Issuance(first)]) == [first]
    with transport.failing(method="DELETE"):
        (refused,) = ledger.record_issued([Issuance(_cert("02", "dev-1", "k2"))])  # not a renewal
    assert isinstance(refused, Conflict) and refused.code == "device-has-certificate", refused
    rows = {(row["PartitionKey"], row["RowKey"]) for row in table_rows(ledger, INDEX)}
    left = {(row["PartitionKey"], row["RowKey"]) for _, row in _index_entities(_cert("02", "dev-1", "k2"))}
    assert left <= rows, "the deletes were refused, so the rows are left"
    assert ledger.get_certificate("02") is None and ledger.get_certificate("01") == first
    assert [c.serial for c in ledger.list_certificates(CertificateQuery(requested_by="test")).items] == ["01"]


def test_storage_failing_while_recording_an_issuance_fails_only_it_and_names_the_step(tables):
    """An issuance's index rows go in one transaction per index partition, and one row at a time after a
    transaction found a row taken (the same certificate sent again, or a serial collision): Storage failing
    in either is that issuance's 503, naming the step, and the others in the call are recorded."""
    transport = FaultyTransport()
    ledger = tables(table_prefix(), transport, retry_seconds=1).ledger
    first = _cert("01", "dev-1", "k1")
    assert ledger.record_issued([Issuance(first)]) == [first]

    with transport.failing(only="$batch"):
        (failed,) = ledger.record_issued([Issuance(_cert("02", "dev-2", "k2"))])
    assert isinstance(failed, BackendUnavailable) and failed.code == "ledger-unavailable"
    assert "could not write index rows (503 ServerBusy)" in failed.message

    # "01" again for another device: its serial row is taken, so the rows are written one at a time
    with transport.failing(only="index", method="POST"):
        taken, free = Issuance(_cert("01", "dev-3", "k3")), Issuance(_cert("03", "dev-4", "k4"))
        failed, other = ledger.record_issued([taken, free])
    assert isinstance(failed, BackendUnavailable) and failed.code == "ledger-unavailable"
    assert "could not write an index row (503 ServerBusy)" in failed.message
    assert other == ledger.get_certificate("03") and ledger.get_certificate("01") == first

    # then each issuance's commit: its key binding first
    with transport.failing(only="keys", method="POST"):
        (failed,) = ledger.record_issued([Issuance(_cert("05", "dev-5", "k5"))])
    assert isinstance(failed, BackendUnavailable) and failed.code == "ledger-unavailable"
    assert "could not commit a certificate (503 ServerBusy)" in failed.message


def test_index_rows_of_a_certificate_never_committed_find_nothing(tables):
    """Index rows are written before the device's commit: when the commit fails they stay, pointing at
    nothing, and every read through them (by serial, by requester) finds no certificate there."""
    transport = FaultyTransport()
    ledger = tables(table_prefix(), transport, retry_seconds=1).ledger
    first, refused = _cert("01", "dev-1", "k1"), _cert("02", "dev-2", "k2")
    before = transport.count
    assert ledger.record_issued([Issuance(first)]) == [first]
    calls = transport.count - before  # a new device's last Storage call is its commit
    transport.fail_from = transport.count + calls
    (failed,) = ledger.record_issued([Issuance(refused)])
    transport.fail_from = None
    assert isinstance(failed, BackendUnavailable)
    assert any(row["RowKey"] == "02" for row in table_rows(ledger, INDEX))
    assert ledger.get_certificate("02") is None and ledger.get_certificate("01") == first
    assert ledger.list_certificates(CertificateQuery(requested_by="test")).items == [first]


class RequestHook(RequestsTransport):
    """The real transport; `before`, when set, runs once just before the first request that `matches`
    accepts is sent (then it is cleared, so a test can check that it ran). `sent` lists every request's
    method and URL (unquoted), in order."""

    def __init__(self, matches: Callable[[object], bool], **kwargs) -> None:
        super().__init__(**kwargs)
        self.matches = matches
        self.before: Callable[[], None] | None = None
        self.sent: list[tuple[str, str]] = []

    def send(self, request, **kwargs):
        self.sent.append((request.method, unquote(request.url)))
        hook = self.before
        if hook is not None and self.matches(request):
            self.before = None
            hook()
        return super().send(request, **kwargs)


def head_read(request) -> bool:
    """A device head is read."""
    return request.method == "GET" and "head" in unquote(request.url)


def transaction(request) -> bool:
    """A transaction (entity group batch) is sent."""
    return request.method == "POST" and "$batch" in request.url


def write_in_place(request) -> bool:
    """An entity is written in place: PUT or PATCH, a replace, merge or upsert."""
    return request.method in ("PUT", "PATCH")


def test_two_admins_revoking_one_api_key_at_once_keep_the_first_revocation(azurite):
    """The key is read, then written on condition that it is unchanged: a revocation that lands between is
    the one kept (its time), and the slower admin is answered with it."""
    prefix, transport = table_prefix(), RequestHook(write_in_place)
    slower = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=transport))
    faster = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10))
    try:
        slower.add_principal(Principal("factory-a", "factory", ("int-1",), NOW))
        slower.add_api_key(ApiKey("0123456789abcdef", "factory-a", "ab" * 32, NOW))
        first = NOW + timedelta(minutes=1)
        transport.before = lambda: faster.revoke_api_key("0123456789abcdef", first)
        assert slower.revoke_api_key("0123456789abcdef", NOW + timedelta(minutes=2)).revoked_at == first
        assert transport.before is None  # the other revocation did land in between
        assert [k.revoked_at for k in faster.list_api_keys()] == [first]
    finally:
        slower.close()
        faster.close()


def test_a_key_revoked_while_its_binding_is_confirmed_stays_revoked(azurite):
    """A renewal with the same key confirms the key's binding by rewriting it on the etag it read; another
    instance revokes the key in between. The rewrite fails on the etag and the renewal is refused: the
    binding keeps the revocation (an unconditional rewrite would have cleared it)."""
    prefix, transport = table_prefix(), RequestHook(write_in_place)
    renewing = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=transport))
    revoking = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10))
    try:
        renewing.add_ca(_ca())
        renewing.record_issued([Issuance(_cert("A1", DEVICE, "ka"))])
        transport.before = lambda: revoking.revoke_certificate("A1", "keyCompromise", NOW + timedelta(days=1))
        renewal = _cert("A2", DEVICE, "ka", at=NOW + timedelta(days=1))
        (refused,) = renewing.record_issued([Issuance(renewal, supersede=True)])
        assert transport.before is None, "the revocation ran before the binding's rewrite"
        assert isinstance(refused, CaError) and refused.code == "key-revoked", refused
        assert revoking.key_bindings(["ka"]) == {"ka": (DEVICE, True)}
        check_table_rules(revoking)
    finally:
        renewing.close()
        revoking.close()


def test_row_keys_follow_the_documented_layout_whatever_the_hosts_time_zone(azurite, monkeypatch):
    """The index and certificate rows are keyed as the module's table says, in UTC whatever the host's
    zone (Azure Functions honours WEBSITE_TIME_ZONE): `ser-<last hex digit, upper case>` / serial,
    `req-<requester>` / `<created>-<serial>`, `exp-<day>` / `<notAfter>-<serial>`, `c-<created>-<serial>`."""
    ledger = TableLedger(connect(azurite.connection_string, table_prefix(), retry_seconds=10))
    try:
        ledger.add_ca(_ca())
        monkeypatch.setenv("TZ", "EAST-14")  # UTC+14, in POSIX form
        time.tzset()
        ledger.record_issued([Issuance(_cert("0ab1c", DEVICE, "ka", at=NOW + timedelta(hours=12)))])  # +14: next day
    finally:
        monkeypatch.undo()
        time.tzset()
    try:
        index = sorted((row["PartitionKey"], row["RowKey"]) for row in table_rows(ledger, INDEX))
        assert index == [
            ("exp-2027-01-01", "20270101120000-0ab1c"),
            ("req-test", "20260101120000-0ab1c"),
            ("ser-C", "0ab1c"),
        ]
        rows = [row["RowKey"] for row in table_rows(ledger, tables_module.DEVICES)]
        assert sorted(rows) == ["c-20260101120000-0ab1c", "head"]
    finally:
        ledger.close()


def test_a_key_found_bound_elsewhere_refuses_by_the_devices_owner_first_as_the_service_does(azurite):
    """Factory B certifies a device new to it, with a key bound to another device; between its read of the
    device (none yet) and its claim of the key, factory A takes the device. The claim, finding the key
    bound elsewhere, reads the device again and refuses by its owner first (403, as the
    service's own checks order them), not by the key."""
    prefix, transport = (
        table_prefix(),
        RequestHook(lambda request: request.method == "POST" and request.url.endswith("keys")),
    )
    factory_b = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=transport))
    factory_a = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10))
    try:
        factory_b.add_ca(_ca())
        factory_b.record_issued([Issuance(_cert("B0", "dev-b", "kb"), owner="factory-b")])
        transport.before = lambda: factory_a.record_issued([Issuance(_cert("A1", DEVICE, "ka"), owner="factory-a")])
        (refused,) = factory_b.record_issued([Issuance(_cert("B1", DEVICE, "kb"), owner="factory-b")])
        assert transport.before is None, "factory A took the device before factory B's claim of the key"
        assert isinstance(refused, CaError) and refused.code == "device-owned-by-another-factory", refused
        check_table_rules(factory_b)
    finally:
        factory_b.close()
        factory_a.close()


def test_a_refused_late_retry_keeps_the_index_rows_of_its_certificate_even_when_it_cannot_check(azurite):
    """The same certificate recorded again after its device was renewed is refused; the index rows found or
    rewritten for it belong to the certificate already committed, so they stay. When Storage fails the read
    that tells, they stay too: an index row pointing at nothing is harmless, a certificate that cannot be
    found by its serial (to revoke it) is not."""
    transport = FaultyTransport()
    store = connect(
        azurite.connection_string, table_prefix(), retry_seconds=0.2, transport=transport, backoff_seconds=0.01
    )
    ledger = TableLedger(store)
    try:
        ledger.add_ca(_ca())
        first = _cert("01", DEVICE, "k1")
        ledger.record_issued([Issuance(first)])
        ledger.record_issued([Issuance(_cert("02", DEVICE, "k2", at=NOW + timedelta(days=100)), supersede=True)])
        with transport.failing(only=f"{DEVICE}',RowKey='c-20260101000000-01", method="GET"):
            (refused,) = ledger.record_issued([Issuance(first, supersede=True)])
        assert isinstance(refused, CaError) and refused.code == "ledger-conflict", refused
        assert ledger.get_certificate("01") == replace(
            first, status="superseded", status_changed_at=NOW + timedelta(days=100), status_reason="renewed as 02"
        )
        assert [c.serial for c in ledger.list_certificates(CertificateQuery(requested_by="test")).items] == ["01", "02"]
        check_table_rules(ledger)
    finally:
        ledger.close()


def test_an_issuance_that_loses_the_race_for_a_new_device_reads_its_head_once_and_is_refused(azurite):
    """Two instances certify one new device with two keys at once; the other's transaction lands first, so
    this one's fails on the device's head. One read of the head then decides (a read made after the
    failed write is fresh: reading again would only cost a Storage call): the device has a certificate."""

    def claim(request) -> bool:  # the key's binding is inserted: after the device's head was read
        return request.method == "POST" and request.url.endswith("keys")

    prefix, transport = table_prefix(), RequestHook(claim)
    slower = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=transport))
    faster = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10))
    try:
        slower.add_ca(_ca())
        first = _cert("A1", DEVICE, "ka")
        transport.before = lambda: faster.record_issued([Issuance(first)])
        (refused,) = slower.record_issued([Issuance(_cert("B1", DEVICE, "kb"))])
        sent = list(transport.sent)
        assert transport.before is None, "the other issuance ran before this one's transaction"
        assert isinstance(refused, CaError) and refused.code == "device-has-certificate", refused
        device_transaction = max(i for i, (method, url) in enumerate(sent) if "$batch" in url)
        after = sent[device_transaction + 1 :]
        assert [method for method, url in after if "head" in url] == ["GET"]
        assert slower.active_certificates([DEVICE]) == {DEVICE: first}
        check_table_rules(slower)
    finally:
        slower.close()
        faster.close()


@pytest.mark.parametrize("change", ["old revocation", "renewal", "revocation", "expiry"])
def test_a_device_changed_between_the_expiry_marks_head_read_and_its_transaction(azurite, change):
    """The scan read the certificate and the head naming it; before its transaction, another instance
    changes the device. The transaction fails on the head's etag and the scan reads again: a revocation
    of an older certificate (another key) leaves the certificate active, so it is marked expired with
    the revoked key kept in the head; a renewal or a revocation of it keeps that change; another scan's
    mark is the one mark."""
    prefix, transport = table_prefix(), RequestHook(transaction)
    scan = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=transport))
    other = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10))
    try:
        scan.add_ca(_ca())
        old = _cert("A0", DEVICE, "ka0", days=400, at=NOW - timedelta(days=30))
        scan.record_issued([Issuance(old)])
        scan.record_issued([Issuance(_cert("A1", DEVICE, "ka", days=20), supersede=True)])
        (watch,) = scan.expiry_watch(NOW + timedelta(days=30))
        later = NOW + timedelta(days=21)

        def change_it() -> None:
            if change == "old revocation":
                other.revoke_certificate("A0", "keyCompromise", later)
            elif change == "renewal":
                renewal = _cert("A2", DEVICE, "ka2", days=400, at=later)
                assert other.record_issued([Issuance(renewal, supersede=True)]) == [renewal]
            elif change == "revocation":
                other.revoke_certificate("A1", "keyCompromise", later)
            else:
                assert other.mark_expired(watch, later) is not None

        transport.before = change_it
        marked = scan.mark_expired(watch, later)
        assert transport.before is None, "the change ran before the scan's transaction"
        first = other.get_certificate("A1")
        expected = {
            "old revocation": ("expired", "expired"),
            "renewal": ("superseded", "renewed as A2"),
            "revocation": ("revoked", "keyCompromise"),
            "expiry": ("expired", "expired"),
        }[change]
        assert (first.status, first.status_reason) == expected
        assert (marked is not None) == (change == "old revocation")
        if change == "old revocation":
            assert marked == first
            assert other.get_certificate("A0").status == "revoked"
            assert other.precheck([DEVICE], ["ka0"]).bindings == {"ka0": (DEVICE, True)}
        assert scan.active_certificates([DEVICE]) == (
            {DEVICE: other.get_certificate("A2")} if change == "renewal" else {}
        )
        assert scan.expiry_watch(NOW + timedelta(days=30)) == []
        check_table_rules(scan)
    finally:
        scan.close()
        other.close()


@pytest.mark.parametrize("change", ["renewal", "old revocation"])
def test_a_device_changed_between_a_revocations_head_read_and_its_transaction(azurite, change):
    """The revocation read the certificate and the device's head; before its transaction, another instance
    renews the device (another key) or revokes its older certificate. The transaction fails on the head's
    etag (412), and the revocation reads again and commits: the certificate is revoked in the ledger, as
    its answer says, and the other change stays."""
    prefix, transport = table_prefix(), RequestHook(transaction)
    revoking = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=transport))
    other = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10))
    try:
        revoking.add_ca(_ca())
        revoking.record_issued([Issuance(_cert("A0", DEVICE, "ka0", at=NOW - timedelta(days=30)))])
        revoking.record_issued([Issuance(_cert("A1", DEVICE, "ka"), supersede=True)])
        later = NOW + timedelta(days=1)

        def change_it() -> None:
            if change == "renewal":
                renewal = _cert("A2", DEVICE, "ka2", at=later)
                assert other.record_issued([Issuance(renewal, supersede=True)]) == [renewal]
            else:
                other.revoke_certificate("A0", "keyCompromise", later)

        transport.before = change_it
        revocation = revoking.revoke_certificate("A1", "keyCompromise", later)
        assert transport.before is None, "the change ran before the revocation's transaction"
        assert revocation.record == other.get_certificate("A1")
        assert (revocation.record.status, revocation.record.status_reason) == ("revoked", "keyCompromise")
        assert other.get_certificate("A0").status == ("superseded" if change == "renewal" else "revoked")
        assert other.active_certificates([DEVICE]) == (
            {DEVICE: other.get_certificate("A2")} if change == "renewal" else {}
        )
        assert other.precheck([DEVICE], ["ka"]).bindings == {"ka": (DEVICE, True)}
        check_table_rules(other)
    finally:
        revoking.close()
        other.close()


@pytest.mark.parametrize("change", ["renewal", "revocation"])
def test_a_certificate_changed_while_it_is_marked_expired_keeps_that_change(azurite, change):
    """The expiry scan read the certificate active; before it reads the device's head, another instance
    renews the device or revokes the certificate. The scan then leaves both alone: the certificate stays
    superseded or revoked (when and why), and a renewal stays the device's active certificate."""
    prefix, transport = table_prefix(), RequestHook(head_read)
    scan = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=transport))
    other = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10))
    try:
        scan.add_ca(_ca())
        scan.record_issued([Issuance(_cert("A1", DEVICE, "ka", days=20))])
        (watch,) = scan.expiry_watch(NOW + timedelta(days=30))
        later = NOW + timedelta(days=21)
        renewal = _cert("A2", DEVICE, "ka2", days=400, at=later)

        def change_it() -> None:
            if change == "renewal":
                assert other.record_issued([Issuance(renewal, supersede=True)]) == [renewal]
            else:
                other.revoke_certificate("A1", "keyCompromise", later)

        transport.before = change_it
        assert scan.mark_expired(watch, later) is None
        assert transport.before is None, "the change ran between the two reads"
        first = other.get_certificate("A1")
        if change == "renewal":
            assert (first.status, first.status_reason) == ("superseded", "renewed as A2")
            assert scan.active_certificates([DEVICE]) == {DEVICE: renewal}
        else:
            assert (first.status, first.status_reason) == ("revoked", "keyCompromise")
            assert scan.active_certificates([DEVICE]) == {}
        assert first.status_changed_at == later
        before = scan.expiry_rows_read
        assert scan.expiry_watch(NOW + timedelta(days=30)) == []
        assert scan.expiry_rows_read == before, "the scan retired the certificate's expiry row"
        check_table_rules(scan)
    finally:
        scan.close()
        other.close()


def test_ping_answers_before_the_root_is_made_and_after(tables):
    """The health check's read of the ledger: the root's marker, which a new deployment does not have yet."""
    service = tables(table_prefix())
    assert service.ledger.ping() is None
    service.create_root()
    assert service.ledger.ping() is None


def test_a_page_of_the_largest_size_still_says_more_batches_follow(azurite):
    """Storage answers at most 1,000 entities a request, the largest page the API allows (MAX_PAGE): a page
    of 1,000 batches must ask for 1,001 rows to know whether another page follows. Listing rows are written
    directly (11 transactions): rows whose batch was never stored, as a crash leaves, listed as nothing."""
    assert MAX_PAGE == 1000
    ledger = TableLedger(connect(azurite.connection_string, table_prefix(), retry_seconds=10))
    try:
        keys = [f"20260101000000-{n:020d}-b{n}" for n in range(MAX_PAGE + 1)]
        rows = [{"PartitionKey": ALL_BATCHES, "RowKey": key, "batch_id": key.rsplit("-", 1)[1]} for key in keys]
        for start in range(0, len(rows), 100):
            ledger.store.table(BATCHES).submit_transaction([("create", row) for row in rows[start : start + 100]])
        page = ledger.list_batches(None, MAX_PAGE, None)
        assert page.items == [] and page.next_cursor == keys[MAX_PAGE - 1]
        assert ledger.list_batches(None, MAX_PAGE, page.next_cursor) == BatchPage([], None)
    finally:
        ledger.close()


def test_a_batch_whose_listing_rows_are_written_but_not_its_batch_row_is_not_listed(azurite):
    """A batch's listing rows are written just before its batch row: a listing read between the two (or after
    a store that failed there) finds rows without their batch. They are passed over, and the listing goes on
    past them: such a batch was not stored when the listing began, and no page may show what does not exist."""
    ledger = TableLedger(connect(azurite.connection_string, table_prefix(), retry_seconds=10))
    try:
        for batch_id in ["b1", "late", "b2"]:
            batch = _batch(batch_id, total=1)
            ledger.add_batch(batch, _items(batch))
        ledger.store.table(BATCHES).delete_entity(_partition("late"), BATCH_ROW)
        first = ledger.list_batches(None, 1, None)
        rest = ledger.list_batches(None, 10, first.next_cursor)
        assert [b.record.id for b in first.items + rest.items] == ["b1", "b2"] and rest.next_cursor is None
        assert [b.record.id for b in ledger.list_batches("line-1", 10, None).items] == ["b1", "b2"]
    finally:
        ledger.close()


def test_listings_through_the_index_pass_over_rows_whose_certificate_was_never_committed(azurite):
    """Index rows are written before the device's transaction: a crash between them leaves rows that point
    at no certificate, which the listings by requester and of active certificates ending soon skip."""
    ledger = TableLedger(connect(azurite.connection_string, table_prefix(), retry_seconds=10))
    try:
        ledger.add_ca(_ca())
        ledger.record_issued([Issuance(_cert("A1", "dev-a", "ka", days=20))])
        for _, row in _index_entities(_cert("B1", "dev-b", "kb", days=20)):  # B1's commit never came
            ledger.store.table(INDEX).upsert_entity(row)
        by_requester = ledger.list_certificates(CertificateQuery(requested_by="test"))
        assert [c.serial for c in by_requester.items] == ["A1"]
        ending = CertificateQuery(status="active", expiring_before=NOW + timedelta(days=30))
        assert [c.serial for c in ledger.list_certificates(ending).items] == ["A1"]
        check_table_rules(ledger)
    finally:
        ledger.close()


def test_refused_issuances_leave_no_index_rows(azurite):
    """An issuance writes its index rows before its device's transaction; when the ledger refuses it (another
    key for a device with a certificate, a key bound elsewhere, a device another factory owns, a serial
    taken) it deletes them again. Only a crash leaves rows that point at nothing, which every listing by
    requester and every expiry scan would read forever."""
    ledger = TableLedger(connect(azurite.connection_string, table_prefix(), retry_seconds=10))
    try:
        ledger.add_ca(_ca())
        kept = _cert("A1", "dev-a", "ka", by="factory-a")
        assert ledger.record_issued([Issuance(kept, owner="factory-a")]) == [kept]
        later = NOW + timedelta(days=1)
        refused = ledger.record_issued(
            [
                Issuance(_cert("B1", "dev-a", "kb")),
                Issuance(_cert("C1", "dev-c", "ka")),
                Issuance(_cert("D1", "dev-a", "kd", by="factory-b"), supersede=True, owner="factory-b"),
                Issuance(_cert("A1", "dev-e", "ke", at=later)),
            ]
        )
        assert [r.code for r in refused] == [
            "device-has-certificate",
            "key-in-use",
            "device-owned-by-another-factory",
            "ledger-conflict",
        ]
        rows = {(row["PartitionKey"], row["RowKey"]) for row in table_rows(ledger, INDEX)}
        assert rows == {(row["PartitionKey"], row["RowKey"]) for _, row in _index_entities(kept)}
        check_table_rules(ledger)
    finally:
        ledger.close()


class WrittenThenBusy(RequestsTransport):
    """The real transport; the first transaction whose body holds `marker` is sent, and Storage writes it, but
    its answer is replaced by a 503 Server Busy (a front end that timed out after the write), which the SDK's
    policy retries."""

    def __init__(self, marker: bytes) -> None:
        super().__init__()
        self.marker: bytes | None = marker

    def send(self, request, **kwargs):
        answer = super().send(request, **kwargs)
        body = request.body if isinstance(request.body, bytes) else b""
        if self.marker is not None and "$batch" in request.url and self.marker in body:
            self.marker = None
            return _busy(request)
        return answer


def test_an_index_transaction_retried_after_it_was_written_finds_its_own_serial_row(azurite):
    """The serial index row's transaction went through but its answer was a 503, so the SDK sends it again and
    Storage refuses it (409: the rows exist). The rows, written one at a time, find the serial row the
    first attempt wrote for this very certificate: it is its own, and the certificate is committed."""
    transport = WrittenThenBusy(b'"ser-')
    ledger = TableLedger(
        connect(azurite.connection_string, table_prefix(), retry_seconds=10, transport=transport, backoff_seconds=0.01)
    )
    try:
        ledger.add_ca(_ca())
        certificate = _cert("A1", DEVICE, "ka")
        assert ledger.record_issued([Issuance(certificate)]) == [certificate]
        assert transport.marker is None, "the serial row's transaction was answered 503"
        assert ledger.get_certificate("A1") == certificate
        check_table_rules(ledger)
    finally:
        ledger.close()


class BusyOnce(RequestsTransport):
    """The real transport; once `busy` is set, the next request is answered 503 (Storage busy), as a slow
    moment would."""

    busy = False

    def send(self, request, **kwargs):
        if self.busy:
            self.busy = False
            return _busy(request)
        return super().send(request, **kwargs)


def test_the_transaction_counter_counts_every_attempt_and_each_request_once(azurite):
    transport = BusyOnce()
    ledger = TableLedger(
        connect(azurite.connection_string, table_prefix(), retry_seconds=10, transport=transport, backoff_seconds=0.01)
    )
    try:
        counter = ledger.store.counter
        start = (counter.count, counter.retries, counter.requests)
        transport.busy = True
        assert ledger.get_ca("none") is None  # answered 503, then sent again
        assert (counter.count, counter.retries, counter.requests) == (start[0] + 2, start[1] + 1, start[2] + 1)
    finally:
        ledger.close()


def test_an_issuance_costs_three_transactions_and_a_retry_one(tables):
    """Counted by the pipeline policy, at the ledger: a new certificate is its head read, its key binding
    and its device transaction, plus three index rows shared by a commit; the same CSR again, one read. The
    requests the ledger made, each once: a retry of a slow answer (a busy machine) is no request more."""
    service = tables(table_prefix())
    service.create_root()
    service.create_intermediate("factory-a")
    ledger, counter = service.ledger, service.ledger.store.counter
    requests_ = [(f"dev-{n}", make_csr(f"dev-{n}")) for n in range(250)]
    start = counter.requests
    results = service.sign_csrs([_request(csr, device) for device, csr in requests_])
    assert all(result.created for result in results)
    new = counter.requests - start
    start = counter.requests
    retried = service.sign_csrs([_request(csr, device) for device, csr in requests_])
    assert [r.record for r in retried] == [r.record for r in results] and not any(r.created for r in retried)
    again = counter.requests - start
    # per certificate: 1 head read + 1 key binding + 1 device transaction, index rows in shared transactions
    # (3 partitions of 100 at most: 16 serial partitions, one requester, one expiry day), 1 CA lookup a run;
    # a run that only answers from the ledger reads no CA (the intermediate's certificate is cached)
    assert 3 * 250 < new <= 3 * 250 + 3 * 16 + 1
    assert again == 250
    start = counter.requests
    assert not service.sign_csr(requests_[7][1], requests_[7][0]).created
    assert counter.requests - start == 1
    single = counter.requests
    ledger.record_issued([Issuance(replace(results[0].record, serial="AB01", device_id="dev-x"))])
    assert counter.requests - single >= 5  # alone, its three index rows cost three transactions


def test_a_renewal_on_the_instance_that_wrote_the_devices_head_needs_no_read_of_it(azurite):
    """The head a commit wrote is remembered with the etag Storage answered for it: the device's next
    renewal on this instance is its three index rows, its key binding and one device transaction, with no
    read of the head and no transaction refused for a stale etag."""
    prefix, transport = table_prefix(), RequestHook(lambda request: False)
    ledger = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=transport))
    try:
        ledger.add_ca(_ca())
        ledger.record_issued([Issuance(_cert("A1", DEVICE, "ka"))])
        start = len(transport.sent)
        renewal = _cert("A2", DEVICE, "kb", at=NOW + timedelta(days=100))
        assert ledger.record_issued([Issuance(renewal, supersede=True)]) == [renewal]
        sent = transport.sent[start:]
        assert [method for method, url in sent if "head" in url] == []
        assert [url.rsplit("/", 1)[1] for method, url in sent if method == "POST"] == ["$batch"] * 3 + [
            f"{prefix}keys",
            "$batch",
        ]
        check_table_rules(ledger)
    finally:
        ledger.close()


def _request(csr: bytes, device: str):
    from shared.service import SignRequest

    return SignRequest(csr, device)


def test_with_key_vault_and_tables_nothing_is_kept_on_local_disk(azurite, tmp_path):
    """The API, run with PKI_HOME an empty read-only folder: every route used, nothing read or written there."""
    home = tmp_path / "read-only-home"
    home.mkdir()
    home.chmod(0o555)
    settings = Settings.from_values(
        {
            "PKI_HOME": str(home),
            "KEY_VAULT_URL": VAULT_URL,
            "LEDGER_TABLES": azurite.connection_string,
            "LEDGER_TABLE_PREFIX": table_prefix(),
        }
    )
    vault = FakeKeyVault()
    keys = KeyVaultKeyStore(VAULT_URL, FakeCredential(), QUICK, session=vault.session())
    ledger, dps = ledger_and_dps(settings)
    service = DeviceCA(keys=keys, ledger=ledger, dps=dps, settings=settings)
    touched: list[tuple[str, tuple]] = []
    _watch_paths_under(home, touched)
    try:
        client = TestClient(create_app(service), raise_server_exceptions=False)
        service.create_root()  # the first admin key comes from the CLI; the CA can be made over HTTP after
        admin = service.principals.create_admin_key().secret
        assert client.get("/api/health", headers=bearer(admin)).json()["backends"] == {
            "keys": "keyvault",
            "ledger": "tables",
            "dps": "offline",
        }
        made = client.post("/api/ca/intermediates", json={"id": "line-1"}, headers=bearer(admin))
        assert made.status_code == 201, made.text
        factory = client.post(
            "/api/factories", json={"name": "factory-one", "intermediates": ["line-1"]}, headers=bearer(admin)
        ).json()
        signed = client.post(
            "/api/devices/dev-1/certificate",
            content=make_csr("dev-1"),
            headers={"Content-Type": "application/pkcs10", **bearer(factory["apiKey"])},
        )
        assert signed.status_code == 201, signed.text
        serial = signed.json()["serialNumber"]
        listed = client.get("/api/certificates", headers=bearer(factory["apiKey"])).json()
        assert [c["serialNumber"] for c in listed["items"]] == [serial]
        revoked = client.post(f"/api/certificates/{serial}/revoke", json={}, headers=bearer(admin))
        assert revoked.status_code == 200
        proof = client.post(
            "/api/ca/root/proof-of-possession", json={"verificationCode": "0A1B"}, headers=bearer(admin)
        )
        assert proof.status_code == 200
    finally:
        _watch_paths_under(None, touched)
        home.chmod(0o755)
        close_checked([service])
    assert touched == [], "the service used PKI_HOME"
    assert list(home.iterdir()) == []


_WATCH: dict[str, object] = {"root": None, "seen": None, "installed": False}


def _watch_paths_under(root: Path | None, seen: list) -> None:
    """Record every audited file-system event (open, mkdir, rename, remove, listdir ...) on a path under
    `root` (None stops watching). An audit hook sees what root's permissions would let through."""
    _WATCH["root"], _WATCH["seen"] = (str(root), seen) if root else (None, None)
    if not _WATCH["installed"]:
        _WATCH["installed"] = True

        def hook(event: str, args: tuple) -> None:
            root_text = _WATCH["root"]
            if root_text is None or not (event == "open" or event.startswith(("os.", "shutil.", "pathlib."))):
                return
            for value in args:
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                if isinstance(text, str | Path) and str(text).startswith(root_text):
                    _WATCH["seen"].append((event, args))  # type: ignore[union-attr]

        sys.addaudithook(hook)


def test_connection_settings(azurite):
    """An https endpoint uses a token credential (a managed identity in Azure); a bad prefix is refused."""
    from shared.errors import Misconfigured

    class Token:
        def get_token(self, *scopes, **kwargs):
            raise AssertionError("no request is made while connecting")

    store = connect("https://account.table.core.windows.net/", "deviceca", credential=Token())
    assert store.describe() == {"endpoint": "https://account.table.core.windows.net", "tablePrefix": "deviceca"}
    store.close()
    with pytest.raises(Misconfigured):
        connect(azurite.connection_string, "no-dashes")
    with pytest.raises(CaError):
        connect("AccountName=x", "deviceca")


def test_backup_is_refused_for_a_ledger_in_table_storage(tables, tmp_path):
    service = tables(table_prefix())
    with pytest.raises(CaError) as refused:
        service.backup(tmp_path / "backup")
    assert refused.value.code == "backup-not-local" and "Azure" in refused.value.message
    assert not (tmp_path / "backup").exists()


def test_a_lost_answer_to_the_commit_does_not_say_nothing_was_recorded(azurite):
    """The device transaction reached Storage and committed, but its answer was lost (the connection
    dropped). The 503 must not tell the caller 'nothing was recorded': the certificate is in the ledger,
    and an operator reading that message would look for a write that is not missing."""
    prefix = table_prefix()
    counting = FaultyTransport()
    probe = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=counting))
    probe.add_ca(_ca())
    start = counting.count
    probe.record_issued([Issuance(_cert("P1", "dev-probe", "kp"))])
    calls = counting.count - start  # the device transaction is the last
    probe.close()
    transport = FaultyTransport()
    ledger = TableLedger(connect(azurite.connection_string, prefix, retry_seconds=10, transport=transport))
    try:
        transport.fail_from, transport.mode = transport.count + calls, "lost"
        (answer,) = ledger.record_issued([Issuance(_cert("A1", DEVICE, "ka"))])
        transport.fail_from = None
        assert isinstance(answer, BackendUnavailable)
        assert ledger.get_certificate("A1") is not None, "the commit went through"
        assert "nothing was recorded" not in answer.message, answer.message
    finally:
        ledger.close()
