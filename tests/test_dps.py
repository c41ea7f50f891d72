"""DPS for real: the adapter's real clients (azure-mgmt's IotDpsClient, the azure-core pipeline of the service
API, DefaultAzureCredential's managed identity) against the HTTPS fake of ARM and the DPS service API."""

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
from azure.functions.queue import QueueMessage
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from shared.api import create_app
from shared.config import Settings
from shared.dps import DpsRefused
from shared.dps.azure import parse_connection_string, sas_token
from shared.errors import CaError, Conflict, Misconfigured
from shared.queues import DPS_REGISTRATIONS, poison_queue, storage_queue

from .conftest import reload_function_app, run_cli
from .csrs import device_key, make_csr
from .fakes.dps import ARM_PATH, MAX_GROUPS, POLICY, TOKEN, Enrollment, FakeDps

CREDENTIAL_ENVIRONMENT = ("REQUESTS_CA_BUNDLE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "AZURE_TOKEN_CREDENTIALS")


@pytest.fixture
def fake_dps(tmp_path, monkeypatch):
    """The fake DPS, trusted and reachable by DefaultAzureCredential's managed identity in this process."""
    fake = FakeDps(tmp_path / "fake-dps")
    for name in CREDENTIAL_ENVIRONMENT:
        monkeypatch.setenv(name, fake.environment()[name])
    yield fake
    fake.close()


def dps_settings(fake: FakeDps, connection_string: bool = True, **more: str) -> dict:
    """Settings overrides (Settings field names) that point a service at `fake`."""
    values = Settings.from_values({**fake.environment(connection_string), **more})
    return {
        name: getattr(values, name)
        for name in (
            "dps_subscription_id",
            "dps_resource_group",
            "dps_name",
            "dps_arm_endpoint",
            "dps_connection_string",
            "dps_allocation_policy",
            "dps_iot_hubs",
            "dps_initial_twin",
        )
    }


@pytest.fixture
def dps_ca(make_service, fake_dps):
    """A CA on real DPS (the fake): a verified root and intermediate factory-a, registered at once."""
    service = make_service(**dps_settings(fake_dps))
    service.create_root()
    service.prove_root_possession()
    service.create_intermediate("factory-a")
    return service


def test_an_issued_certificate_carries_the_devices_own_registration(dps_ca):
    """What a factory line writes into the device beside its certificate: DPS's endpoint, ID scope and the
    device's own registration ID (its CN)."""
    issued = dps_ca.sign_csr(make_csr("sensor-7"), "sensor-7")
    assert issued.dps == {
        "globalEndpoint": "global.azure-devices-provisioning.net",
        "idScope": "0ne00FAKE01",
        "registrationId": "sensor-7",
    }
    again = dps_ca.sign_csr(make_csr("sensor-8"), "sensor-8")
    assert again.dps["registrationId"] == "sensor-8"


@pytest.mark.child_process
def test_the_seeds_whole_flow_through_the_cli(fake_dps, tmp_path):
    home, env = tmp_path / "pki", fake_dps.environment()
    created = run_cli("create-ca-root", home=home, env=env)
    assert created.returncode == 0, created.stderr
    assert b"Uploaded the root to DPS" in created.stdout
    assert fake_dps.certificates["root"].verified is False
    proof = run_cli("proof-ca-root-possession", "--json", home=home, env=env)
    assert proof.returncode == 0, proof.stderr
    document = json.loads(proof.stdout)
    assert document["dps"]["isVerified"] is True and fake_dps.certificates["root"].verified
    assert (tmp_path / f"verification-{document['verificationCode']}.pem").read_text() == document["certificate"]
    again = run_cli("proof-ca-root-possession", home=home, env=env)
    assert again.returncode == 0 and "already verified in DPS; nothing was changed" in again.stdout.decode()
    root_again = run_cli("create-ca-root", home=home, env=env)
    assert root_again.returncode == 1 and b"verified in DPS" in root_again.stderr
    said = run_cli("create-ca-intermediate", "--id", "line-0", home=home, env=env)
    assert b"Registered in DPS as enrollment group line-0 (enabled)." in said.stdout, said.stderr
    intermediate = run_cli("create-ca-intermediate", "--id", "line-1", "--json", home=home, env=env)
    assert intermediate.returncode == 0, intermediate.stderr
    assert json.loads(intermediate.stdout)["dps"]["state"] == "registered"
    assert fake_dps.group_status("line-1") == "enabled"
    out = tmp_path / "device"
    device = run_cli("create-device-cert", "--device-id", "sensor-1", "--out-dir", str(out), home=home, env=env)
    assert device.returncode == 0, device.stderr
    expected = {"globalEndpoint": "global.azure-devices-provisioning.net", "idScope": "0ne00FAKE01"}
    assert json.loads((out / "bundle.json").read_text())["dps"] == {**expected, "registrationId": "sensor-1"}
    assert json.loads((out / "registration.json").read_text()) == {**expected, "registrationId": "sensor-1"}
    assert fake_dps.admits((out / "device.chain.pem").read_text())
    listed = run_cli("list-intermediates", home=home, env=env)
    assert "registered" in listed.stdout.decode()


def test_offline_proof_needs_the_code_and_verified_on_upload_needs_dps(make_service, tmp_path):
    offline = make_service()
    offline.create_root()
    with pytest.raises(CaError, match="give the verification code") as refused:
        offline.prove_root_possession()
    assert refused.value.code == "verification-code-required"
    for code in (None, "ABC123"):  # with or without a code: there is no DPS to upload to, nothing is recorded
        with pytest.raises(CaError, match="needs DPS configured") as refused:
            offline.prove_root_possession(code, verified_on_upload=True)
        assert refused.value.code == "dps-not-configured"
    assert "proofOfPossession" not in offline.root().dps
    home = tmp_path / "cli-home"
    assert run_cli("create-ca-root", home=home).returncode == 0
    result = run_cli("proof-ca-root-possession", home=home)
    assert result.returncode == 1 and b"verification code" in result.stderr


def test_the_proof_does_not_upload_a_registered_root_again(make_service, fake_dps):
    """A root DPS holds unverified is proved as it is: only a root DPS did not take is uploaded by the proof."""
    service = make_service(**dps_settings(fake_dps))
    service.create_root()
    uploads = fake_dps.calls["arm-certificate-put"]
    assert service.prove_root_possession().dps["isVerified"]
    assert fake_dps.calls["arm-certificate-put"] == uploads


def test_verified_on_upload(make_service, fake_dps):
    service = make_service(**dps_settings(fake_dps))
    service.create_root()
    proof = service.prove_root_possession(verified_on_upload=True)
    assert proof.certificate_pem is None and proof.dps["isVerified"]
    assert fake_dps.certificates["root"].verified
    assert service.prove_root_possession().already_verified


@pytest.mark.parametrize("forms", [("quoted",), ("bare",)], ids=["quoted-etags-only", "bare-etags-only"])
def test_arm_etags_quoted_or_bare(tmp_path, monkeypatch, make_service, forms):
    fake = FakeDps(tmp_path / "fake", arm_etag_forms=forms)
    try:
        for name in CREDENTIAL_ENVIRONMENT:
            monkeypatch.setenv(name, fake.environment()[name])
        service = make_service(**dps_settings(fake))
        service.create_root()
        assert service.prove_root_possession().dps["isVerified"]
        if_matches = [
            h.get("if-match") for m, p, h in fake.requests if p.endswith(("/verify", "/generateVerificationCode"))
        ]
        assert if_matches and if_matches[-1].startswith('"') == (forms == ("quoted",))
        assert if_matches[0].startswith('"')  # quoted first, as azure-mgmt 2.1 sends it
    finally:
        fake.close()


def test_a_wrong_proof_is_refused_with_ih400053(dps_ca, fake_dps):
    dps_ca.ledger.set_ca_dps("root", {**dps_ca.root().dps, "isVerified": False})
    fake_dps.certificates["root"].verified = False
    with pytest.raises(DpsRefused, match="IH400053"):
        dps_ca.prove_root_possession("NOTTHECODE")
    # a certificate with the right CN signed by another key: IH400053 too
    fake_dps.certificates["root"].code = "ABC123"
    other = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ABC123")])
    root = x509.load_pem_x509_certificate(dps_ca.root().certificate_pem.encode())
    forged = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject)
        .public_key(other.public_key())
        .serial_number(1)
        .not_valid_before(datetime.now(UTC) - timedelta(minutes=5))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .sign(other, hashes.SHA256())
    )
    etag = fake_dps.certificates["root"].etag
    answer = _request(
        "POST",
        f"https://{fake_dps.host}{ARM_PATH}/certificates/root/verify?api-version=2026-11-01",
        json={"certificate": forged.public_bytes(serialization.Encoding.PEM).decode()},
        headers={"Authorization": f"Bearer {TOKEN}", "If-Match": f'"{etag}"'},
        verify=str(fake_dps.ca_file),
    )
    assert answer.status_code == 400 and answer.json()["code"] == "IH400053"
    assert not fake_dps.certificates["root"].verified


