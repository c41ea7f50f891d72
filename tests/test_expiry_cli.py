"""`python cli.py check-expiring`: its findings, its exit status (a pipeline's gate), --within, --announce;
and the inventory's expiringWithinDays over HTTP."""

import json
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from shared.api import create_app
from shared.composition import build_service
from shared.config import Settings

from .conftest import run_cli
from .csrs import make_csr


@pytest.fixture
def short_lived(tmp_path):
    """A CA on the embedded default whose intermediate 'short' ends in two days, with device dev-1 under it
    (cut to that end) and dev-2 under a long intermediate."""
    home = tmp_path / "pki"
    ca = build_service(Settings(pki_home=home))
    ca.create_root()
    ca.create_intermediate("short", days=2)
    ca.create_intermediate("long")
    serials = {
        "dev-1": ca.sign_csr(make_csr("dev-1"), "dev-1", intermediate_id="short").record.serial,
        "dev-2": ca.sign_csr(make_csr("dev-2"), "dev-2", intermediate_id="long").record.serial,
    }
    ca.close()
    return home, serials


def test_findings_set_the_exit_status(short_lived):
    home, serials = short_lived
    done = run_cli("check-expiring", "--json", home=home)
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["expiring"] is True and report["thresholdDays"] == {"device": 30, "intermediate": 90, "root": 365}
    found = {(f["kind"], f.get("deviceId") or f.get("caId")): f for f in report["findings"]}
    assert set(found) == {("intermediate", "short"), ("device", "dev-1")}
    assert found["device", "dev-1"]["serial"] == serials["dev-1"] and found["device", "dev-1"]["stage"] == "7d"
    assert not any(f["announced"] for f in report["findings"]) and report["announced"] == 0

    text = run_cli("check-expiring", home=home)
    assert text.returncode == 3
    assert (
        "2 certificate(s) inside the thresholds (devices 30, intermediates 90, root 365 days)" in text.stdout.decode()
    )
    assert (
        "intermediate short: intermediate short ends" in text.stdout.decode()
        and "create its successor" in text.stdout.decode()
    )

    # a look past every threshold, with one of its own
    wide = json.loads(run_cli("check-expiring", "--json", "--within", "400", home=home).stdout)
    assert {f.get("deviceId") or f.get("caId") for f in wide["findings"]} == {"short", "dev-1", "dev-2"}


def test_announce_records_and_announces_once(short_lived):
    home, _ = short_lived
    first = run_cli("check-expiring", "--announce", home=home)
    assert first.returncode == 3, first.stderr
    assert "Announced 2 new stage(s)." in first.stdout.decode() and "7d (new)" in first.stdout.decode()
    notices = [line for line in first.stderr.decode().splitlines() if "certificate expiry notice" in line]
    assert len(notices) == 2 and all(line.startswith("WARNING: ") for line in notices)
    assert json.loads(notices[0].split(": ", 2)[2])["stage"] == "7d"
    again = run_cli("check-expiring", "--announce", "--json", home=home)
    assert again.returncode == 3 and json.loads(again.stdout)["announced"] == 0
    assert "certificate expiry notice" not in again.stderr.decode()


def test_nothing_expiring_is_status_0(tmp_path):
    home = tmp_path / "pki"
    ca = build_service(Settings(pki_home=home))
    ca.create_root()
    ca.create_intermediate("long")
    ca.close()
    done = run_cli("check-expiring", home=home)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == (
        "Nothing expires within the thresholds (devices 30, intermediates 90, root 365 days)."
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--within", "0"], "argument --within: must be more than 0"),
        (["--within", "nan"], "argument --within: must be a finite number"),
        (["--within", "5", "--announce"], "argument --announce: not allowed with argument --within"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, args, words):
    done = run_cli("check-expiring", *args, home=tmp_path / "pki")
    assert done.returncode == 2
    assert words in done.stderr.decode() and len(done.stderr.decode().strip().splitlines()) == 1


def test_the_inventory_lists_active_expiring_certificates_unless_a_status_is_asked(make_service, clock):
    service = make_service()
    service.create_root()
    service.create_intermediate("factory-a")
    admin = service.principals.create_admin_key().secret
    kept = service.sign_csr(make_csr("dev-1"), "dev-1").record
    revoked = service.sign_csr(make_csr("dev-2"), "dev-2").record
    service.revoke(revoked.serial)
    clock.now = kept.not_after - timedelta(days=10)
    with TestClient(create_app(service)) as client:
        headers = {"Authorization": f"Bearer {admin}"}
        listed = client.get("/api/certificates?expiringWithinDays=30", headers=headers).json()
        assert [c["serialNumber"] for c in listed["items"]] == [kept.serial]
        asked = client.get("/api/certificates?expiringWithinDays=30&status=revoked", headers=headers).json()
        assert [c["serialNumber"] for c in asked["items"]] == [revoked.serial]
        service.scan_expiring()  # nothing is expired yet
        clock.now = kept.not_after + timedelta(days=1)
        service.scan_expiring()
        expired = client.get("/api/certificates?status=expired", headers=headers).json()
        assert [(c["serialNumber"], c["status"]) for c in expired["items"]] == [(kept.serial, "expired")]
        assert client.get("/api/certificates?expiringWithinDays=30", headers=headers).json()["items"] == []
        wrong = client.get("/api/certificates?status=lapsed", headers=headers)
        assert wrong.status_code == 400 and "expired" in wrong.json()["error"]["message"]
