"""The Key Vault backend: the real azure-keyvault clients against a fake vault at the HTTP level."""

import asyncio
import email.utils
import json
import re
import subprocess
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import requests
from azure.core.exceptions import HttpResponseError
from azure.keyvault.certificates._shared import http_challenge_cache as certificate_challenges
from azure.keyvault.keys import KeyType, KeyVaultKey
from azure.keyvault.keys._shared import http_challenge_cache as keys_challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

import cli
from shared.api import create_app
from shared.composition import build_service
from shared.config import Settings
from shared.dps.offline import OfflineDps
from shared.errors import BackendUnavailable, CaError, Conflict, Misconfigured
from shared.keys import keyvault
from shared.keys.keyvault import KeyVaultKeyStore, KeyVaultOptions, KeyVaultSigningKey, SignPacer, VaultGate
from shared.ledger.models import CertificateQuery
from shared.ledger.sqlite import SqliteLedger
from shared.service import DeviceCA, SignRequest

from .certrules import check_device, check_intermediate, check_root, load
from .conftest import close_checked
from .csrs import device_key, make_csr
from .fakes.keyvault import VAULT_URL, FakeCredential, FakeKeyVault
from .tls import device_context, handshake, make_server_identity, server_context

QUICK = KeyVaultOptions(first_retry_delay=0.01, max_retry_delay=0.05, retry_seconds=5)


@pytest.fixture
def vault_ca(tmp_path):
    """Build a CA whose keys live in a fake vault; returns (service, vault, credential)."""
    made = []

    def make(vault: FakeKeyVault | None = None, options: KeyVaultOptions = QUICK, **settings):
        # the SDKs cache a vault's bearer challenge process-wide: each fake vault starts with none, as a new
        # process meets a real vault
        keys_challenges.clear()
        certificate_challenges.clear()
        vault = vault or FakeKeyVault()
        credential = FakeCredential()
        home = tmp_path / f"pki-{len(made)}"
        keys = KeyVaultKeyStore(VAULT_URL, credential, options, session=vault.session())
        service = DeviceCA(
            keys, SqliteLedger(home / "ledger.sqlite3"), OfflineDps(home), replace(Settings(pki_home=home), **settings)
        )
        made.append(service)
        return service, vault, credential

    yield make
    close_checked(made)


def _hierarchy(service: DeviceCA, curve: str = "P-256"):
    service.create_root(curve=curve)
    service.create_intermediate("vault-int", curve=curve)
    return load(service.root().certificate_pem), load(service.intermediate("vault-int").certificate_pem)


def _count(service: DeviceCA) -> int:
    return len(service.ledger.list_certificates(CertificateQuery(limit=1000)).items)


def test_hierarchy_in_the_vault_follows_the_rules_and_works_in_tls(vault_ca, tmp_path):
    service, vault, credential = vault_ca()
    root, intermediate = _hierarchy(service)
    check_root(root)
    check_intermediate(intermediate, root)
    key = device_key()
    issued = service.sign_csr(make_csr("vault-device", key=key), "vault-device")
    check_device(load(issued.record.certificate_pem), intermediate, "vault-device")
    assert service.root().key_backend == "keyvault"

    hub_ca, hub_cert, hub_key = make_server_identity(tmp_path / "hub")
    (tmp_path / "root.pem").write_text(service.root().certificate_pem)
    (tmp_path / "chain.pem").write_text(issued.chain_pem)
    (tmp_path / "device.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    result = handshake(
        server_context(tmp_path / "root.pem", hub_cert, hub_key),
        device_context(hub_ca, tmp_path / "chain.pem", tmp_path / "device.key"),
    )
    assert result.ok and result.peer_common_name == "vault-device", result

    assert vault.unauthenticated >= 1  # the bearer challenge came first
    assert set(credential.scopes) == {("https://vault.azure.net/.default",)}
    assert vault.sign_algorithms == ["ES256", "ES256", "ES256"]  # root, intermediate, device


def test_the_vault_lists_its_ca_certificates_with_their_expiry(vault_ca):
    service, _, _ = vault_ca()
    root, intermediate = _hierarchy(service)
    expiries = service.keys.certificate_expiries()
    assert expiries == {
        service.root().key_name: root.not_valid_after_utc,
        service.intermediate("vault-int").key_name: intermediate.not_valid_after_utc,
    }


