"""Batches end to end on Azurite's Queue service: submitted through the API, queued in the encoding host.json
names, delivered to the queue functions as the Functions host delivers them (dequeued from Azurite, wrapped
in QueueMessage with its dequeue count, retried, moved to the poison queue after maxDequeueCount)."""

import asyncio
import base64
import gc
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.functions.queue import QueueMessage
from azure.keyvault.certificates._shared import http_challenge_cache as certificate_challenges
from azure.keyvault.keys._shared import http_challenge_cache as keys_challenges
from azure.storage.queue import QueueClient

from shared.api import create_app
from shared.batch_functions import batch_functions
from shared.composition import build_service
from shared.config import Settings
from shared.dps.offline import OfflineDps
from shared.keys.keyvault import KeyVaultKeyStore, KeyVaultOptions
from shared.ledger.models import CertificateQuery
from shared.ledger.sqlite import SqliteLedger
from shared.queues import BATCH_CHUNKS, MAX_MESSAGE_BYTES, host_message_encoding, poison_queue, storage_queue
from shared.service import DeviceCA

from .certrules import check_device, check_ledger, load_chain
from .conftest import close_checked, reload_function_app
from .csrs import make_csr
from .fakes.keyvault import VAULT_URL, FakeCredential, FakeKeyVault

MAX_DEQUEUE_COUNT = json.loads((Path(__file__).parent.parent / "host.json").read_text())["extensions"]["queues"][
    "maxDequeueCount"
]


class Host:
    """What the Functions host does for the two queue triggers, on Azurite's real queues: receive a message,
    decode it as host.json's messageEncoding says, call the function with a QueueMessage carrying the
    dequeue count; delete the message when the function returns, make it visible again when it raises,
    and after maxDequeueCount deliveries move it to the poison queue."""

    def __init__(self, connection: str, functions: dict[str, Any]) -> None:
        self.queues = {
            name: QueueClient.from_connection_string(connection, name)
            for name in (BATCH_CHUNKS, poison_queue(BATCH_CHUNKS))
        }
        self.triggers = {}
        for function in functions.values():
            trigger = function.get_trigger()
            if trigger.get_binding_name() == "queueTrigger":
                assert trigger.connection == "QUEUE_STORAGE"
                if trigger.queue_name in self.queues:  # the app's other queues (DPS) are not this host's
                    self.triggers[trigger.queue_name] = function.get_user_function()
        assert set(self.triggers) == set(self.queues)
        for queue in self.queues.values():
            try:
                queue.create_queue()
            except Exception:  # it exists
                queue.clear_messages()
        self.failures: list[str] = []

    def raw(self, name: str = BATCH_CHUNKS) -> list[str]:
        """The messages waiting on a queue, as Storage holds them (peeked, not taken)."""
        return [m.content for m in self.queues[name].peek_messages(max_messages=32)]

    def run(self, name: str = BATCH_CHUNKS) -> int:
        """Deliver every message now visible on queue `name` once; returns how many were delivered."""
        queue = self.queues[name]
        delivered = 0
        for message in list(queue.receive_messages(max_messages=32, visibility_timeout=60)):
            body = base64.b64decode(message.content) if host_message_encoding() == "base64" else message.content
            wrapped = QueueMessage(id=message.id, body=body, dequeue_count=message.dequeue_count)
            delivered += 1
            try:
                self.triggers[name](wrapped)
            except Exception as error:
                self.failures.append(type(error).__name__)
                if message.dequeue_count >= MAX_DEQUEUE_COUNT:
                    self.queues[poison_queue(BATCH_CHUNKS)].send_message(message.content)
                    queue.delete_message(message)
                else:
                    queue.update_message(message, visibility_timeout=0)  # visible again: the next run delivers it
                continue
            queue.delete_message(message)
        return delivered


def _items(prefix: str, count: int) -> list[dict]:
    return [{"deviceId": f"{prefix}-{n}", "csr": make_csr(f"{prefix}-{n}").decode()} for n in range(count)]


def _call(handler, method: str, path: str, key: str, body: bytes = b"") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    request = func.HttpRequest(method=method, url=f"http://localhost{path}", headers=headers, body=body)
    response = asyncio.run(handler(request, None))
    return response.status_code, json.loads(response.get_body())


