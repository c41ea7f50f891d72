"""The use cases on the embedded default: every certificate issued is checked against the rules."""

from datetime import timedelta

import pytest

from shared.errors import Conflict, Forbidden, NotFound
from shared.ledger.models import CertificateQuery
from shared.parameters import InvalidParameter
from shared.pki import PkiError
from shared.pki.validity import MAX_DAYS
from shared.service import SignRequest, normalize_serial

from .certrules import (
    DEVICE_BUNDLE_FIELDS,
    check_device,
    check_intermediate,
    check_proof_of_possession,
    check_root,
    load,
    load_chain,
)
from .csrs import device_key, make_csr


def _certs(ca, **query):
    return ca.ledger.list_certificates(CertificateQuery(**query)).items


def test_root_and_intermediate_follow_the_rules(service):
    root = load(service.root().certificate_pem)
    check_root(root)
    check_intermediate(load(service.intermediate("factory-a").certificate_pem), root)


def test_p384_hierarchy_signs_with_sha384(make_service):
    ca = make_service(ca_curve="P-384")
    ca.create_root()
    ca.create_intermediate("p384")
    root = load(ca.root().certificate_pem)
    intermediate = load(ca.intermediate("p384").certificate_pem)
    assert root.signature_hash_algorithm.name == "sha384"
    check_root(root)
    check_intermediate(intermediate, root)
    issued = ca.sign_csr(make_csr("dev-1"), "dev-1")
    device = load(issued.record.certificate_pem)
    assert device.signature_hash_algorithm.name == "sha384"
    check_device(device, intermediate, "dev-1")


def test_device_bundle(service):
    issued = service.sign_csr(make_csr("dev-1"), "dev-1")
    bundle = issued.bundle()
    assert issued.created
    assert set(bundle) == DEVICE_BUNDLE_FIELDS  # no "dps": DPS is offline
    device, intermediate = load_chain(bundle["certificateChain"])
    assert device == load(bundle["certificate"])
    assert bundle["intermediateId"] == "factory-a"
    assert intermediate == load(service.intermediate("factory-a").certificate_pem)
    check_device(device, intermediate, "dev-1")
    assert bundle["serialNumber"] == format(device.serial_number, "X").zfill(len(bundle["serialNumber"]))
    stored = service.certificate(bundle["serialNumber"])
    assert stored.certificate_pem == bundle["certificate"]


def test_same_csr_again_gives_the_same_certificate(service):
    csr = make_csr("dev-1")
    first = service.sign_csr(csr, "dev-1")
    again = service.sign_csr(csr, "dev-1")
    assert first.created and not again.created
    assert again.record == first.record
    assert len(_certs(service)) == 1


def test_an_answer_from_the_ledger_says_when_the_intermediate_named_was_not_used(service):
    """The same CSR again (or a renewal retried) gets the certificate it got before, whoever signed it:
    when the request names another intermediate, the answer says that one was not used."""
    csr = make_csr("dev-1")
    first = service.sign_csr(csr, "dev-1", intermediate_id="factory-a")
    assert service.sign_csr(csr, "dev-1", intermediate_id="factory-a").warnings == ()
    assert service.sign_csr(csr, "dev-1").warnings == ()
    again = service.sign_csr(csr, "dev-1", intermediate_id="factory-b")
    assert again.record == first.record and not again.created
    assert again.warnings == (
        "this CSR's certificate was issued before, by intermediate 'factory-a': it is given back, and "
        "intermediate 'factory-b' was not used (renew to have it sign)",
    )
    new_key = make_csr("dev-1")
    renewed = service.sign_csr(new_key, "dev-1", intermediate_id="factory-a", renew=True)
    retried = service.sign_csr(new_key, "dev-1", intermediate_id="factory-b", renew=True)
    assert retried.record == renewed.record and not retried.created
    assert retried.warnings == (again.warnings[0],)
    assert service.sign_csr(new_key, "dev-1", renew=True).warnings == ()


def test_new_csr_for_the_same_key_is_the_same_request(service):
    key = device_key()
    first = service.sign_csr(make_csr("dev-1", key=key), "dev-1")
    again = service.sign_csr(make_csr("dev-1", key=key), "dev-1")  # ECDSA: different CSR bytes
    assert again.record.serial == first.record.serial and not again.created