def _request(method: str, url: str, **options):
    """One request to the fake as a client other than the adapter would send it."""
    return requests.request(method, url, **options)  # noqa: S113 (the fake answers from this process)


def _service_api(fake: FakeDps, method: str, path: str, body=None, if_match: str | None = None):
    host, key_name, key = parse_connection_string(fake.connection_string)
    headers = {"Authorization": sas_token(host, key_name, key, int(time.time()) + 60)}
    if if_match:
        headers["If-Match"] = if_match
    return _request(
        method,
        f"https://{fake.host}{path}?api-version=2021-10-01",
        json=body,
        headers=headers,
        verify=str(fake.ca_file),
    )


def test_the_service_api_refuses_what_dps_refuses(dps_ca, fake_dps):
    body = dps_ca.dps.enrollment_group_body("factory-a", dps_ca.intermediate("factory-a").certificate_pem, True)
    no_etag = _service_api(fake_dps, "PUT", "/enrollmentGroups/factory-a", body)
    assert no_etag.status_code == 409 and no_etag.json()["errorCode"] == 409202
    stale = _service_api(fake_dps, "PUT", "/enrollmentGroups/factory-a", body, if_match="stale")
    assert stale.status_code == 412
    got = _service_api(fake_dps, "GET", "/enrollmentGroups/factory-a").json()
    assert "certificate" not in json.dumps(got["attestation"]) and got["attestation"]["x509"]["signingCertificates"]
    fresh = _service_api(fake_dps, "PUT", "/enrollmentGroups/factory-a", body, if_match=got["etag"])
    assert fresh.status_code == 200
    hubs = _service_api(
        fake_dps, "PUT", "/enrollmentGroups/new", {**body, "enrollmentGroupId": "new", "iotHubs": ["h"]}
    )
    assert hubs.status_code == 400 and hubs.json()["errorCode"] == 400004
    bad = _service_api(
        fake_dps, "PUT", "/enrollmentGroups/new", {**body, "enrollmentGroupId": "new", "attestation": {}}
    )
    assert bad.status_code == 400
    forged = _request(
        "GET",
        f"https://{fake_dps.host}/enrollmentGroups/factory-a?api-version=2021-10-01",
        headers={"Authorization": f"SharedAccessSignature sr={fake_dps.host}&sig=x&se=99999999999&skn={POLICY}"},
        verify=str(fake_dps.ca_file),
    )
    assert forged.status_code == 401


