"""The Key Vault backend: the real azure-keyvault clients against a fake vault at the HTTP level."""

import json
import subprocess
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

import cli
from shared.api import create_app
from shared.config import Settings, build_service
from shared.dps.offline import OfflineDps
from shared.errors import BackendUnavailable, CaError, Misconfigured
from shared.keys.keyvault import KeyVaultKeyStore, KeyVaultOptions, KeyVaultSigningKey, SignPacer
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
    with pytest.raises(NotImplementedError):
        signer.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    with pytest.raises(NotImplementedError):
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


def test_a_vault_that_keeps_failing_gives_a_clear_error_and_no_ledger_row(vault_ca):
    options = replace(QUICK, retry_seconds=0.3)
    service, vault, _ = vault_ca(options=options)
    _hierarchy(service)
    vault.sign_failures = lambda n: 503
    with pytest.raises(BackendUnavailable) as raised:
        service.sign_csr(make_csr("dev-1"), "dev-1")
    assert raised.value.code == "key-vault-unavailable" and "Key Vault unavailable" in raised.value.message
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
    with pytest.raises(Misconfigured, match="Key Vault Crypto User"):
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