def test_new_key_for_a_device_needs_renewal(service):
    first = service.sign_csr(make_csr("dev-1"), "dev-1")
    with pytest.raises(Conflict) as refused:
        service.sign_csr(make_csr("dev-1"), "dev-1")
    assert refused.value.code == "device-has-certificate"
    assert "renewal" in refused.value.message
    renewed = service.sign_csr(make_csr("dev-1"), "dev-1", renew=True)
    assert renewed.created and renewed.record.serial != first.record.serial
    old = service.certificate(first.record.serial)
    assert old.status == "superseded" and renewed.record.serial in old.status_reason
    assert [c.serial for c in _certs(service, status="active")] == [renewed.record.serial]
    check_device(load(renewed.record.certificate_pem), load(service.intermediate("factory-a").certificate_pem), "dev-1")


def test_one_key_cannot_serve_two_devices(service):
    key = device_key()
    service.sign_csr(make_csr("dev-1", key=key), "dev-1")
    with pytest.raises(Conflict) as refused:
        service.sign_csr(make_csr("dev-2", key=key), "dev-2")
    assert refused.value.code == "key-in-use"
    assert _certs(service, device_id="dev-2") == []


def test_expired_certificate_does_not_block_its_device(service, clock):
    key = device_key()
    first = service.sign_csr(make_csr("dev-1", key=key), "dev-1")
    clock.advance(days=service.settings.device_days + 1)
    again = service.sign_csr(make_csr("dev-1", key=key), "dev-1")
    assert again.created and again.record.serial != first.record.serial
    assert service.certificate(first.record.serial).status == "superseded"


def test_validity_is_clamped_to_the_issuer_and_said(make_service, clock):
    ca = make_service(device_days=400)
    ca.create_root()
    result = ca.create_intermediate("short", days=100)
    assert not result.warnings or all("DPS" in w for w in result.warnings)
    issued = ca.sign_csr(make_csr("dev-1"), "dev-1")
    intermediate = load(ca.intermediate("short").certificate_pem)
    device = load(issued.record.certificate_pem)
    assert device.not_valid_after_utc == intermediate.not_valid_after_utc
    assert any("cut to end with the issuer" in w for w in issued.bundle()["warnings"])
    check_device(device, intermediate, "dev-1")


def test_intermediate_longer_than_root_is_clamped(make_service):
    ca = make_service()
    ca.create_root(days=30)
    result = ca.create_intermediate("long", days=365)
    assert any("cut to end with the issuer" in w for w in result.warnings)
    root = load(ca.root().certificate_pem)
    intermediate = load(result.record.certificate_pem)
    assert intermediate.not_valid_after_utc == root.not_valid_after_utc
    check_intermediate(intermediate, root)


def test_newest_active_intermediate_is_the_default(service):
    service.create_intermediate("factory-b")
    assert service.sign_csr(make_csr("dev-1"), "dev-1").record.intermediate_id == "factory-b"
    service.set_intermediate_enabled("factory-b", False)
    assert service.sign_csr(make_csr("dev-2"), "dev-2").record.intermediate_id == "factory-a"
    with pytest.raises(Conflict) as refused:
        service.sign_csr(make_csr("dev-3"), "dev-3", intermediate_id="factory-b")
    assert refused.value.code == "intermediate-disabled"
    assert _certs(service, device_id="dev-3") == []
    service.set_intermediate_enabled("factory-b", True)
    assert service.sign_csr(make_csr("dev-3"), "dev-3", intermediate_id="factory-b").created


def test_the_default_intermediate_is_the_newest_active_one_of_those_given(service):
    service.create_intermediate("factory-b")
    records = service.intermediates()
    assert [record.id for record in records] == ["factory-a", "factory-b"]
    assert service.default_intermediate_id() == service.default_intermediate_id(records) == "factory-b"
    assert service.default_intermediate_id(records[:1]) == "factory-a"  # of the records given, not the ledger's
    assert service.default_intermediate_id([]) is None
    for ca_id in ("factory-a", "factory-b"):
        service.set_intermediate_enabled(ca_id, False)
    assert service.default_intermediate_id() is None


def test_disabling_without_dps_warns_only_that_dps_is_not_configured(service):
    """Offline, DPS provisions nothing anyway: the one warning says the group document was only recorded."""
    for enabled in (False, True):
        result = service.set_intermediate_enabled("factory-a", enabled)
        assert result.warnings == (result.record.dps["message"],)
        assert result.warnings[0].startswith("DPS is not configured: nothing was sent")