def test_per_device_revocation_follows_designs_table(dps_ca, fake_dps):
    first = dps_ca.sign_csr(make_csr("dev-1"), "dev-1")
    assert fake_dps.admits(first.chain_pem) and "dev-1" not in fake_dps.enrollments  # the group admits it
    _, state = dps_ca.revoke(first.record.serial)
    assert state["provisioningStatus"] == "disabled" and "keep their IoT Hub session" in state["message"]
    assert not fake_dps.admits(first.chain_pem)  # blocked, whatever it presents
    second = dps_ca.sign_csr(make_csr("dev-1", key=device_key()), "dev-1")
    assert fake_dps.admits(second.chain_pem)  # re-certifying lifts the block, for the new certificate only
    assert not fake_dps.admits(first.chain_pem)  # the old, revoked one stays refused
    third = dps_ca.sign_csr(make_csr("dev-1", key=device_key()), "dev-1", renew=True)
    assert fake_dps.admits(third.chain_pem) and not fake_dps.admits(second.chain_pem)
    dps_ca.revoke(third.record.serial)
    assert not any(fake_dps.admits(c.chain_pem) for c in (first, second, third))
    other = dps_ca.sign_csr(make_csr("dev-2"), "dev-2")
    assert fake_dps.admits(other.chain_pem)  # another device of the group is untouched


def test_a_stale_device_enrollment_is_read_again(dps_ca, fake_dps):
    issued = dps_ca.sign_csr(make_csr("dev-3"), "dev-3")
    fake_dps.failures["enrollment-put"] = lambda n: 412 if n == 1 else None
    _, state = dps_ca.revoke(issued.record.serial)
    assert state["provisioningStatus"] == "disabled" and not fake_dps.admits(issued.chain_pem)


