"""Revoking a certificate revokes its key: every active certificate holding it goes with it, in one commit."""

import json
import logging

import pytest

from shared.errors import Conflict
from shared.pki import PkiError
from shared.pki.revocation import REVOCATION_REASONS, revocation_reason
from shared.service import RENEWAL_RETRY_WINDOW

from .apiclient import bearer, make_api
from .conftest import run_cli, settings_environment
from .csrs import device_key, make_csr


def _renewed_with_the_same_key(service, clock, device: str = "dev-1"):
    """S1 superseded and S2 active, one key: the case where revoking S1 used to leave S2 active."""
    key = device_key()
    first = service.sign_csr(make_csr(device, key=key), device).record.serial
    clock.advance(seconds=RENEWAL_RETRY_WINDOW.total_seconds() + 1)  # a renewal, not a retry of the first
    second = service.sign_csr(make_csr(device, key=key), device, renew=True).record.serial
    assert service.certificate(first).status == "superseded"
    return key, first, second


def test_revoking_an_old_certificate_revokes_the_active_one_with_its_key(service, clock):
    key, first, second = _renewed_with_the_same_key(service, clock)
    revocation, dps = service.revoke(first, "keyCompromise")
    assert revocation.record.serial == first and revocation.record.status == "revoked"
    assert [c.serial for c in revocation.also_revoked] == [second]
    assert all(c.status == "revoked" and c.status_reason == "keyCompromise" for c in revocation.also_revoked)
    assert service.certificate(second).status == "revoked"
    assert service.ledger.active_certificates(["dev-1"]) == {}
    with pytest.raises(Conflict) as refused:
        service.sign_csr(make_csr("dev-1", key=key), "dev-1", renew=True)
    assert refused.value.code == "key-revoked"
    assert dps["mode"] == "offline"
    document = service.dps.documents.get("individual-enrollments", "dev-1")
    assert document["provisioningStatus"] == "disabled"  # no certificate of the device is active: blocked


def test_revoking_an_old_key_admits_only_the_active_certificate_in_dps(service):
    first = service.sign_csr(make_csr("dev-2"), "dev-2").record.serial
    second = service.sign_csr(make_csr("dev-2"), "dev-2", renew=True).record
    revocation, dps = service.revoke(first, "superseded")
    assert revocation.also_revoked == ()
    assert service.certificate(second.serial).status == "active"
    assert dps["mode"] == "offline"
    document = service.dps.documents.get("individual-enrollments", "dev-2")
    assert document["provisioningStatus"] == "enabled"
    assert document["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"] == second.certificate_pem


def test_revoking_twice_keeps_the_first_reason(service):
    serial = service.sign_csr(make_csr("dev-3"), "dev-3").record.serial
    service.revoke(serial, "cessationOfOperation")
    again, _ = service.revoke(serial, "keyCompromise")
    assert again.record.status_reason == "cessationOfOperation" and again.also_revoked == ()


@pytest.mark.parametrize("name", REVOCATION_REASONS)
def test_rfc_5280_reason_names_are_accepted_in_any_case(name):
    assert revocation_reason(name.upper()) == name
    assert revocation_reason(f" {name} ") == name


@pytest.mark.parametrize("text", ["stolen", "certificateHold", "removeFromCRL", "key-compromise", "\ud800", "1"])
def test_other_reasons_are_refused(service, text):
    serial = service.sign_csr(make_csr("dev-4"), "dev-4").record.serial
    with pytest.raises(PkiError) as refused:
        service.revoke(serial, text)
    assert refused.value.code == "invalid-reason"
    assert service.certificate(serial).status == "active"