def test_the_private_keys_stay_in_the_vault(vault_ca):
    service, vault, _ = vault_ca()
    _hierarchy(service)
    signer = service.keys.signing_key(service.root().key_name)
    assert isinstance(signer, KeyVaultSigningKey)
    with pytest.raises(NotImplementedError, match="never leaves the vault"):
        signer.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    with pytest.raises(NotImplementedError, match="never leaves the vault"):
        signer.private_numbers()
    assert not list(service.settings.pki_home.glob("keys/*"))  # nothing of the CA keys on this machine
    statuses = {path for _, path, _ in vault.statuses}
    assert all("/secrets/" not in path for path in statuses)  # never asked for the certificate's secret


def test_root_has_ca_true_though_key_vaults_csr_asked_for_ca_false(vault_ca):
    service, vault, _ = vault_ca()
    root, _ = _hierarchy(service)
    vault_csr = x509.load_der_x509_csr(vault.csrs[service.root().key_name])
    assert vault_csr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    check_root(root)


def test_p384_ca_keys_sign_with_es384(vault_ca):
    service, vault, _ = vault_ca()
    root, intermediate = _hierarchy(service, curve="P-384")
    issued = service.sign_csr(make_csr("dev-384"), "dev-384")
    assert vault.sign_algorithms == ["ES384", "ES384", "ES384"]
    assert load(issued.record.certificate_pem).signature_hash_algorithm.name == "sha384"
    check_intermediate(intermediate, root)


def test_a_429_without_retry_after_is_retried(vault_ca):
    service, vault, _ = vault_ca()
    _hierarchy(service)
    calls_before = vault.sign_calls
    vault.sign_failures = lambda n: 429 if n == calls_before + 1 else None
    issued = service.sign_csr(make_csr("dev-1"), "dev-1")
    assert issued.created
    sign_answers = [status for method, path, status in vault.statuses if path.endswith("/sign")]
    assert sign_answers[-2:] == [429, 200]
    assert "Retry-After" not in vault.failure_headers


def test_retry_after_is_honoured_on_transient_errors(vault_ca):
    service, vault, _ = vault_ca(FakeKeyVault(failure_headers={"Retry-After": "0"}))
    _hierarchy(service)
    calls_before = vault.sign_calls
    vault.sign_failures = lambda n: 503 if n <= calls_before + 2 else None
    assert service.sign_csr(make_csr("dev-1"), "dev-1").created
    assert [s for _, p, s in vault.statuses if p.endswith("/sign")][-3:] == [503, 503, 200]


def _in_seconds(seconds: int) -> str:
    return email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


@pytest.mark.parametrize(
    ("header", "told"),
    [("7", {7}), (None, {1}), ("soon", {1}), ("-3", {1}), ("", {1})],
    ids=["seconds", "absent", "unparseable", "negative", "empty"],
)
def test_retry_after_decides_the_wait_in_each_form(vault_ca, header, told):
    """A vault that keeps answering 503: a Retry-After longer than the retry budget is passed on to the
    caller at once, after one call; absent or unreadable, the gate backs off by itself within the budget."""
    options = replace(QUICK, retry_seconds=0.3)
    headers = {"Retry-After": header} if header is not None else {}
    service, vault, _ = vault_ca(FakeKeyVault(failure_headers=headers), options=options)
    _hierarchy(service)
    vault.sign_failures = lambda n: 503
    before = vault.sign_calls
    with pytest.raises(BackendUnavailable) as raised:
        service.sign_csr(make_csr("dev-1"), "dev-1")
    assert raised.value.retry_after in told
    assert (vault.sign_calls - before == 1) == (header == "7")


def test_retry_after_as_an_http_date(vault_ca):
    options = replace(QUICK, retry_seconds=0.3)
    service, vault, _ = vault_ca(FakeKeyVault(failure_headers={"Retry-After": _in_seconds(30)}), options=options)
    _hierarchy(service)
    vault.sign_failures = lambda n: 503
    before = vault.sign_calls
    with pytest.raises(BackendUnavailable) as raised:
        service.sign_csr(make_csr("dev-1"), "dev-1")
    assert 25 <= raised.value.retry_after <= 30 and vault.sign_calls - before == 1