def test_a_same_csr_retry_answers_from_the_ledger_even_once_its_intermediate_is_disabled(service):
    """Handing back a certificate on record signs nothing, so it needs no active intermediate (and costs no
    CA read); anything to sign still needs one, and a caller's binding is checked before anything else."""
    csr = make_csr("dev-1")
    first = service.sign_csr(csr, "dev-1", intermediate_id="factory-a")
    service.set_intermediate_enabled("factory-a", False)
    again = service.sign_csr(csr, "dev-1", intermediate_id="factory-a")
    assert not again.created and again.record == first.record
    assert again.intermediate_pem == service.intermediate("factory-a").certificate_pem
    with pytest.raises(Conflict, match="disabled"):
        service.sign_csr(make_csr("dev-2"), "dev-2", intermediate_id="factory-a")
    with pytest.raises(Forbidden) as refused:
        service.sign_csr(csr, "dev-1", intermediate_id="factory-a", allowed_intermediates=["factory-b"])
    assert refused.value.code == "intermediate-not-allowed"


def test_another_process_answers_a_retry_with_the_chain_on_record(service, make_service):
    """A same-CSR retry reaching a process that has signed nothing with the certificate's intermediate (another
    instance, or the same one restarted) reads that intermediate from the ledger: the chain is whole."""
    csr = make_csr("dev-1")
    first = service.sign_csr(csr, "dev-1")
    restarted = make_service("pki", ledger_table_prefix=service.settings.ledger_table_prefix)
    again = restarted.sign_csr(csr, "dev-1")
    assert not again.created and again.record == first.record
    assert again.intermediate_pem == service.intermediate("factory-a").certificate_pem
    assert again.bundle()["certificateChain"] == first.bundle()["certificateChain"]
    device, intermediate = load_chain(again.chain_pem)
    check_device(device, intermediate, "dev-1")


def test_caller_bound_to_intermediates(service):
    service.create_intermediate("factory-b")
    with pytest.raises(Forbidden):
        service.sign_csr(make_csr("dev-1"), "dev-1", intermediate_id="factory-b", allowed_intermediates=["factory-a"])
    issued = service.sign_csr(make_csr("dev-1"), "dev-1", allowed_intermediates=["factory-a"])
    assert issued.record.intermediate_id == "factory-a"


def test_signing_needs_a_root_and_an_intermediate(make_service):
    ca = make_service()
    with pytest.raises(NotFound):
        ca.create_intermediate()
    ca.create_root()
    with pytest.raises(Conflict) as refused:
        ca.sign_csr(make_csr("dev-1"), "dev-1")
    assert "create-ca-intermediate" in refused.value.message
    with pytest.raises(Conflict):
        ca.create_root()


def test_proof_of_possession(service):
    proof = service.prove_root_possession("3E5A2B0C9D8F")
    check_proof_of_possession(load(proof.certificate_pem), load(service.root().certificate_pem), "3E5A2B0C9D8F")
    assert proof.verification_code == "3E5A2B0C9D8F" and not proof.already_verified  # the code it signed
    assert proof.dps["mode"] == "offline"
    with pytest.raises(PkiError):
        service.prove_root_possession("not a code!")


def test_offline_proof_of_possession_is_recorded(service):
    """Offline, the code and the certificate are recorded for DPS, and the root's DPS state keeps the proof."""
    before = service.root().dps
    proof = service.prove_root_possession("3E5A2B0C9D8F")
    assert service.root().dps == {**before, "proofOfPossession": proof.dps}
    recorded = service.dps.documents.get("verifications", "root")
    assert recorded == {
        "certificateName": "root",
        "verificationCode": "3E5A2B0C9D8F",
        "certificate": proof.certificate_pem,
    }


def test_an_expiry_window_out_of_range_names_expiring_within_days(service):
    """The inventory's window is refused under its HTTP name, as the query parameter that carries it."""
    for days in (0, -1, float("nan"), MAX_DAYS + 1, "soon"):
        with pytest.raises(InvalidParameter, match=r"^expiringWithinDays must be "):
            service.expiring_before(days)


def test_an_expiry_window_ends_the_days_asked_from_now(service, clock):
    """expiringWithinDays counts forward from now, a fraction of a day included."""
    for days in (30, 0.5, MAX_DAYS):
        assert service.expiring_before(days) == clock() + timedelta(days=days)