@pytest.mark.parametrize(("stale", "written"), [(2, True), (3, False)])
def test_a_device_enrollment_is_written_at_most_three_times_against_newer_etags(dps_ca, fake_dps, stale, written):
    """Each write that meets a newer etag reads the ledger and DPS again and writes again: three writes in all."""
    issued = dps_ca.sign_csr(make_csr("dev-3"), "dev-3")
    before = fake_dps.calls["enrollment-put"]
    fake_dps.failures["enrollment-put"] = lambda n: 412 if n - before <= stale else None
    _, state = dps_ca.revoke(issued.record.serial)
    assert fake_dps.calls["enrollment-put"] - before == 3
    if written:
        assert state["provisioningStatus"] == "disabled" and not fake_dps.admits(issued.chain_pem)
    else:
        assert state["mode"] == "failed" and state["error"] == "dps-conflict"


def test_a_blocked_device_is_enrolled_with_its_own_revoked_certificate(dps_ca, fake_dps):
    """Not another device's revoked certificate, nor the device's own superseded one."""
    other = dps_ca.sign_csr(make_csr("dev-other"), "dev-other")
    dps_ca.revoke(other.record.serial)
    dps_ca.sign_csr(make_csr("dev-1"), "dev-1")
    issued = dps_ca.sign_csr(make_csr("dev-1", key=device_key()), "dev-1", renew=True)
    dps_ca.revoke(issued.record.serial)
    blocked = fake_dps.enrollments["dev-1"]
    assert blocked.enabled is False
    assert blocked.certificate == x509.load_pem_x509_certificate(issued.record.certificate_pem.encode())


def test_disable_refuses_signing_until_enabled(dps_ca, fake_dps):
    issued = dps_ca.sign_csr(make_csr("dev-4"), "dev-4")
    result = dps_ca.set_intermediate_enabled("factory-a", False)
    assert fake_dps.group_status("factory-a") == "disabled" and not fake_dps.admits(issued.chain_pem)
    assert any("keep their IoT Hub session" in w for w in result.warnings)
    with pytest.raises(Conflict, match="disabled"):
        dps_ca.sign_csr(make_csr("dev-5"), "dev-5", intermediate_id="factory-a")
    dps_ca.set_intermediate_enabled("factory-a", True)
    assert fake_dps.group_status("factory-a") == "enabled" and fake_dps.admits(issued.chain_pem)
    assert fake_dps.admits(dps_ca.sign_csr(make_csr("dev-5"), "dev-5").chain_pem)
    puts = [h for m, p, h in fake_dps.requests if m == "PUT" and p == "/enrollmentGroups/factory-a"]
    assert all("if-match" in h for h in puts[1:])  # every update carries the etag of the GET before it


@pytest.mark.parametrize(("enabled", "status", "verb"), [(False, "disabled", "disable"), (True, "active", "enable")])
def test_dps_failing_during_disable_or_enable_keeps_the_ledgers_change_and_says_so(
    dps_ca, fake_dps, enabled, status, verb
):
    if enabled:
        dps_ca.set_intermediate_enabled("factory-a", False)
    fake_dps.failures["group-put"] = lambda n: 503
    result = dps_ca.set_intermediate_enabled("factory-a", enabled)
    record = dps_ca.intermediate("factory-a")
    assert record.status == status and result.record == record
    (warning,) = result.warnings
    assert warning.startswith(f"signing is {verb}d, but DPS's enrollment group was not updated")
    assert warning.endswith(f"run {verb}-intermediate factory-a again")
    assert record.dps["provisioningStatus"] is None  # DPS's state is unknown until the command runs again
    assert "DPS answered 503" in record.dps["error"] and record.dps["message"] == warning


def test_the_hundred_group_limit_is_named(dps_ca, fake_dps):
    template = fake_dps.groups["factory-a"]
    for n in range(MAX_GROUPS - 1):
        fake_dps.groups[f"filler-{n}"] = Enrollment(f"filler-{n}", template.body, template.certificate, "e", True)
    result = dps_ca.create_intermediate("one-too-many")
    assert result.record.dps["state"] == "failed" and "at most 100 enrollment groups" in result.record.dps["error"]
    assert result.warnings and "retry-dps one-too-many" in result.warnings[0]


def test_group_settings_reach_dps(make_service, fake_dps):
    twin = '{"tags": {"line": "a"}}'
    settings = dps_settings(
        fake_dps,
        connection_string=False,
        DPS_ALLOCATION_POLICY="static",
        DPS_IOT_HUBS="hub-a.azure-devices.net",
        DPS_INITIAL_TWIN=twin,
    )
    service = make_service(**settings)
    service.create_root()
    service.create_intermediate("factory-b")
    body = fake_dps.groups["factory-b"].body
    assert body["allocationPolicy"] == "static" and body["iotHubs"] == ["hub-a.azure-devices.net"]
    assert body["initialTwin"] == {"tags": {"line": "a"}}
    assert any(
        h.get("authorization") == f"Bearer {TOKEN}"
        for m, p, h in fake_dps.requests
        if p == "/enrollmentGroups/factory-b"
    )