def test_a_vault_that_keeps_failing_gives_a_clear_error_and_no_ledger_row(vault_ca):
    options = replace(QUICK, retry_seconds=0.3)
    service, vault, _ = vault_ca(options=options)
    _hierarchy(service)
    vault.sign_failures = lambda n: 503
    with pytest.raises(BackendUnavailable) as raised:
        service.sign_csr(make_csr("dev-1"), "dev-1")
    assert raised.value.code == "key-vault-unavailable" and "Key Vault unavailable" in raised.value.message
    said = re.search(r"signing kept failing for (\d+\.\d) s \(last answer: 503 Error\)", raised.value.message)
    assert said and float(said[1]) <= 0.3, raised.value.message  # how long, within the budget, and what it got
    assert _count(service) == 0

    admin = service.principals.create_admin_key().secret
    client = TestClient(create_app(service), raise_server_exceptions=False)
    response = client.post(
        "/api/devices/dev-2/certificate",
        content=make_csr("dev-2"),
        headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/pkcs10"},
    )
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "key-vault-unavailable"
    assert _count(service) == 0


def test_missing_permission_names_the_roles(vault_ca):
    service, vault, _ = vault_ca()
    _hierarchy(service)
    vault.sign_failures = lambda n: 403
    with pytest.raises(Misconfigured, match=r"Key Vault refused to sign: .*Key Vault Crypto User"):
        service.sign_csr(make_csr("dev-1"), "dev-1")
    assert vault.sign_calls == 3  # root and intermediate, then one try: a refusal is not retried
    assert _count(service) == 0


def test_hsm_keys_need_a_premium_vault(vault_ca):
    service, _, _ = vault_ca(FakeKeyVault(premium=False))
    with pytest.raises(CaError, match="Premium"):
        service.create_root()
    software, vault, _ = vault_ca(FakeKeyVault(premium=False), options=replace(QUICK, hardware_protected=False))
    software.create_root()
    assert vault.certificates[software.root().key_name].policy["key_props"]["kty"] == "EC"
    assert vault.certificates[software.root().key_name].policy["key_props"]["exportable"] is False


def test_many_certificates_are_signed_concurrently(vault_ca):
    service, vault, _ = vault_ca(FakeKeyVault(sign_latency=0.01), options=replace(QUICK, sign_rate=None))
    _hierarchy(service)
    results = service.sign_csrs([SignRequest(make_csr(f"dev-{n}"), f"dev-{n}") for n in range(64)])
    assert all(result.created for result in results)
    assert vault.most_in_flight > 1
    intermediate = load(service.intermediate("vault-int").certificate_pem)
    for result in results:
        check_device(load(result.record.certificate_pem), intermediate, result.record.device_id)


def test_signs_in_flight_are_as_many_as_the_setting_allows(vault_ca):
    """KEY_VAULT_PARALLEL_SIGNS (parallel_signatures) is the number of Key Vault signs in flight for a run of
    several certificates: two plans are signed at once, and six never more than two at a time. (Each sign
    waits at the fake vault for a second one, so two at once is seen whatever the threads' timing.)"""
    options = replace(QUICK, sign_rate=None, parallel_signatures=2)
    service, vault, _ = vault_ca(options=options)
    _hierarchy(service)
    vault.signs_meet = 2
    for devices in (2, 6):
        vault.most_in_flight = 0
        results = service.sign_csrs(
            [SignRequest(make_csr(f"dev-{devices}-{n}"), f"dev-{devices}-{n}") for n in range(devices)]
        )
        assert all(result.created for result in results)
        assert vault.most_in_flight == 2, devices


def test_the_cli_and_http_commands_work_unchanged(vault_ca):
    service, _, _ = vault_ca()
    parser = cli.build_parser()
    for argv in (["create-ca-root", "--json"], ["create-ca-intermediate", "--id", "from-cli", "--json"]):
        args = parser.parse_args(argv)
        document, _ = args.handler(service, args)
        assert document["keyBackend"] == "keyvault"
    admin = service.principals.create_admin_key().secret
    client = TestClient(create_app(service), raise_server_exceptions=False)
    headers = {"Authorization": f"Bearer {admin}"}
    created = client.post("/api/ca/intermediates", json={"id": "from-http", "curve": "P-384"}, headers=headers)
    assert created.status_code == 201 and created.json()["keyBackend"] == "keyvault"
    root = load(service.root().certificate_pem)
    check_intermediate(load(created.json()["certificate"]), root)
    response = client.post(
        "/api/devices/dev-http/certificate?intermediateId=from-http",
        content=make_csr("dev-http"),
        headers={**headers, "Content-Type": "application/pkcs10"},
    )
    assert response.status_code == 201, response.text
    check_device(load(response.json()["certificate"]), load(created.json()["certificate"]), "dev-http")
    assert client.get("/api/health", headers=headers).json()["backends"]["keys"] == "keyvault"