def test_an_expiry_window_lists_the_active_certificates_ending_within_it(service):
    """Certificates run 365 days: a 366-day window lists the active one but not the revoked one unless that
    status is asked for, a 364-day window lists neither, and a listing without a window holds every status."""
    active = service.sign_csr(make_csr("dev-1"), "dev-1").record
    revoked = service.sign_csr(make_csr("dev-2"), "dev-2").record
    service.revoke(revoked.serial)

    def listed(**query) -> set[str]:
        return {record.serial for record in service.certificates(CertificateQuery(**query)).items}

    assert listed(expiring_before=service.expiring_before(366)) == {active.serial}
    assert listed(expiring_before=service.expiring_before(366), status="revoked") == {revoked.serial}
    assert listed(expiring_before=service.expiring_before(364)) == set()
    assert listed() == {active.serial, revoked.serial}


def test_revoked_key_is_never_certified_again(service):
    key = device_key()
    issued = service.sign_csr(make_csr("dev-1", key=key), "dev-1")
    revocation, dps_state = service.revoke(issued.record.serial.lower(), "KeyCompromise")
    record = revocation.record
    assert record.status == "revoked" and record.status_reason == "keyCompromise"
    assert dps_state["mode"] == "offline"
    with pytest.raises(Conflict) as refused:
        service.sign_csr(make_csr("dev-1", key=key), "dev-1")
    assert refused.value.code == "key-revoked"
    assert service.sign_csr(make_csr("dev-1"), "dev-1").created  # a new key is fine


def test_batch_signs_good_csrs_and_reports_bad_ones(service):
    requests = [SignRequest(make_csr(f"dev-{i}"), f"dev-{i}") for i in range(5)]
    requests.insert(2, SignRequest(make_csr("someone-else"), "dev-x"))
    results = service.sign_csrs(requests)
    assert [getattr(r, "code", "ok") for r in results] == ["ok", "ok", "cn-mismatch", "ok", "ok", "ok"]
    assert len(_certs(service)) == 5


def test_two_requests_for_one_device_in_a_batch(service):
    key = device_key()
    results = service.sign_csrs(
        [
            SignRequest(make_csr("dev-1", key=key), "dev-1"),
            SignRequest(make_csr("dev-1", key=key), "dev-1"),
            SignRequest(make_csr("dev-1"), "dev-1"),
        ]
    )
    assert results[0].created and not results[1].created
    assert results[1].record.serial == results[0].record.serial
    assert results[2].code == "device-has-certificate"
    assert len(_certs(service)) == 1


def test_serials_are_accepted_as_openssl_prints_them():
    assert normalize_serial("0a:1B:2c") == "0A1B2C"
    assert normalize_serial("0x0A1B2C") == "0A1B2C"
    assert normalize_serial("a1b2c") == "0A1B2C"


def test_every_issued_certificate_has_a_unique_random_serial(service):
    results = service.sign_csrs([SignRequest(make_csr(f"dev-{i}"), f"dev-{i}") for i in range(200)])
    serials = {r.record.serial for r in results}
    assert len(serials) == 200
    intermediate = load(service.intermediate("factory-a").certificate_pem)
    for result in results:
        check_device(load(result.record.certificate_pem), intermediate, result.record.device_id)


def test_curve_of_ca_keys_is_checked(make_service):
    ca = make_service()
    with pytest.raises(PkiError):
        ca.create_root(curve="P-521")
    assert ca.ledger.get_root() is None
    assert ca.create_root(curve="p-384").record.curve == "P-384"  # the accepted curves are P-256 and P-384


def test_a_factory_bound_to_several_intermediates_uses_its_newest_active_one(service):
    service.create_intermediate("factory-b")
    service.create_intermediate("elsewhere")
    bound = ["factory-b", "factory-a"]
    assert (
        service.sign_csr(make_csr("dev-1"), "dev-1", allowed_intermediates=bound).record.intermediate_id == "factory-b"
    )
    service.set_intermediate_enabled("factory-b", False)
    assert (
        service.sign_csr(make_csr("dev-2"), "dev-2", allowed_intermediates=bound).record.intermediate_id == "factory-a"
    )
    service.set_intermediate_enabled("factory-a", False)
    with pytest.raises(Conflict) as refused:
        service.sign_csr(make_csr("dev-3"), "dev-3", allowed_intermediates=bound)
    assert refused.value.code == "no-active-intermediate"
    assert "ask a CA admin" in refused.value.message and "create-ca-intermediate" not in refused.value.message
    service.set_intermediate_enabled("elsewhere", False)
    with pytest.raises(Conflict, match="create one with create-ca-intermediate"):  # what an admin can do
        service.sign_csr(make_csr("dev-3"), "dev-3")