@pytest.mark.parametrize("given, spelled", [("GEOLATENCY", "geoLatency"), ("Hashed", "hashed"), ("static", "static")])
def test_the_allocation_policy_is_read_in_any_case_and_sent_as_dps_spells_it(given, spelled):
    named = {"AZURE_SUBSCRIPTION_ID": "s", "RESOURCE_GROUP_NAME": "r", "DPS_NAME": "d"}
    settings = Settings.from_values({**named, "DPS_ALLOCATION_POLICY": given, "DPS_IOT_HUBS": "hub-a"})
    assert settings.dps_config().allocation_policy == spelled


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"AZURE_SUBSCRIPTION_ID": "s", "DPS_NAME": "d"}, "RESOURCE_GROUP_NAME"),
        ({"DPS_IOT_HUBS": "h"}, "DPS_ALLOCATION_POLICY"),
        ({"DPS_ALLOCATION_POLICY": "random"}, "must be one of"),
        ({"DPS_ALLOCATION_POLICY": "custom"}, "webhook"),
        ({"DPS_INITIAL_TWIN": "[1]"}, "JSON object"),
        ({"DPS_INITIAL_TWIN": "{"}, "JSON object"),
    ],
    ids=[
        "half-named",
        "hubs-without-policy",
        "unknown-policy",
        "custom-without-webhook",
        "twin-not-object",
        "twin-not-json",
    ],
)
def test_dps_settings_are_checked(values, problem):
    named = {"AZURE_SUBSCRIPTION_ID": "s", "RESOURCE_GROUP_NAME": "r", "DPS_NAME": "d"}
    settings = Settings.from_values({**(named if "DPS_NAME" not in values else {}), **values})
    with pytest.raises(Misconfigured, match=problem):
        settings.dps_configured and settings.dps_config()
    with pytest.raises(Misconfigured, match="SharedAccessKey"):
        parse_connection_string("HostName=x")


def test_the_bundle_goes_without_dps_data_while_the_resource_cannot_be_read(make_service, fake_dps):
    service = make_service(**dps_settings(fake_dps))
    service.create_root()
    service.create_intermediate("factory-a")
    fake_dps.failures["arm-resource"] = lambda n: 500
    issued = service.sign_csr(make_csr("dev-6"), "dev-6")
    assert issued.dps is None and service.ledger.get_certificate(issued.record.serial) is not None


def test_the_proof_route_and_retry_route(dps_ca, fake_dps):
    client = TestClient(create_app(dps_ca))
    admin = {"Authorization": f"Bearer {dps_ca.principals.create_admin_key().secret}"}
    answer = client.post("/api/ca/root/proof-of-possession", headers=admin)
    assert answer.status_code == 200 and answer.json()["alreadyVerified"] is True
    fake_dps.failures["group-get"] = lambda n: 503
    created = client.post("/api/ca/intermediates", json={"id": "factory-c"}, headers=admin)
    assert created.status_code == 201 and created.json()["dps"]["state"] == "failed"
    del fake_dps.failures["group-get"]
    retried = client.post("/api/ca/intermediates/factory-c/retry-dps", headers=admin)
    assert retried.status_code == 200 and retried.json()["dps"]["state"] == "registered"
    assert fake_dps.group_status("factory-c") == "enabled"