def test_the_chain_verifies_with_openssl(vault_ca, tmp_path):
    service, _, _ = vault_ca()
    _hierarchy(service)
    issued = service.sign_csr(make_csr("dev-1"), "dev-1")
    (tmp_path / "root.pem").write_text(service.root().certificate_pem)
    (tmp_path / "int.pem").write_text(issued.intermediate_pem)
    (tmp_path / "dev.pem").write_text(issued.record.certificate_pem)
    command = ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "int.pem", "dev.pem"]
    assert subprocess.run(command, cwd=tmp_path, capture_output=True, check=False).returncode == 0


def test_settings_choose_key_vault_with_the_default_credential(tmp_path):
    settings = Settings.from_values({"PKI_HOME": str(tmp_path), "KEY_VAULT_URL": VAULT_URL})
    service = build_service(settings)
    try:
        assert isinstance(service.keys, KeyVaultKeyStore)
        assert type(service.keys._credential).__name__ == "DefaultAzureCredential"
        assert service.keys.options.hardware_protected and service.keys.options.sign_rate == 200
    finally:
        service.close()
    software = Settings.from_values({"KEY_VAULT_URL": VAULT_URL, "KEY_VAULT_KEY_TYPE": "EC"}).key_vault_options()
    assert not software.hardware_protected and software.sign_rate == 400
    unpaced = Settings.from_values({"KEY_VAULT_URL": VAULT_URL, "KEY_VAULT_SIGN_RATE": "0"}).key_vault_options()
    assert unpaced.sign_rate is None
    with pytest.raises(Misconfigured):
        Settings.from_values({"KEY_VAULT_KEY_TYPE": "RSA"})
    assert json.loads(json.dumps(service.keys.describe()))["keyType"] == "EC-HSM"


@pytest.mark.parametrize(
    "url",
    [
        "https://ops:hunter2@device-ca.vault.azure.net/",  # would be printed by serve and shown by /api/health
        "https://:hunter2@device-ca.vault.azure.net",
        "http://device-ca.vault.azure.net/",
        "https://device-ca.vault.azure.net:8443/",
        "https://device-ca.vault.azure.net/keys/root?hunter2",
        "https://device-ca.vault.azure.net/#hunter2",
        "device-ca.vault.azure.net",
        "https://[hunter2/",
        "https://my vault.vault.azure.net/",
    ],
)
def test_a_key_vault_url_that_is_no_vault_uri_is_refused_without_repeating_it(url):
    with pytest.raises(Misconfigured) as refused:
        Settings.from_values({"KEY_VAULT_URL": url})
    assert refused.value.code == "invalid-setting" and "hunter2" not in refused.value.message
    assert refused.value.message.startswith("setting KEY_VAULT_URL must be a vault's URI, https://<vault>.vault")


def test_a_vault_uri_as_the_portal_shows_it_is_taken_with_or_without_its_slash():
    for url in (VAULT_URL, VAULT_URL + "/", f" {VAULT_URL}/ ", "https://ca.vault.azure.cn/"):
        assert Settings.from_values({"KEY_VAULT_URL": url}).key_vault_url == url.strip()
    assert Settings.from_values({"KEY_VAULT_URL": ""}).key_vault_url is None


def test_the_pacer_slows_down_on_429_and_recovers():
    pacer = SignPacer(200)
    pacer.throttled()
    assert pacer.rate == pytest.approx(140)
    for _ in range(100):
        pacer.throttled()
    assert pacer.rate == pytest.approx(20)  # never below a tenth
    for _ in range(200):
        pacer.succeeded()
    assert pacer.rate == 200


def _sign_calls(vault: FakeKeyVault) -> int:
    return sum(1 for method, path, _ in vault.statuses if method == "POST" and path.endswith("/sign"))