@pytest.fixture
def function_app(tmp_path, monkeypatch, queue_settings):
    """function_app imported fresh on a PKI home with a root, an intermediate and two factories, and
    QUEUE_STORAGE naming Azurite's Queue service (as the app's settings would in Azure)."""
    home = tmp_path / "pki"
    monkeypatch.setenv("PKI_HOME", str(home))
    monkeypatch.setenv("QUEUE_STORAGE", queue_settings["QUEUE_STORAGE"])
    monkeypatch.chdir(tmp_path)  # no developer's local.settings.json
    ca = build_service(Settings(pki_home=home))
    ca.create_root()
    ca.create_intermediate("factory-a")
    keys = {name: ca.principals.create_factory(name, ["factory-a"]).secret for name in ("line-1", "line-2")}
    ca.close()
    module = reload_function_app()
    functions = {f.get_function_name(): f for f in module.app.get_functions()}  # once per app object
    yield module, functions, keys
    module.api.state.service.close_built()


def test_submitted_through_the_api_signed_by_the_queue_function_on_azurite(function_app, queue_settings):
    module, functions, keys = function_app
    host = Host(queue_settings["QUEUE_STORAGE"], functions)
    http = functions["http_app_func"].get_user_function()
    items = _items("fn", 150)  # two chunks
    status, batch = _call(http, "POST", "/api/batches", keys["line-1"], json.dumps({"items": items}).encode())
    assert status == 202 and batch["counts"]["pending"] == 150

    raw = host.raw()
    assert len(raw) == 2 and host_message_encoding() == "base64"
    chunks = [json.loads(base64.b64decode(text)) for text in raw]  # base64, as host.json says
    assert sorted(chunks, key=lambda c: c["chunk"]) == [{"batchId": batch["id"], "chunk": n} for n in (0, 1)]
    assert all(len(text) < MAX_MESSAGE_BYTES and "CERTIFICATE REQUEST" not in text for text in raw)

    assert host.run() == 2 and host.failures == []
    status, done = _call(http, "GET", f"/api/batches/{batch['id']}?limit=1000", keys["line-1"])
    assert status == 200 and done["status"] == "done" and done["counts"]["issued"] == 150
    ledger = SqliteLedger(Path(os.environ["PKI_HOME"]) / "ledger.sqlite3")
    try:
        for result, item in zip(done["results"], items, strict=True):
            device, intermediate = load_chain(result["bundle"]["certificateChain"])
            check_device(device, intermediate, item["deviceId"])
            assert ledger.get_certificate(result["bundle"]["serialNumber"]).device_id == item["deviceId"]
        assert len(ledger.list_certificates(CertificateQuery(limit=1000)).items) == 150
        check_ledger(ledger)
    finally:
        ledger.close()

    status, hidden = _call(http, "GET", f"/api/batches/{batch['id']}", keys["line-2"])
    assert status == 404 and hidden["error"]["code"] == "batch-not-found"

    # the host delivers a message again (at least once): nothing new is issued
    storage_queue(Settings.from_values(queue_settings), BATCH_CHUNKS).send(json.dumps(chunks[0]))
    assert host.run() == 1
    status, again = _call(http, "GET", f"/api/batches/{batch['id']}?limit=1000", keys["line-1"])
    assert again["results"] == done["results"]
    assert module.api.state.service().ledger.chunk_items(batch["id"], 0)[0].attempts == 1

    # a message that is not this app's is dropped, not retried
    storage_queue(Settings.from_values(queue_settings), BATCH_CHUNKS).send('{"hello": "world"}')
    assert host.run() == 1 and host.failures == [] and host.raw() == []


