"""What the API gives away and to whom: 5xx answers without the server's insides, health that tells the
truth, no redirects; the chain route; intermediates marked default; a retried renewal issues nothing new."""

import asyncio
import logging
import re
import sqlite3
import subprocess

import pytest
from fastapi.testclient import TestClient

from shared.api import create_app
from shared.ledger.sqlite import SqliteLedger
from shared.service import RENEWAL_RETRY_WINDOW, DeviceCA

from .apiclient import bearer, make_api
from .certrules import check_device, load, load_chain
from .csrs import device_key, make_csr

# these reach into the SQLite file itself (a lock held by another process, a row nothing expects)
SQLITE_ONLY = pytest.mark.parametrize("ledger_backend", ["sqlite"], indirect=True)

ERROR_ID = re.compile(r"error ID ([0-9a-f]{12})$")


@pytest.fixture
def api(service):
    return make_api(service)


@pytest.fixture
def wrong_passphrase(make_service):
    """A CA whose keys were written with one passphrase, served by a process given another."""
    ca = make_service("pki", key_passphrase="the right one")
    ca.create_root()
    ca.create_intermediate("factory-a")
    factory = ca.principals.create_factory("line-1", ["factory-a"]).secret
    admin = ca.principals.create_admin_key().secret
    served = make_service("pki", key_passphrase="a wrong one", ledger_table_prefix=ca.settings.ledger_table_prefix)
    return served, factory, admin


def test_a_wrong_passphrase_is_a_500_with_an_error_id_and_health_says_503(wrong_passphrase, caplog):
    served, factory, admin = wrong_passphrase
    client = TestClient(create_app(served), raise_server_exceptions=False)
    home = str(served.settings.pki_home)
    with caplog.at_level(logging.ERROR, logger="device_ca"):
        response = client.post(
            "/api/devices/dev-1/certificate",
            content=make_csr("dev-1"),
            headers={**bearer(factory), "Content-Type": "application/pkcs10"},
        )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "key-passphrase-wrong"
    for secret in (home, "keys/", ".pem", "PKI_KEY_PASSPHRASE"):  # the code may say what kind of problem
        assert secret not in response.text
    (error_id,) = ERROR_ID.search(error["message"]).groups()
    logged = [record.getMessage() for record in caplog.records if error_id in record.getMessage()]
    assert len(logged) == 1 and home in logged[0]  # the details are in the log, under that ID

    anyone = client.get("/api/health")
    assert (anyone.status_code, anyone.json()) == (503, {"status": "degraded"})
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="device_ca"):
        checked = client.get("/api/health", headers=bearer(admin))
    assert checked.status_code == 503
    (problem,) = checked.json()["problems"]
    assert problem["part"] == "keys" and problem["code"] == "key-passphrase-wrong"
    assert any(problem["errorId"] in record.getMessage() for record in caplog.records)
    assert home not in checked.text


@SQLITE_ONLY
def test_a_ledger_that_cannot_be_read_makes_health_503(service, caplog):
    """Another process holds the ledger locked (exclusive locking mode): reads fail, health says so."""
    home = service.settings.pki_home
    locked_out = DeviceCA(
        keys=service.keys,
        ledger=SqliteLedger(home / "ledger.sqlite3", busy_timeout_seconds=0.05),
        dps=service.dps,
        settings=service.settings,
    )
    admin = service.principals.create_admin_key().secret
    client = TestClient(create_app(locked_out), raise_server_exceptions=False)
    for ledger in (service.ledger, locked_out.ledger):  # no connection of this process holds it open now
        ledger.close()
    blocker = sqlite3.connect(home / "ledger.sqlite3", isolation_level=None)
    blocker.execute("PRAGMA locking_mode = EXCLUSIVE")
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.ERROR, logger="device_ca"):
            anyone = client.get("/api/health")
            admin_view = client.get("/api/health", headers=bearer(admin))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (anyone.status_code, anyone.json()) == (503, {"status": "degraded"})
    assert admin_view.status_code == 503 and admin_view.json() == {"status": "degraded"}  # its key cannot be read
    assert any("ledger-unavailable" in record.getMessage() for record in caplog.records)
    locked_out.ledger.close()
    assert client.get("/api/health", headers=bearer(admin)).json()["status"] == "ok"


def test_a_misspelt_setting_is_not_told_to_callers(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PKI_HOME", str(tmp_path / "pki"))
    monkeypatch.setenv("PKI_AUTH", "easyath")
    client = TestClient(create_app(), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="device_ca"):
        for method, path in (("GET", "/api/certificates"), ("POST", "/api/devices/dev-1/certificate")):
            response = client.request(method, path)
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "invalid-setting"
            assert "PKI_AUTH" not in response.text and "easyath" not in response.text
            assert ERROR_ID.search(response.json()["error"]["message"])
        health = client.get("/api/health")
    assert (health.status_code, health.json()) == (503, {"status": "degraded"})
    assert any("easyath" in record.getMessage() for record in caplog.records)


@SQLITE_ONLY
def test_an_unexpected_failure_is_an_error_id_only(api, caplog):
    """A ledger row that nothing expects (a date that is not one) fails a route: internal-error and an ID."""
    serial = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a).json()["serialNumber"]
    db = sqlite3.connect(api.service.ledger.path, isolation_level=None)
    (good,) = db.execute("SELECT not_after FROM certificates WHERE serial = ?", (serial,)).fetchone()
    db.execute("UPDATE certificates SET not_after = 'the end of time' WHERE serial = ?", (serial,))
    try:
        with caplog.at_level(logging.ERROR, logger="device_ca"):
            response = api.client.get("/api/certificates", headers=bearer(api.admin))
    finally:
        db.execute("UPDATE certificates SET not_after = ? WHERE serial = ?", (good, serial))
        db.close()
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal-error" and "the end of time" not in response.text
    (error_id,) = ERROR_ID.search(error["message"]).groups()
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.exc_info is not None  # the traceback is in the log, with the ID


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/certificates/"),
        ("GET", "/api/ca/intermediates/"),
        ("POST", "/api/devices/dev-1/certificate/"),
        ("GET", "/api/health/"),
        ("GET", "/api/docs/"),
    ],
)
def test_a_trailing_slash_is_a_404_never_a_redirect(api, method, path):
    for headers in ({}, bearer(api.admin)):
        response = api.client.request(method, path, headers={**headers, "Host": "evil.example"}, follow_redirects=False)
        assert response.status_code == 404, response.text
        assert "location" not in response.headers and "evil.example" not in response.text
        assert response.json()["error"]["code"] == "not-found"