@pytest.mark.parametrize(
    "refusal",
    ["key-revoked", "key-in-use", "device-owned-by-another-factory", "device-has-certificate", "cn-mismatch"],
)
def test_a_refused_request_costs_no_key_vault_signature(vault_ca, refusal):
    """Every refusal is decided before signing: a refused request never spends a Key Vault sign call."""
    service, vault, _ = vault_ca()
    _hierarchy(service)
    service.principals.create_factory("line-1", ["vault-int"])
    service.principals.create_factory("line-2", ["vault-int"])
    key = device_key()
    first = service.sign_csr(
        make_csr("dev-1", key=key), "dev-1", requested_by="line-1", allowed_intermediates=["vault-int"]
    )
    as_line_2 = {"requested_by": "line-2", "allowed_intermediates": ["vault-int"]}
    attempt = {
        "key-revoked": lambda: (service.revoke(first.record.serial), (make_csr("dev-1", key=key), "dev-1", {}))[1],
        "key-in-use": lambda: (make_csr("dev-2", key=key), "dev-2", {}),
        "device-owned-by-another-factory": lambda: (make_csr("dev-1"), "dev-1", as_line_2),
        "device-has-certificate": lambda: (make_csr("dev-1"), "dev-1", {}),
        "cn-mismatch": lambda: (make_csr("dev-9"), "dev-8", {}),
    }[refusal]
    csr, device_id, options = attempt()
    signed_before = _sign_calls(vault)
    with pytest.raises(CaError) as refused:
        service.sign_csr(csr, device_id, **options)
    assert refused.value.code == refusal
    assert _sign_calls(vault) == signed_before


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda key: setattr(key, "enabled", False), "disabled"),
        (lambda key: setattr(key, "expires", int(datetime.now(UTC).timestamp()) - 60), "not valid"),
        (lambda key: setattr(key, "not_before", int(datetime.now(UTC).timestamp()) + 3600), "not valid"),
        (lambda key: setattr(key, "key_ops", ("verify",)), "not permitted"),
    ],
    ids=["disabled", "expired", "not-yet-valid", "no-sign-operation"],
)
def test_a_key_the_vault_will_not_sign_with_is_a_clear_500_and_no_row(vault_ca, change, words):
    service, vault, _ = vault_ca()
    _hierarchy(service)
    change(vault.key(service.intermediate("vault-int").key_name))
    with pytest.raises(Misconfigured) as refused:
        service.sign_csr(make_csr("dev-1"), "dev-1")
    assert refused.value.code == "key-vault-forbidden" and words in refused.value.message
    assert _count(service) == 0


@pytest.mark.parametrize(
    ("operation", "status", "words"),
    [
        ("create", 503, "Key Vault unavailable: could not create certificate device-ca-broken-"),
        ("create", 400, "Key Vault could not create certificate device-ca-broken-"),
        ("merge", 400, "Key Vault could not merge certificate device-ca-broken-"),
        ("get-key", 400, "Key Vault could not get key device-ca-broken-"),
        ("merge", 409, "Key Vault could not merge certificate device-ca-broken-"),
    ],
)
def test_a_failure_anywhere_in_creating_a_ca_leaves_no_record(vault_ca, operation, status, words):
    """The error names the call that failed. A 503 is retried by azure-core before it counts (so only one
    such case: it takes seconds)."""
    service, vault, _ = vault_ca()
    service.create_root()
    vault.failures[operation] = lambda n: status
    with pytest.raises(CaError) as failed:
        service.create_intermediate("broken")
    assert failed.value.message.startswith(words), failed.value.message
    assert failed.value.status == 503 or failed.value.code.startswith("key-vault")
    assert service.ledger.get_ca("broken") is None
    vault.failures.clear()
    assert service.create_intermediate("broken").record.id == "broken"


def test_a_lost_creation_in_key_vault_says_what_was_left_and_how_to_remove_it(vault_ca):
    service, vault, _ = vault_ca()
    service.create_root()
    vault.failures["merge"] = lambda n: 409
    with pytest.raises(CaError) as failed:
        service.create_intermediate("line-1")
    assert failed.value.message.startswith("Key Vault could not merge certificate device-ca-line-1-")
    assert "left in the vault" in failed.value.message
    assert "az keyvault certificate delete --vault-name device-ca-test --name device-ca-line-1-" in failed.value.message


def test_a_key_left_by_a_lost_creation_is_not_kept_for_signing(vault_ca):
    service, _, _ = vault_ca()
    service.create_root()
    name = service.root().key_name
    signer = service.keys.signing_key(name)
    assert service.keys.signing_key(name) is signer  # one client per key while it is in use
    service.keys.delete_ca_key(name)
    assert service.keys.signing_key(name) is not signer


@pytest.mark.parametrize("hardware_protected, key_type", [(False, "EC"), (True, "EC-HSM")])
def test_health_names_the_vault_and_its_key_type(vault_ca, hardware_protected, key_type):
    service, _, _ = vault_ca(options=replace(QUICK, hardware_protected=hardware_protected))
    assert service.keys.describe() == {"backend": "keyvault", "vault": VAULT_URL, "keyType": key_type}


def test_key_vault_calls_never_hold_the_event_loop(vault_ca):
    """The API signs on its event loop's worker threads when Key Vault holds the keys, even with a local
    ledger: a vault round trip on the loop would stall every other request meanwhile."""
    service, vault, _ = vault_ca()
    _hierarchy(service)
    issued = asyncio.run(service.sign_csr_async(make_csr("loop-1"), "loop-1"))
    assert issued.record.device_id == "loop-1" and vault.calls["sign"] >= 1
    assert vault.on_event_loop == []


