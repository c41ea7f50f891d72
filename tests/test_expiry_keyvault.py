"""The expiry scan where Key Vault holds the CA keys: Key Vault's expiry of each CA certificate is checked
against the ledger's, through the real SDK clients and the fake vault at the HTTP level."""

import json
from dataclasses import replace

import pytest
from azure.keyvault.certificates._shared import http_challenge_cache as certificate_challenges
from azure.keyvault.keys._shared import http_challenge_cache as keys_challenges

from shared.config import Settings
from shared.dps.offline import OfflineDps
from shared.keys.keyvault import KeyVaultKeyStore, KeyVaultOptions
from shared.ledger.sqlite import SqliteLedger
from shared.service import DeviceCA

from .conftest import close_checked
from .fakes.keyvault import VAULT_URL, FakeCredential, FakeKeyVault

QUICK = KeyVaultOptions(first_retry_delay=0.01, max_retry_delay=0.05, retry_seconds=1)


@pytest.fixture
def vault_service(tmp_path, clock):
    keys_challenges.clear()
    certificate_challenges.clear()
    vault = FakeKeyVault()
    keys = KeyVaultKeyStore(VAULT_URL, FakeCredential(), QUICK, session=vault.session())
    home = tmp_path / "pki"
    service = DeviceCA(
        keys, SqliteLedger(home / "ledger.sqlite3"), OfflineDps(home), replace(Settings(pki_home=home)), clock
    )
    service.create_root()
    service.create_intermediate("vault-int")
    service.create_intermediate("other")
    yield service, vault
    close_checked([service])


def _notices(service) -> list[dict]:
    found = []
    while (text := service.expiry_queue.take()) is not None:
        found.append(json.loads(text))
    return found


def test_key_vault_agreeing_with_the_ledger_is_no_finding(vault_service):
    service, vault = vault_service
    report = service.scan_expiring()
    assert report.findings == () and report.failures == ()
    assert vault.calls["list"] == 1


def test_a_ca_certificate_missing_from_the_vault_or_renewed_there_is_a_finding_announced_once(vault_service):
    service, vault = vault_service
    gone = service.intermediate("vault-int")
    renewed = service.intermediate("other")
    del vault.certificates[gone.key_name]
    state = vault.certificates[renewed.key_name]
    root_der = vault.certificates[service.root().key_name].versions[-1][1]
    state.versions.append((state.versions[-1][0] + "0", root_der, state.versions[-1][2]))  # another expiry

    report = service.scan_expiring()
    found = {f.subject: f for f in report.findings}
    assert set(found) == {"vault-int", "other"}
    assert found["vault-int"].stage == "key-vault-missing" and found["vault-int"].topic == "key-vault"
    assert f"Key Vault holds no certificate {gone.key_name!r}" in found["vault-int"].detail
    root_end = service.root().not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert found["other"].stage == f"key-vault-mismatch-{root_end}"
    assert f"expires {root_end}, the ledger's" in found["other"].detail
    notices = {n["caId"]: n for n in _notices(service)}
    assert notices["vault-int"]["topic"] == "key-vault" and notices["vault-int"]["kind"] == "intermediate"
    assert "action" not in notices["other"] and notices["other"]["detail"] == found["other"].detail

    again = service.scan_expiring()
    assert len(again.findings) == 2 and again.announced == () and _notices(service) == []


def test_a_vault_that_cannot_be_listed_is_a_failure_not_a_crash(vault_service):
    service, vault = vault_service
    vault.failures["list"] = lambda call: 403
    report = service.scan_expiring()
    assert report.findings == ()
    assert len(report.failures) == 1 and report.failures[0].startswith(
        "Key Vault's certificate expiries could not be read: Key Vault refused to list certificates"
    )


def test_check_expiring_fails_the_gate_when_the_vault_could_not_be_read(vault_service, capsys):
    """Nothing found is not "nothing expiring" when Key Vault could not be looked at: exit status 1."""
    import argparse

    import cli

    service, vault = vault_service
    args = argparse.Namespace(within=None, announce=True, json=False)
    document, text = cli.check_expiring(service, args)
    assert getattr(args, "exit_status", 0) == 0 and "Nothing expires" in text
    vault.failures["list"] = lambda call: 403
    args = argparse.Namespace(within=None, announce=True, json=False)
    document, text = cli.check_expiring(service, args)
    assert args.exit_status == cli.EXIT_ERROR
    assert "warning: Key Vault's certificate expiries could not be read" in text
    assert "not announced" not in text and document["failures"]