def test_405_is_json(api):
    response = api.client.delete("/api/health")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method-not-allowed"


# -- the chain ------------------------------------------------------------------------------------------


def test_a_factory_gets_the_root_and_its_own_intermediates(api, tmp_path):
    api.service.create_intermediate("factory-c")
    api.service.set_intermediate_enabled("factory-a", False)
    api.service.set_intermediate_enabled("factory-a", True)
    mine = api.client.get("/api/ca/chain", headers=bearer(api.factory_a))
    assert mine.status_code == 200
    body = mine.json()
    assert body["root"]["certificate"] == api.service.root().certificate_pem
    assert [ca["id"] for ca in body["intermediates"]] == ["factory-a"]
    assert "keyName" not in mine.text and "recorded" not in mine.text  # no key names, no paths
    everything = api.client.get("/api/ca/chain", headers=bearer(api.admin)).json()
    assert [ca["id"] for ca in everything["intermediates"]] == ["factory-a", "factory-b", "factory-c"]

    # A factory line verifies what it receives with what the chain route gave it, nothing else.
    pem = api.client.get("/api/ca/chain", headers={**bearer(api.factory_a), "Accept": "application/x-pem-file"})
    assert pem.headers["content-type"].startswith("application/x-pem-file")
    chain = load_chain(pem.text)
    assert [c.subject for c in chain] == [load(api.service.root().certificate_pem).subject, chain[1].subject]
    (tmp_path / "chain.pem").write_text(pem.text)
    device = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a, "application/pkcs10")
    (tmp_path / "dev-1.pem").write_text(device.json()["certificateChain"])
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", "chain.pem", "dev-1.pem"], cwd=tmp_path, capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stdout.strip().endswith("OK"), verify.stderr
    check_device(load(device.json()["certificate"]), chain[1], "dev-1")


def test_the_chain_before_there_is_a_root(make_service):
    api = make_api_without_root(make_service)
    response = api.get("/api/ca/chain", headers=bearer(api.app.state.admin))
    assert response.status_code == 404 and response.json()["error"]["code"] == "root-not-found"


def make_api_without_root(make_service) -> TestClient:
    ca = make_service("empty")
    client = TestClient(create_app(ca), raise_server_exceptions=False)
    client.app.state.admin = ca.principals.create_admin_key().secret
    return client


def test_intermediates_say_which_is_the_default(api):
    listed = api.client.get("/api/ca/intermediates", headers=bearer(api.admin)).json()
    assert [(ca["id"], ca["default"]) for ca in listed] == [("factory-a", False), ("factory-b", True)]
    api.client.post("/api/ca/intermediates/factory-b/disable", headers=bearer(api.admin))
    one = api.client.get("/api/ca/intermediates/factory-a", headers=bearer(api.admin)).json()
    assert one["default"] is True


# -- renewal retries ------------------------------------------------------------------------------------


def test_a_renewal_retried_after_a_timeout_issues_one_certificate(api, clock):
    first = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a).json()["serialNumber"]
    renewal = make_csr("dev-1")
    answers = [api.post_csr("dev-1", renewal, api.factory_a, renew="true") for _ in range(6)]
    assert [a.status_code for a in answers] == [201] + [200] * 5
    assert len({a.json()["serialNumber"] for a in answers}) == 1
    assert api.certificate_count() == 2 and api.service.certificate(first).status == "superseded"
    # Another factory retrying it learns nothing; an admin gets the same certificate.
    other = api.post_csr("dev-1", renewal, api.factory_b, renew="true")
    assert other.status_code == 403
    assert api.post_csr("dev-1", renewal, api.admin, renew="true").json() == answers[0].json()
    # Past the window, the same key renews again (a new certificate for the same key).
    clock.advance(seconds=RENEWAL_RETRY_WINDOW.total_seconds() + 1)
    again = api.post_csr("dev-1", renewal, api.factory_a, renew="true")
    assert again.status_code == 201 and api.certificate_count() == 3


def test_concurrent_retries_of_one_renewal_issue_one_certificate(api):
    api.service.sign_csr(make_csr("dev-2"), "dev-2", requested_by="factory-one", allowed_intermediates=["factory-a"])
    csr = make_csr("dev-2", key=device_key())

    async def retries():
        return await asyncio.gather(
            *(
                api.service.sign_csr_async(
                    csr, "dev-2", renew=True, requested_by="factory-one", allowed_intermediates=["factory-a"]
                )
                for _ in range(5)
            )
        )

    issued = asyncio.run(retries())
    assert len({result.record.serial for result in issued}) == 1
    assert sum(result.created for result in issued) == 1
    assert api.certificate_count() == 2