def test_registration_through_the_queue_function(tmp_path, monkeypatch, fake_dps, queue_settings):
    """DPS down: the intermediate stays pending, its message is delivered again and again, is poisoned and
    marks it failed with DPS's error; retry-dps queues it again and the queue function registers it."""
    home = tmp_path / "pki"
    environment = {**fake_dps.environment(), **queue_settings, "PKI_HOME": str(home)}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    module = reload_function_app()
    functions = {f.get_function_name(): f for f in module.app.get_functions()}
    trigger = functions["dps_registration"].get_trigger()
    assert trigger.queue_name == DPS_REGISTRATIONS and trigger.connection == "QUEUE_STORAGE"
    assert functions["dps_registration_poisoned"].get_trigger().queue_name == poison_queue(DPS_REGISTRATIONS)
    service = module.queue_service()
    service.create_root()
    fake_dps.failures["group-put"] = lambda n: 503
    result = service.create_intermediate("queued-1")
    assert result.record.dps["state"] == "pending" and "queued" in result.warnings[0]
    assert "queued-1" not in fake_dps.groups
    settings = Settings.load()
    queue, poison = storage_queue(settings, DPS_REGISTRATIONS), storage_queue(settings, poison_queue(DPS_REGISTRATIONS))
    register = functions["dps_registration"].get_user_function()
    for delivery in range(1, 6):  # host.json maxDequeueCount
        if delivery > 1:
            time.sleep(1.2)  # the failed delivery becomes visible again, as the host leaves it
        (raw,) = queue.receive(max_messages=1, visibility_timeout=1 if delivery < 5 else 30)
        message = QueueMessage(id=raw.id, body=raw.content.encode(), dequeue_count=raw.dequeue_count)
        assert message.dequeue_count == delivery
        with pytest.raises(Exception, match="DPS answered 503"):
            register(message)
        assert service.intermediate("queued-1").dps["state"] == "pending"
    queue.delete(raw)
    poison.send(raw.content)  # what the host does after the fifth failure
    (poisoned,) = poison.receive(max_messages=1)
    functions["dps_registration_poisoned"].get_user_function()(
        QueueMessage(id=poisoned.id, body=poisoned.content.encode(), dequeue_count=1)
    )
    failed = service.intermediate("queued-1").dps
    assert failed["state"] == "failed" and "503" in failed["error"]
    del fake_dps.failures["group-put"]
    retried = run_cli("retry-dps", "queued-1", home=home, env=environment)
    assert retried.returncode == 0 and b"pending" in retried.stdout, retried.stderr
    (again,) = queue.receive(max_messages=1)
    register(QueueMessage(id=again.id, body=again.content.encode(), dequeue_count=1))
    assert service.intermediate("queued-1").dps["state"] == "registered"
    assert fake_dps.group_status("queued-1") == "enabled"
    module.queue_service().close()


def test_registration_messages_are_checked(dps_ca):
    assert dps_ca.handle_dps_registration("not json") is None
    assert dps_ca.handle_dps_registration_poisoned('{"intermediateId": ""}') is None
    assert dps_ca.handle_dps_registration_poisoned('{"intermediateId": "factory-a"}').dps["state"] == "registered"


def test_a_sas_token_names_its_host_and_expiry():
    key = base64.b64encode(b"k" * 32).decode()
    token = sas_token("Example.azure-devices-provisioning.net", "owner", key, 1700000000)
    assert token.startswith("SharedAccessSignature sr=example.azure-devices-provisioning.net&sig=")
    assert token.endswith("&se=1700000000&skn=owner")


def test_a_root_dps_did_not_take_is_uploaded_by_the_proof(make_service, fake_dps):
    service = make_service(**dps_settings(fake_dps))
    fake_dps.failures["arm-certificate-put"] = lambda n: 503 if n <= 4 else None  # ARM's client retries 3 times
    result = service.create_root()
    assert result.record.dps["state"] == "failed" and "run proof-ca-root-possession" in result.warnings[0]
    assert "root" not in fake_dps.certificates
    proof = service.prove_root_possession()
    assert proof.dps["isVerified"] and fake_dps.certificates["root"].verified


def test_dps_out_of_reach_is_a_backend_error_and_registration_says_so(make_service, fake_dps):
    service = make_service(**dps_settings(fake_dps, connection_string=False))
    fake_dps.failures["token"] = lambda n: 500
    result = service.create_root()
    assert result.record.dps["state"] == "failed" and "dps-credential" in result.warnings[0]
    fake_dps.failures.clear()
    service = make_service("second", **dps_settings(fake_dps))  # a new process: the credential gave up on it
    service.create_root()
    fake_dps.failures["group-put"] = lambda n: 500
    created = service.create_intermediate("factory-z")
    assert created.record.dps["state"] == "failed" and "DPS answered 500" in created.record.dps["error"]
    import argparse

    import cli

    args = argparse.Namespace(id="factory-z")  # retry-dps while DPS still fails: the CLI must not exit 0
    _, text = cli.retry_dps(service, args)
    assert args.exit_status == cli.EXIT_ERROR and "DPS state failed" in text
    fake_dps.failures.clear()
    args = argparse.Namespace(id="factory-z")
    _, text = cli.retry_dps(service, args)
    assert getattr(args, "exit_status", 0) == 0 and "DPS state registered" in text