def test_revoke_over_http_lists_what_went_with_the_key(service, clock):
    api = make_api(service)
    _, first, second = _renewed_with_the_same_key(service, clock)
    response = api.client.post(
        f"/api/certificates/{first}/revoke", json={"reason": "keycompromise"}, headers=bearer(api.admin)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["statusReason"] == "keyCompromise"
    assert body["warnings"] == [body["dps"]["message"]] and "not configured" in body["warnings"][0]
    assert [c["serialNumber"] for c in body["alsoRevoked"]] == [second]
    assert body["alsoRevoked"][0]["status"] == "revoked"
    refused = api.client.post(
        f"/api/certificates/{second}/revoke", json={"reason": "certificateHold"}, headers=bearer(api.admin)
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid-reason"


@pytest.mark.child_process
def test_revoke_on_the_cli_lists_what_went_with_the_key(service, clock):
    home = service.settings.pki_home
    env = settings_environment(service.settings)
    _, first, second = _renewed_with_the_same_key(service, clock)
    done = run_cli("revoke", first, "--reason", "keyCompromise", home=home, env=env)
    assert done.returncode == 0, done.stderr
    assert f"Also revoked {second}".encode() in done.stdout
    as_json = json.loads(run_cli("revoke", second, "--json", home=home, env=env).stdout)  # again: as the first said
    assert as_json["status"] == "revoked" and [c["serialNumber"] for c in as_json["alsoRevoked"]] == [first]
    bad = run_cli("revoke", first, "--reason", "stolen", home=home, env=env)
    assert bad.returncode == 2 and bad.stderr.count(b"\n") == 1 and b"RFC 5280" in bad.stderr  # a usage error
    again = run_cli("revoke", first, home=home, env=env)
    assert again.returncode == 0
    assert b"was already revoked (keyCompromise); the ledger is unchanged" in again.stdout
    assert f"{second} was revoked with it: it holds the same key".encode() in again.stdout
    assert service.certificate(first).status_reason == "keyCompromise"


def _recorded(service, device: str) -> dict | None:
    return service.dps.documents.get("individual-enrollments", device)


def test_a_new_certificate_after_a_revocation_is_admitted_in_dps(service):
    """DESIGN's table after each step: revoked → blocked; a new key → only the new certificate admitted."""
    serial = service.sign_csr(make_csr("dev-5"), "dev-5").record.serial
    service.revoke(serial, "keyCompromise")
    assert _recorded(service, "dev-5")["provisioningStatus"] == "disabled"
    renewed = service.sign_csr(make_csr("dev-5"), "dev-5").record
    enrollment = _recorded(service, "dev-5")
    assert enrollment["provisioningStatus"] == "enabled"
    assert enrollment["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"] == renewed.certificate_pem


def test_a_renewal_moves_the_admitted_certificate_along(service):
    first = service.sign_csr(make_csr("dev-6"), "dev-6").record.serial
    service.sign_csr(make_csr("dev-6"), "dev-6", renew=True)
    service.revoke(first, "superseded")
    third = service.sign_csr(make_csr("dev-6"), "dev-6", renew=True).record
    enrollment = _recorded(service, "dev-6")
    assert enrollment["provisioningStatus"] == "enabled"
    assert enrollment["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"] == third.certificate_pem


def test_devices_never_revoked_get_no_individual_enrollment(service):
    service.sign_csr(make_csr("dev-7"), "dev-7")
    service.sign_csr(make_csr("dev-7"), "dev-7", renew=True)
    assert _recorded(service, "dev-7") is None


@pytest.mark.parametrize("ledger_backend", ["sqlite"], indirect=True)  # breaks the offline records' folder
def test_a_dps_failure_after_the_commit_is_reported_and_revoking_again_mends_it(service, caplog):
    """The ledger's revocation stands when DPS cannot be written: the answer says so (not "nothing was
    recorded") with the error ID under which the failure, naming the device, is logged with its traceback,
    and revoking again puts DPS in step."""
    serial = service.sign_csr(make_csr("dev-8"), "dev-8").record.serial
    enrollments = service.dps.documents.directory / "individual-enrollments"
    enrollments.parent.mkdir(parents=True, exist_ok=True)
    enrollments.write_text("not a folder: every write of an individual enrollment fails\n")
    with caplog.at_level(logging.ERROR, logger="device_ca"):
        revocation, dps = service.revoke(serial, "keyCompromise")
    assert revocation.record.status == "revoked" and service.certificate(serial).status == "revoked"
    (logged,) = [record for record in caplog.records if hasattr(record, "error_id")]
    assert logged.getMessage() == f"unexpected error {logged.error_id} while updating the DPS enrollment of dev-8"
    assert logged.exc_info is not None and isinstance(logged.exc_info[1], OSError)  # the traceback, under the ID
    assert dps == {
        "mode": "failed",
        "error": "internal-error",
        "message": f"the ledger holds the change, but DPS was not updated for device 'dev-8' (internal-error, "
        f"error ID {logged.error_id}); run revoke {serial} again (it changes nothing else) to put DPS in step",
    }
    enrollments.unlink()
    _, mended = service.revoke(serial, "keyCompromise")
    assert mended["mode"] == "offline" and _recorded(service, "dev-8")["provisioningStatus"] == "disabled"


def test_a_refused_reason_says_why_in_words():
    """The exact words a caller reads (a hold is refused as such; an unknown name lists RFC 5280's)."""
    with pytest.raises(PkiError) as hold:
        revocation_reason("certificateHold")
    assert hold.value.message == "this CA does not put certificates on hold: a revocation is final"
    with pytest.raises(PkiError) as unknown:
        revocation_reason("stolen")
    assert unknown.value.message == (
        "revocation reason 'stolen' is not one of RFC 5280's: unspecified, keyCompromise, cACompromise, "
        "affiliationChanged, superseded, cessationOfOperation, privilegeWithdrawn, aACompromise"
    )
    assert revocation_reason(None) == revocation_reason("") == "unspecified"