def test_creating_a_certificate_that_is_pending_is_a_conflict(vault_ca):
    service, _, _ = vault_ca()
    service.keys.create_ca_key("pending-one", "P-256", "Pending One")
    with pytest.raises(CaError) as refused:
        service.keys.create_ca_key("pending-one", "P-256", "Pending One")
    assert refused.value.code == "key-vault-conflict"


def test_the_fake_refuses_an_api_version_key_vault_does_not_know():
    vault = FakeKeyVault()
    answer = vault.session().get(f"{VAULT_URL}/keys/x?api-version=1.0", headers={"Authorization": "Bearer x"})
    assert answer.status_code == 400 and "not recognized" in answer.text


def test_expiries_are_read_across_listing_pages(vault_ca):
    service, vault, _ = vault_ca(FakeKeyVault(page_size=1))
    _hierarchy(service)
    service.create_intermediate("second")
    expiries = service.keys.certificate_expiries()
    assert set(expiries) == {ca.key_name for ca in service.ledger.list_cas()}
    assert vault.calls["list"] == 3


def test_the_pacer_spaces_sign_calls():
    """At 50 signs a second, 11 calls in a row span at least 10 gaps of 20 ms (a lower bound only)."""
    pacer = SignPacer(50)
    started = time.monotonic()
    for _ in range(11):
        pacer.wait()
    assert time.monotonic() - started >= 10 / 50


class _Answer:
    """The parts of an HTTP response azure-core's HttpResponseError reads."""

    def __init__(self, status: int | None, reason: str = "", headers: dict | None = None) -> None:
        self.status_code, self.reason, self.headers, self.request = status, reason, headers or {}, None

    def text(self) -> str:
        return ""

    def body(self) -> bytes:
        return b""


@pytest.mark.parametrize(
    ("status", "kind", "code", "words"),
    [
        (401, Misconfigured, "key-vault-forbidden", "Key Vault refused to sign: denied;"),
        (403, Misconfigured, "key-vault-forbidden", "Key Vault refused to sign: denied;"),
        (404, Misconfigured, "key-vault-not-found", "Key Vault could not sign: not found (denied)"),
        (409, Conflict, "key-vault-conflict", "Key Vault could not sign: denied"),
        (503, BackendUnavailable, "key-vault-unavailable", "Key Vault unavailable: could not sign (503)"),
        (402, Misconfigured, "key-vault-error", "Key Vault could not sign: 402 denied"),
        (405, Misconfigured, "key-vault-error", "Key Vault could not sign: 405 denied"),
        (None, Misconfigured, "key-vault-error", "Key Vault could not sign: 0 denied"),
    ],
)
def test_what_each_vault_answer_means_for_the_caller(status, kind, code, words):
    error = keyvault.vault_error(HttpResponseError(message="denied", response=_Answer(status)), "sign")
    assert type(error) is kind and error.code == code and error.message.startswith(words), error.message


def test_a_vault_error_gives_its_reason_when_it_has_no_message_and_at_most_300_characters():
    without_message = HttpResponseError(response=_Answer(400, "Bad Request"))
    without_message.message = None
    assert keyvault.vault_error(without_message, "sign").message == "Key Vault could not sign: 400 Bad Request"
    silent = HttpResponseError(response=_Answer(400, ""))
    silent.message = None
    assert keyvault.vault_error(silent, "sign").message == "Key Vault could not sign: 400 "
    long = keyvault.vault_error(HttpResponseError(message="x" * 400, response=_Answer(400)), "sign")
    assert long.message == "Key Vault could not sign: 400 " + "x" * 300


def test_retry_after_without_a_response_or_in_the_past():
    assert keyvault._retry_after(HttpResponseError(message="no answer")) is None
    past = email.utils.format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert keyvault._retry_after(HttpResponseError(response=_Answer(503, headers={"Retry-After": past}))) == 0.0


def test_backoff_doubles_from_the_first_delay_up_to_the_ceiling_with_jitter_of_half():
    """Attempt n waits between half and all of min(max_retry_delay, first_retry_delay * 2**n)."""
    gate = VaultGate(KeyVaultOptions(first_retry_delay=1.0, max_retry_delay=100.0))
    for attempt, ceiling in [(0, 1.0), (3, 8.0), (9, 100.0)]:
        waits = [gate._backoff(attempt) for _ in range(300)]
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits), (attempt, min(waits), max(waits))
        assert min(waits) < ceiling * 0.6 and max(waits) > ceiling * 0.9  # the whole range is used