def test_a_registration_that_cannot_be_queued_is_failed_and_says_retry(dps_ca, queue_settings):
    settings = Settings.from_values(queue_settings)
    dps_ca.dps_registrations = storage_queue(settings, "Not_A_Queue_Name")  # a name Queue Storage refuses
    result = dps_ca.create_intermediate("factory-q")
    assert result.record.dps["state"] == "failed" and "retry-dps factory-q" in result.warnings[0]


@pytest.mark.parametrize(
    ("operation", "status", "plain", "expected"),
    [
        ("group-put", 412, False, "kept changing"),  # every write meets a newer etag
        ("group-put", 400, True, "400"),  # an error body that is not JSON
        ("group-get", None, False, "not a JSON object"),  # a 200 that is not DPS's answer
    ],
    ids=["etag-always-stale", "plain-text-error", "not-json"],
)
def test_dps_answers_that_are_not_a_registration(dps_ca, fake_dps, operation, status, plain, expected):
    if status is None:
        fake_dps.garbage.add(operation)
    else:
        fake_dps.failures[operation] = lambda n: status
    fake_dps.plain_failures = plain
    result = dps_ca.create_intermediate("factory-x")
    assert result.record.dps["state"] == "failed" and expected in result.record.dps["error"]


def test_a_dps_that_is_not_there(make_service, fake_dps, tmp_path):
    service = make_service(**{**dps_settings(fake_dps), "dps_name": "no-such-dps"})
    result = service.create_root()
    assert result.record.dps["state"] == "failed" and "was not found" in result.record.dps["error"]
    assert service.sign_csr  # the CA itself works: DPS is kept in step, not in the way
    with pytest.raises(DpsRefused, match="no CA certificate named"):
        service.dps.verification_code("root")
    assert service.dps.registration_info("dev-1") is None
    assert service.backends()["dps"] == {
        "backend": "azure",
        "subscription": dps_settings(fake_dps)["dps_subscription_id"],
        "resourceGroup": dps_settings(fake_dps)["dps_resource_group"],
        "name": "no-such-dps",
    }
    assert service.dps.backup_into(tmp_path) is None


def test_individual_enrollments_carry_the_allocation_settings(make_service, fake_dps):
    settings = dps_settings(fake_dps, DPS_ALLOCATION_POLICY="static", DPS_IOT_HUBS="hub-a.azure-devices.net")
    service = make_service(**settings)
    service.create_root()
    service.create_intermediate("factory-a")
    issued = service.sign_csr(make_csr("dev-7"), "dev-7")
    service.revoke(issued.record.serial)
    body = fake_dps.enrollments["dev-7"].body
    assert body["allocationPolicy"] == "static" and body["iotHubs"] == ["hub-a.azure-devices.net"]
    assert body["provisioningStatus"] == "disabled"


def another_process(make_service, fake_dps, first):
    """A second service on the same PKI home and ledger as `first`, with its own DPS adapter: another process."""
    return make_service(**dps_settings(fake_dps), ledger_table_prefix=first.settings.ledger_table_prefix)


@pytest.mark.child_process
def test_two_processes_keeping_one_device_in_step_end_as_the_ledger_says(dps_ca, fake_dps, make_service):
    """Process A puts DPS in step from the ledger as it read it; process B revokes the active certificate in
    between. The enrollment's etag must make A's stale write fail and A decide again: DPS ends blocked."""
    other = another_process(make_service, fake_dps, dps_ca)
    first = dps_ca.sign_csr(make_csr("dev-race"), "dev-race")
    dps_ca.revoke(first.record.serial)
    second = dps_ca.sign_csr(make_csr("dev-race", key=device_key()), "dev-race")
    assert fake_dps.admits(second.chain_pem)
    reads = fake_dps.calls["enrollment-get"]

    def b_revokes_in_between(n: int) -> None:
        if n == reads + 1:  # A's read: B revokes the active certificate and writes DPS, all of it now
            other.revoke(second.record.serial)

    fake_dps.failures["enrollment-get"] = b_revokes_in_between
    dps_ca.revoke(first.record.serial)  # A: revoking again puts DPS in step
    assert dps_ca.certificate(second.record.serial).status == "revoked"
    assert not fake_dps.admits(second.chain_pem) and fake_dps.enrollments["dev-race"].enabled is False


