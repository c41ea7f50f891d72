"""CA keys as files: PKCS#8, mode 0600, encrypted with a passphrase, never overwritten."""

import shlex
import stat
import subprocess

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import Conflict, Misconfigured, NotFound
from shared.keys.local import LocalKeyStore

from .csrs import make_csr


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_private_pkcs8(tmp_path):
    store = LocalKeyStore(tmp_path)
    key = store.create_ca_key("ca-1", "P-256", "CA 1")
    path = tmp_path / "keys" / "ca-1.key.pem"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    fresh = LocalKeyStore(tmp_path).signing_key("ca-1")
    signature = fresh.sign(b"data", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"data", ec.ECDSA(hashes.SHA256()))


def test_passphrase_encrypts_the_key(tmp_path):
    LocalKeyStore(tmp_path, "correct horse").create_ca_key("ca-1", "P-384", "CA 1")
    data = (tmp_path / "keys" / "ca-1.key.pem").read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert LocalKeyStore(tmp_path, "correct horse").signing_key("ca-1").curve.name == "secp384r1"
    with pytest.raises(Misconfigured, match="set PKI_KEY_PASSPHRASE"):
        LocalKeyStore(tmp_path).signing_key("ca-1")
    with pytest.raises(Misconfigured, match="cannot be read"):
        LocalKeyStore(tmp_path, "wrong").signing_key("ca-1")


def test_a_passphrase_set_for_keys_made_without_one_is_refused_until_they_are_encrypted(tmp_path, monkeypatch):
    """PKI_KEY_PASSPHRASE set says the keys are encrypted: a key file that is not is refused (health degrades,
    nothing is signed) with the openssl command that encrypts it, which works as printed (a space in the
    path too) and then makes it usable."""
    tmp_path = tmp_path / "my ca"
    LocalKeyStore(tmp_path).create_ca_key("ca-1", "P-256", "CA 1")
    with pytest.raises(Misconfigured) as refused:
        LocalKeyStore(tmp_path, "correct horse").signing_key("ca-1")
    assert refused.value.code == "key-not-encrypted" and "correct horse" not in refused.value.message
    command = refused.value.message.split("`")[1]
    monkeypatch.setenv("PKI_KEY_PASSPHRASE", "correct horse")
    subprocess.run(shlex.split(command), check=True, capture_output=True)
    path = tmp_path / "keys" / "ca-1.key.pem"
    (tmp_path / "keys" / "ca-1.key.pem.new").replace(path)
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert LocalKeyStore(tmp_path, "correct horse").signing_key("ca-1").curve.name == "secp256r1"


def test_existing_key_is_never_overwritten(tmp_path):
    store = LocalKeyStore(tmp_path)
    store.create_ca_key("ca-1", "P-256", "CA 1")
    before = (tmp_path / "keys" / "ca-1.key.pem").read_bytes()
    with pytest.raises(Conflict):
        LocalKeyStore(tmp_path).create_ca_key("ca-1", "P-256", "CA 1")
    assert (tmp_path / "keys" / "ca-1.key.pem").read_bytes() == before


def test_missing_key(tmp_path):
    with pytest.raises(NotFound):
        LocalKeyStore(tmp_path).signing_key("nope")


def test_private_keys_never_reach_the_ledger_or_output(service, tmp_path):
    """The ledger file and DPS records hold certificates only; key material stays in the key files."""
    home = service.settings.pki_home
    service.sign_csr(make_csr("dev-1"), "dev-1")
    for path in home.rglob("*"):
        if path.is_file() and "keys" not in path.parts:
            assert b"PRIVATE KEY" not in path.read_bytes(), path