@pytest.fixture
def vault_functions(tmp_path, queue_settings):
    """The batch functions on a CA whose keys are in a fake vault, its chunks queued on Azurite."""
    keys_challenges.clear()
    certificate_challenges.clear()
    vault = FakeKeyVault()
    options = KeyVaultOptions(first_retry_delay=0.01, max_retry_delay=0.02, retry_seconds=0.1)
    home = tmp_path / "vault-pki"
    settings = replace(Settings.from_values(queue_settings), pki_home=home)
    service = DeviceCA(
        KeyVaultKeyStore(VAULT_URL, FakeCredential(), options, session=vault.session()),
        SqliteLedger(home / "ledger.sqlite3"),
        OfflineDps(home),
        settings,
        batch_queue=storage_queue(settings, BATCH_CHUNKS),
    )
    service.create_root()
    service.create_intermediate("vault-int")
    app = func.AsgiFunctionApp(app=create_app(service), http_auth_level=func.AuthLevel.ANONYMOUS)
    app.register_functions(batch_functions(lambda: service))
    host = Host(queue_settings["QUEUE_STORAGE"], {f.get_function_name(): f for f in app.get_functions()})
    yield service, vault, host
    close_checked([service])
    del app, host
    gc.collect()  # the app object goes now, outside any event loop (see reload_function_app)


def test_a_key_vault_outage_delays_the_batch_until_the_vault_recovers(vault_functions):
    service, vault, host = vault_functions
    vault.failures["sign"] = lambda call: 503
    batch = service.submit_batch(_items("kv", 3), requested_by="cli:test")
    for delivery in (1, 2):
        assert host.run() == 1 and len(host.failures) == delivery  # raised: the message stays on the queue
        summary = service.batch(batch.record.id)
        assert (summary.status, summary.pending) == ("running", 3)
    state, _ = service.ledger.chunk_items(batch.record.id, 0)
    assert state.attempts == 2 and state.last_error.startswith("key-vault-unavailable")
    assert len(service.ledger.list_certificates(CertificateQuery()).items) == 0

    del vault.failures["sign"]  # the vault is back
    assert host.run() == 1 and len(host.failures) == 2
    summary = service.batch(batch.record.id)
    assert (summary.status, summary.issued) == ("done", 3)
    assert len(service.ledger.list_certificates(CertificateQuery()).items) == 3
    assert host.raw() == [] and host.raw(poison_queue(BATCH_CHUNKS)) == []


def test_a_chunk_that_keeps_failing_ends_in_the_poison_handler_with_its_items_failed(vault_functions):
    service, vault, host = vault_functions
    vault.failures["sign"] = lambda call: 503
    batch = service.submit_batch(_items("poisoned", 2), requested_by="cli:test")
    for _ in range(MAX_DEQUEUE_COUNT):
        assert host.run() == 1
    assert len(host.failures) == MAX_DEQUEUE_COUNT and host.raw() == []
    assert len(host.raw(poison_queue(BATCH_CHUNKS))) == 1
    assert host.run(poison_queue(BATCH_CHUNKS)) == 1
    summary = service.batch(batch.record.id)
    assert (summary.status, summary.failed) == ("done-with-failures", 2)
    results = service.batch_results(batch.record.id).results
    assert {r.error[0] for r in results} == {"chunk-failed"}
    words = results[0].error[1]
    assert f"({MAX_DEQUEUE_COUNT})" in words and "key-vault-unavailable" in words
    assert "Submitting the item again is safe" in words
    assert len(service.ledger.list_certificates(CertificateQuery()).items) == 0


def test_a_poisoned_chunk_keeps_the_certificates_its_failed_deliveries_committed(vault_functions):
    service, vault, host = vault_functions
    first = vault.calls["sign"]
    vault.failures["sign"] = lambda call: 503 if call > first + 1 else None  # one signature, then an outage
    batch = service.submit_batch(_items("partly", 3), requested_by="cli:test")
    for _ in range(MAX_DEQUEUE_COUNT):
        assert host.run() == 1
    assert host.run(poison_queue(BATCH_CHUNKS)) == 1
    certificates = service.ledger.list_certificates(CertificateQuery()).items
    assert len(certificates) == 1  # the first delivery committed one before the vault went away
    results = service.batch_results(batch.record.id).results
    issued = [r for r in results if r.status == "issued"]
    assert [r.issued.record.serial for r in issued] == [certificates[0].serial] and issued[0].issued.created
    assert [r.error[0] for r in results if r.status == "failed"] == ["chunk-failed", "chunk-failed"]
    summary = service.batch(batch.record.id)
    assert (summary.status, summary.issued, summary.failed) == ("done-with-failures", 1, 2)