def test_a_queued_registration_never_undoes_a_disable(dps_ca, fake_dps, make_service):
    """The registration message of an intermediate is handled while an admin disables it in another process:
    the group must end disabled, as the ledger says."""
    other = another_process(make_service, fake_dps, dps_ca)
    reads = fake_dps.calls["group-get"]

    def disabled_in_between(n: int) -> None:
        if n == reads + 1:
            other.set_intermediate_enabled("factory-a", False)

    fake_dps.failures["group-get"] = disabled_in_between
    dps_ca.handle_dps_registration(json.dumps({"intermediateId": "factory-a"}))
    assert dps_ca.intermediate("factory-a").status == "disabled"
    assert fake_dps.group_status("factory-a") == "disabled"


def test_dps_failing_during_a_revocation_leaves_the_revocation_and_revoking_again_repairs(dps_ca, fake_dps):
    issued = dps_ca.sign_csr(make_csr("dev-down"), "dev-down")
    fake_dps.failures["enrollment-put"] = lambda n: 503
    revocation, state = dps_ca.revoke(issued.record.serial)
    assert revocation.record.status == "revoked" and state["mode"] == "failed"
    assert "DPS was not updated" in state["message"] and f"revoke {issued.record.serial} again" in state["message"]
    assert POLICY not in json.dumps(state) and fake_dps.key not in json.dumps(state)
    assert fake_dps.admits(issued.chain_pem)  # DPS's group still admits it: what the answer warns of
    del fake_dps.failures["enrollment-put"]
    _, repaired = dps_ca.revoke(issued.record.serial)
    assert repaired["provisioningStatus"] == "disabled" and not fake_dps.admits(issued.chain_pem)


def test_the_repair_names_a_revoked_certificate_of_the_device_itself(dps_ca, fake_dps):
    """The serial to revoke again is the device's own revoked one: not another device's revoked certificate,
    nor the device's superseded one."""
    other = dps_ca.sign_csr(make_csr("dev-other"), "dev-other")
    dps_ca.revoke(other.record.serial)
    dps_ca.sign_csr(make_csr("dev-down"), "dev-down")
    renewed = dps_ca.sign_csr(make_csr("dev-down", key=device_key()), "dev-down", renew=True)
    fake_dps.failures["enrollment-put"] = lambda n: 503
    _, state = dps_ca.revoke(renewed.record.serial)
    assert state["mode"] == "failed"
    assert state["message"].endswith(
        f"run revoke {renewed.record.serial} again (it changes nothing else) to put DPS in step"
    )


@pytest.mark.parametrize("body", ["not json", '{"intermediateId": "no-such"}', '{"intermediateId": "root"}', "[]"])
def test_a_registration_message_that_can_never_succeed_is_dropped_at_once(dps_ca, body):
    """Delivering it again cannot help: it is dropped (logged) instead of failing five times into poison."""
    assert dps_ca.handle_dps_registration(body) is None


def test_dps_failing_when_a_revoked_device_is_recertified_says_how_to_repair(dps_ca, fake_dps):
    """The new certificate is issued (the ledger holds it) but DPS still blocks the device: the warning names
    the serial whose revocation, run again, writes DPS from the ledger, and doing so admits the new one."""
    first = dps_ca.sign_csr(make_csr("dev-again"), "dev-again")
    dps_ca.revoke(first.record.serial)
    fake_dps.failures["enrollment-put"] = lambda n: 503
    second = dps_ca.sign_csr(make_csr("dev-again", key=device_key()), "dev-again")
    assert not fake_dps.admits(second.chain_pem)
    (warning,) = [w for w in second.warnings if "DPS was not updated" in w]
    assert f"run revoke {first.record.serial} again" in warning
    del fake_dps.failures["enrollment-put"]
    dps_ca.revoke(first.record.serial)
    assert fake_dps.admits(second.chain_pem) and not fake_dps.admits(first.chain_pem)


def test_the_dps_shared_access_key_is_never_shown(dps_ca, fake_dps):
    """The connection string's key stays out of every repr that a log or traceback could print."""
    assert fake_dps.key not in repr(dps_ca.dps.config) and fake_dps.key not in repr(dps_ca.settings)
    assert fake_dps.key not in json.dumps(dps_ca.dps.describe())


def test_the_ports_device_calls_write_an_individual_enrollment(dps_ca, fake_dps):
    issued = dps_ca.sign_csr(make_csr("dev-port"), "dev-port")
    assert dps_ca.dps.disable_device("dev-port", issued.record.certificate_pem)["provisioningStatus"] == "disabled"
    assert not fake_dps.admits(issued.chain_pem)
    assert dps_ca.dps.admit_only("dev-port", issued.record.certificate_pem)["provisioningStatus"] == "enabled"
    assert fake_dps.admits(issued.chain_pem)