def test_the_pacer_recovers_by_a_hundredth_of_its_maximum_per_success():
    pacer = SignPacer(200)
    pacer.throttled()
    pacer.succeeded()
    assert pacer.rate == pytest.approx(142)


def test_the_pacer_gives_each_call_its_own_slot(monkeypatch):
    """At 50 a second, 11 calls in a row take 10 slots of 20 ms (measured on a clock the test moves)."""
    now = [1000.0]
    monkeypatch.setattr(keyvault.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(keyvault.time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    pacer = SignPacer(50)
    for _ in range(11):
        pacer.wait()
    assert now[0] - 1000.0 == pytest.approx(10 / 50)


def test_each_retry_waits_twice_as_long_as_the_one_before(vault_ca, monkeypatch):
    """Three transient failures: the gate waits half to all of first_retry_delay, then of twice it, then of
    four times it."""
    waits: list[float] = []
    monkeypatch.setattr(keyvault.time, "sleep", waits.append)
    options = replace(QUICK, first_retry_delay=0.4, max_retry_delay=10, sign_rate=0)
    service, vault, _ = vault_ca(options=options)
    _hierarchy(service)
    waits.clear()
    failing = vault.sign_calls + 3  # the next three sign calls fail
    vault.sign_failures = lambda n: 503 if n <= failing else None
    service.sign_csr(make_csr("dev-retry"), "dev-retry")
    assert len(waits) == 3, waits
    assert 0.2 <= waits[0] <= 0.4 and 0.4 <= waits[1] <= 0.8 and 0.8 <= waits[2] <= 1.6, waits


def test_a_vault_url_is_kept_without_its_trailing_slash():
    store = KeyVaultKeyStore(VAULT_URL + "/", FakeCredential(), QUICK, session=FakeKeyVault().session())
    assert store.describe()["vault"] == VAULT_URL


def test_a_ca_key_is_made_to_sign_certificates_and_crls_never_exported_nor_reused(vault_ca):
    """The certificate policy Key Vault receives: a new key each time it is created (reuse_key false), for
    keyCertSign and cRLSign only (RFC 5280 4.2.1.3), and never exportable."""
    service, vault, _ = vault_ca()
    service.create_root()
    policy = vault.certificates[service.root().key_name].policy
    assert policy["key_props"] == {"exportable": False, "kty": "EC-HSM", "reuse_key": False, "crv": "P-256"}
    assert policy["x509_props"]["key_usage"] == ["keyCertSign", "cRLSign"]


def test_a_pending_certificate_without_a_csr_is_a_clear_error(vault_ca, monkeypatch):
    service, vault, _ = vault_ca()
    pending = vault._operation
    monkeypatch.setattr(vault, "_operation", lambda state: {**pending(state), "csr": None})
    with pytest.raises(Misconfigured) as refused:
        service.keys.create_ca_key("no-csr", "P-256", "No CSR")
    assert refused.value.code == "key-vault-bad-answer"
    assert refused.value.message == "Key Vault did not leave certificate no-csr pending with a CSR"


@pytest.mark.parametrize(
    ("curve", "reported"), [("P-521", None), ("P-256K", None), ("P-256", "P-999")], ids=["P-521", "P-256K", "newer"]
)
def test_a_ca_key_replaced_by_one_on_another_curve_is_refused_by_name(vault_ca, curve, reported):
    """An admin's new key version on a curve CA keys do not use (or one this SDK does not know, which it
    gives as text rather than its enum) is refused, naming the curve as Key Vault does."""
    service, vault, _ = vault_ca()
    service.create_root()
    name = service.root().key_name
    vault.add_key_version(name, curve).reported_curve = reported
    fresh = KeyVaultKeyStore(VAULT_URL, FakeCredential(), QUICK, session=vault.session())
    with pytest.raises(Misconfigured) as refused:
        fresh.signing_key(name)
    fresh.close()
    assert refused.value.code == "key-invalid"
    assert refused.value.message == f"Key Vault key {name} is on {reported or curve}; CA keys are P-256 or P-384"


def test_closing_the_store_closes_the_session_it_made_and_leaves_one_it_was_given(vault_ca, monkeypatch):
    closed: list[requests.Session] = []
    monkeypatch.setattr(requests.Session, "close", lambda session: closed.append(session))
    vault = FakeKeyVault()
    given = vault.session()
    store = KeyVaultKeyStore(VAULT_URL, FakeCredential(), QUICK, session=given)
    store.create_ca_key("shared-session", "P-256", "Shared")  # the clients have used the session
    store.close()
    assert closed == []
    own = KeyVaultKeyStore(VAULT_URL, FakeCredential(), QUICK)
    made = own._session
    own.close()
    assert closed == [made]


def _signer_on_a_moved_clock(monkeypatch, vault: FakeKeyVault, options: KeyVaultOptions):
    """A CA key in `vault` whose gate sleeps on a clock the test moves; returns (signer, sleeps)."""
    store = KeyVaultKeyStore(VAULT_URL, FakeCredential(), options, session=vault.session())
    signer = store.create_ca_key("paced", "P-256", "Paced")
    now, sleeps = [1000.0], []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(keyvault.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(keyvault.time, "sleep", sleep)
    return store, signer, sleeps


@pytest.mark.parametrize(("sign_rate", "waited"), [(4.0, 1.0), (None, 0.0)])
def test_the_gate_paces_signs_when_a_sign_rate_is_set(vault_ca, monkeypatch, sign_rate, waited):
    """At 4 signs a second, 5 signs in a row wait 4 slots of 0.25 s; without a rate they never wait."""
    store, signer, sleeps = _signer_on_a_moved_clock(monkeypatch, FakeKeyVault(), replace(QUICK, sign_rate=sign_rate))
    for _ in range(5):
        signer.sign(b"tbs", ec.ECDSA(hashes.SHA256()))
    store.close()
    assert sum(sleeps) == pytest.approx(waited)


@pytest.mark.parametrize(("status", "rate"), [(429, 71.0), (503, 100.0)])
def test_only_a_429_slows_the_pacer(vault_ca, monkeypatch, status, rate):
    """A 429 means another client shares the vault's limit: the pace drops by 30% (then the success adds
    1% of the maximum back). A 503 is the vault's own trouble and leaves the pace alone."""
    vault = FakeKeyVault()
    store, signer, _ = _signer_on_a_moved_clock(monkeypatch, vault, replace(QUICK, sign_rate=100.0))
    vault.sign_failures = lambda n: status if n == 1 else None
    signer.sign(b"tbs", ec.ECDSA(hashes.SHA256()))
    store.close()
    assert vault.sign_calls == 2 and store._gate.pacer.rate == pytest.approx(rate)


@pytest.mark.parametrize(
    "kty, named",
    [
        (KeyType.rsa, "an RSA key"),
        (KeyType.rsa_hsm, "an RSA key"),  # HSM-backed or not, the same kind of key
        ("RSA-HSM", "an RSA key"),  # a key type the SDK does not know as its enum comes as text
        (KeyType.oct_hsm, "an oct key"),
    ],
)
def test_a_ca_key_replaced_by_an_rsa_key_is_refused_by_its_type_not_as_a_curve_named_none(kty, named):
    """A key version with no curve at all (an admin's RSA key under the CA key's name) is named by its key
    type: the SDK's crv is None there, and 'is on None' names nothing Key Vault shows."""
    jwk = {"kty": kty, "n": b"\x01" * 256, "e": b"\x01\x00\x01"}  # as the SDK builds it from an answer
    key = KeyVaultKey(key_id=f"{VAULT_URL}/keys/rsa-ca/0123", jwk=jwk)
    with pytest.raises(Misconfigured) as refused:
        KeyVaultSigningKey(None, key, VaultGate(QUICK))  # type: ignore[arg-type]
    assert refused.value.code == "key-invalid"
    assert "None" not in refused.value.message
    assert refused.value.message == f"Key Vault key rsa-ca is {named}; CA keys are EC, on P-256 or P-384"


def test_a_ca_key_gone_from_the_vault_is_the_services_fault_not_a_404_to_the_device(vault_ca):
    """The intermediate's key was deleted from Key Vault (or its name is wrong). A device's sign request
    cannot be served, but nothing the device sent is missing: the answer is a 5xx (misconfigured or
    unavailable), which callers see without the vault's key names or its own messages, not a 404
    'not found' that passes Key Vault's text to the device."""
    service, vault, _ = vault_ca()
    _hierarchy(service)
    vault.keys.pop(service.intermediate("vault-int").key_name)
    with pytest.raises(CaError) as failed:
        service.sign_csr(make_csr("vault-device", key=device_key()), "vault-device")
    assert failed.value.status >= 500, (failed.value.status, failed.value.code, failed.value.message)
