"""Issued chains work in a real TLS 1.2 handshake, and bad ones fail there; openssl agrees."""

import subprocess
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .certrules import check_device, load
from .conftest import Clock
from .csrs import device_key, make_csr
from .tls import device_context, handshake, make_server_identity, server_context


@pytest.fixture
def hub(tmp_path):
    return make_server_identity(tmp_path / "hub")


def _root_file(ca, directory) -> str:
    path = directory / "root.pem"
    path.write_text(ca.root().certificate_pem)
    return path


def _device_files(ca, device_id: str, directory, curve=None):
    key = device_key(curve)
    issued = ca.sign_csr(make_csr(device_id, key=key), device_id)
    check_device(load(issued.record.certificate_pem), load(issued.intermediate_pem), device_id)
    directory.mkdir(parents=True, exist_ok=True)
    chain, key_file = directory / f"{device_id}.chain.pem", directory / f"{device_id}.key.pem"
    chain.write_text(issued.chain_pem)
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return issued, chain, key_file


def _server(ca, hub, tmp_path):
    _, hub_cert, hub_key = hub
    return server_context(_root_file(ca, tmp_path), hub_cert, hub_key)


def test_device_with_chain_completes_the_handshake(service, hub, tmp_path):
    _, chain, key = _device_files(service, "dev-1", tmp_path / "dev")
    result = handshake(_server(service, hub, tmp_path), device_context(hub[0], chain, key))
    assert result.ok, result
    assert result.peer_common_name == "dev-1"
    assert result.version == "TLSv1.2"
    assert result.cipher.startswith("ECDHE-ECDSA-AES") and "GCM" in result.cipher


def test_p384_hierarchy_and_device(make_service, hub, tmp_path):
    ca = make_service("p384", ca_curve="P-384")
    ca.create_root()
    ca.create_intermediate("p384")
    _, chain, key = _device_files(ca, "dev-384", tmp_path / "dev", ec.SECP384R1())
    result = handshake(_server(ca, hub, tmp_path), device_context(hub[0], chain, key))
    assert result.ok, result
    assert result.peer_common_name == "dev-384"


def test_device_of_another_root_is_refused(service, make_service, hub, tmp_path):
    other = make_service("other")
    other.create_root()
    other.create_intermediate("elsewhere")
    _, chain, key = _device_files(other, "intruder", tmp_path / "dev")
    result = handshake(_server(service, hub, tmp_path), device_context(hub[0], chain, key))
    assert not result.ok
    assert "certificate verify failed" in result.server_error
    assert result.peer_common_name is None


def test_expired_device_certificate_is_refused(make_service, hub, tmp_path, clock):
    past = Clock(clock.now - timedelta(days=400))
    ca = make_service("past", clock=past, device_days=30)
    ca.create_root()
    ca.create_intermediate("factory-a")
    issued, chain, key = _device_files(ca, "dev-old", tmp_path / "dev")
    assert load(issued.record.certificate_pem).not_valid_after_utc < clock.now
    result = handshake(_server(ca, hub, tmp_path), device_context(hub[0], chain, key))
    assert not result.ok
    assert "certificate has expired" in result.server_error


def test_device_without_its_intermediate_is_refused(service, hub, tmp_path):
    issued, _, key = _device_files(service, "dev-1", tmp_path / "dev")
    alone = tmp_path / "dev" / "alone.pem"
    alone.write_text(issued.record.certificate_pem)
    result = handshake(_server(service, hub, tmp_path), device_context(hub[0], alone, key))
    assert not result.ok and "certificate verify failed" in result.server_error


def _openssl_verify(root, intermediate, device) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(intermediate), str(device)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_openssl_verify(service, make_service, tmp_path):
    issued, _, _ = _device_files(service, "dev-1", tmp_path / "dev")
    root = _root_file(service, tmp_path)
    intermediate, device = tmp_path / "intermediate.pem", tmp_path / "device.pem"
    intermediate.write_text(issued.intermediate_pem)
    device.write_text(issued.record.certificate_pem)
    result = _openssl_verify(root, intermediate, device)
    assert result.returncode == 0 and result.stdout.strip() == f"{device}: OK", result.stderr

    other = make_service("other")
    other.create_root()
    other_root = tmp_path / "other-root.pem"
    other_root.write_text(other.root().certificate_pem)
    assert _openssl_verify(other_root, intermediate, device).returncode != 0
