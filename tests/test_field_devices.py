"""What devices and tools in the field send, end to end: over HTTP and through `sign-csr`, and the issued
certificate passes the device profile's field checks."""

import base64
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from .apiclient import bearer, make_api
from .certrules import check_device, load, load_chain
from .conftest import run_cli, settings_environment
from .csrs import make_csr
from .oddcsrs import csr_with_version

DATA = Path(__file__).parent / "data"
NRF91_RESPONSE = DATA / "nrf91-keygen-response.txt"
NRF91_DEVICE = "b3fb1364-3cb5-bd46-9e80-ca0916643193"  # the sample's CN: the modem's UUID


def _openssl_text_dump(pem: bytes) -> bytes:
    """What `openssl req -text` writes: a text dump, then the PEM block."""
    return subprocess.run(["openssl", "req", "-text"], input=pem, capture_output=True, check=True).stdout


def _forms(device: str) -> dict[str, bytes]:
    der = make_csr(device, encoding=serialization.Encoding.DER)
    pem = make_csr(device)
    return {
        "openssl req -text": _openssl_text_dump(pem),
        "byte-order mark": b"\xef\xbb\xbf" + pem,
        "certreq label, CRLF": pem.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST").replace(b"\n", b"\r\n"),
        "version 1": csr_with_version(device, 1),
        "bare base64": base64.b64encode(der),
    }


def test_the_nrf91_modem_answer_signs_over_http_as_text_plain(service):
    api = make_api(service)
    response = api.post_csr(NRF91_DEVICE, NRF91_RESPONSE.read_bytes(), api.factory_a, media="text/plain")
    assert response.status_code == 201, response.text
    bundle = response.json()
    device, intermediate = load_chain(bundle["certificateChain"])
    check_device(device, intermediate, NRF91_DEVICE)
    assert any("NULL parameters" in w for w in bundle["warnings"])
    assert any("attestation" in w for w in bundle["warnings"])
    again = api.post_csr(NRF91_DEVICE, NRF91_RESPONSE.read_bytes(), api.factory_a, media="text/plain")
    assert again.status_code == 200 and again.json()["serialNumber"] == bundle["serialNumber"]
    assert again.json()["warnings"] == bundle["warnings"]  # the same CSR is read the same way every time


def test_the_nrf91_modem_answer_signs_with_sign_csr(service, tmp_path):
    home = service.settings.pki_home
    done = run_cli(
        "sign-csr",
        str(NRF91_RESPONSE),
        "--device-id",
        NRF91_DEVICE,
        "--json",
        home=home,
        env=settings_environment(service.settings),
    )
    assert done.returncode == 0, done.stderr
    bundle = json.loads(done.stdout)
    check_device(load(bundle["certificate"]), load(service.intermediate("factory-a").certificate_pem), NRF91_DEVICE)
    chain = tmp_path / "chain.pem"
    chain.write_text(bundle["certificateChain"])
    root = tmp_path / "root.pem"
    root.write_text(service.root().certificate_pem)
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(chain), str(chain)], capture_output=True
    )
    assert verified.returncode == 0, verified.stderr


@pytest.mark.parametrize("form", list(_forms("dev-x")))
@pytest.mark.child_process
def test_tool_outputs_sign_over_http_and_on_the_cli(service, tmp_path, form):
    api = make_api(service)
    device = "dev-" + "".join(c for c in form.lower() if c.isalnum())[:20]
    body = _forms(device)[form]
    response = api.client.post(
        f"/api/devices/{device}/certificate",
        content=body,
        headers={**bearer(api.factory_a), "Content-Type": "text/plain"},
    )
    assert response.status_code == 201, response.text
    device_cert, intermediate = load_chain(response.json()["certificateChain"])
    check_device(device_cert, intermediate, device)
    path = tmp_path / "request.csr"
    path.write_bytes(_forms(device)[form])  # a new key: the CLI (an admin) renews the device
    done = run_cli(
        "sign-csr",
        str(path),
        "--device-id",
        device,
        "--renew",
        home=service.settings.pki_home,
        env=settings_environment(service.settings),
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.child_process
def test_an_admin_on_the_cli_certifies_a_factorys_device_and_it_stays_the_factorys(service):
    api = make_api(service)
    assert api.post_csr("dev-owned", make_csr("dev-owned"), api.factory_a).status_code == 201
    home = service.settings.pki_home
    done = run_cli(
        "sign-csr",
        "-",
        "--device-id",
        "dev-owned",
        "--renew",
        home=home,
        env=settings_environment(service.settings),
        stdin=make_csr("dev-owned"),
    )
    assert done.returncode == 0, done.stderr
    assert service.ledger.device_owners(["dev-owned"]) == {"dev-owned": "factory-one"}
    taken = run_cli(
        "sign-csr",
        "-",
        "--device-id",
        "dev-owned",
        home=home,
        env=settings_environment(service.settings),
        stdin=make_csr("dev-owned"),
    )
    assert taken.returncode == 1 and b"renew" in taken.stderr
