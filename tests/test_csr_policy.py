"""Refused CSRs: each a clear one-line error, a non-zero CLI exit and no ledger row."""

import json
import subprocess
import tempfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import CaError
from shared.ledger.models import CertificateQuery
from shared.pki import CsrRejected, check_device_csr

from .certrules import check_device, load
from .conftest import run_cli, settings_environment
from .csrs import csr_asking_for_ca, csr_with_broken_signature, device_key, make_csr, rsa_key

LONG_CN = "d" * 65

# (case, CSR bytes maker, device ID, error code, words the message must contain)
REFUSED = [
    ("rsa key", lambda: make_csr("dev-1", key=rsa_key()), "dev-1", "unsupported-key", "RSA"),
    ("p-521 key", lambda: make_csr("dev-1", key=device_key(ec.SECP521R1())), "dev-1", "unsupported-curve", "secp521r1"),
    (
        "secp256k1 key",
        lambda: make_csr("dev-1", key=device_key(ec.SECP256K1())),
        "dev-1",
        "unsupported-curve",
        "secp256k1",
    ),
    ("bad signature", lambda: csr_with_broken_signature("dev-1"), "dev-1", "bad-signature", "signature"),
    ("not a csr", lambda: b"hello, I am not a certificate request", "dev-1", "not-a-csr", "PKCS#10"),
    ("a certificate", lambda: _a_certificate_pem(), "dev-1", "not-a-csr", "CERTIFICATE"),
    ("empty", lambda: b"", "dev-1", "empty-csr", "empty"),
    ("only whitespace", lambda: b"  \n\t ", "dev-1", "empty-csr", "empty"),
    ("no cn", lambda: make_csr(None, extra_attributes=[_org()]), "dev-1", "missing-cn", "no CN"),
    ("cn differs", lambda: make_csr("dev-2"), "dev-1", "cn-mismatch", "does not match"),
    ("cn uppercase", lambda: make_csr("Dev-1"), "dev-1", "invalid-cn", "uppercase"),
    ("cn space", lambda: make_csr("dev 1"), "dev-1", "invalid-cn", "spaces"),
    ("cn slash", lambda: make_csr("dev/1"), "dev-1", "invalid-cn", "'/'"),
    ("cn too long", lambda: make_csr(LONG_CN), "dev-1", "invalid-cn", "65 characters"),
    ("device id too long", lambda: make_csr(LONG_CN), LONG_CN, "invalid-device-id", "65 characters"),
    ("two cns", lambda: make_csr(["dev-1", "dev-1"]), "dev-1", "multiple-cn", "2 CNs"),
    ("sha1 signature", lambda: _sha1_csr("dev-1"), "dev-1", "weak-signature", "sha1"),
    ("cn special last", lambda: make_csr("dev-"), "dev-1", "invalid-cn", "starts or ends"),
]


def _sha1_csr(common_name: str) -> bytes:
    """cryptography no longer signs with SHA-1; openssl still does."""
    key_pem = device_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with tempfile.NamedTemporaryFile(suffix=".pem") as key_file:
        key_file.write(key_pem)
        key_file.flush()
        command = ["openssl", "req", "-new", "-key", key_file.name, "-subj", f"/CN={common_name}", "-sha1"]
        return subprocess.run(command, check=True, capture_output=True).stdout


def _org():
    return x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Factory")


def _a_certificate_pem() -> bytes:
    from datetime import UTC, datetime, timedelta

    key = device_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _ledger_is_empty(ca) -> bool:
    return ca.ledger.list_certificates(CertificateQuery()).items == []


@pytest.mark.parametrize(("case", "make", "device_id", "code", "words"), REFUSED, ids=[r[0] for r in REFUSED])
def test_service_refuses(service, case, make, device_id, code, words):
    with pytest.raises(CaError) as raised:
        service.sign_csr(make(), device_id)
    error = raised.value
    assert error.code == code
    assert words in error.message
    assert "\n" not in error.message
    assert _ledger_is_empty(service)


@pytest.mark.child_process
def test_cli_refuses_each_with_one_line_and_no_row(service, tmp_path):
    """The same table through `python cli.py sign-csr`: exit 1 (2 for a --device-id that breaks its rule, a
    usage error), one line on stderr, JSON error with the same code with --json."""
    home = service.settings.pki_home
    env = settings_environment(service.settings)
    for case, make, device_id, code, words in REFUSED:
        csr_file = tmp_path / f"{case.replace(' ', '-')}.csr"
        csr_file.write_bytes(make())
        status = 2 if code == "invalid-device-id" else 1
        plain = run_cli("sign-csr", str(csr_file), "--device-id", device_id, home=home, env=env)
        assert plain.returncode == status, case
        assert plain.stdout == b"", case
        lines = plain.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (case, lines)
        machine = run_cli("sign-csr", str(csr_file), "--device-id", device_id, "--json", home=home, env=env)
        assert machine.returncode == status
        assert json.loads(machine.stdout)["error"]["code"] == code, case
    assert _ledger_is_empty(service)


def test_requested_extensions_are_ignored(service):
    issued = service.sign_csr(csr_asking_for_ca("dev-ca"), "dev-ca")
    cert = load(issued.record.certificate_pem)
    intermediate = load(service.intermediate("factory-a").certificate_pem)
    check_device(cert, intermediate, "dev-ca")  # CA:FALSE, digitalSignature only, clientAuth only, CN only
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_der_csr_is_accepted(service):
    issued = service.sign_csr(make_csr("dev-der", encoding=serialization.Encoding.DER), "dev-der")
    assert issued.created


def test_der_csr_ending_in_a_whitespace_byte_is_read_whole():
    """A DER signature may end in 0x20 or 0x0a; trimming it as if it were text breaks the CSR."""
    for _ in range(2000):
        der = make_csr("dev-ws", encoding=serialization.Encoding.DER)
        if der[-1:].isspace():
            break
    else:
        pytest.fail("no DER CSR ending in a whitespace byte in 2000 tries")
    assert check_device_csr(der, "dev-ws").device_id == "dev-ws"


def test_p384_device_key_is_accepted(service):
    issued = service.sign_csr(make_csr("dev-384", key=device_key(ec.SECP384R1())), "dev-384")
    check_device(
        load(issued.record.certificate_pem), load(service.intermediate("factory-a").certificate_pem), "dev-384"
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused_cleanly(data):
    with pytest.raises(CsrRejected):
        check_device_csr(data, "dev-1")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_cn_either_signs_or_is_refused_cleanly(common_name):
    key = device_key()
    try:
        csr = make_csr(common_name, key=key)
    except ValueError:
        return  # not encodable as a CN at all
    try:
        request = check_device_csr(csr, common_name)
    except CsrRejected as error:
        assert error.code in {"invalid-device-id", "invalid-cn", "missing-cn"}
        assert "\n" not in error.message
    else:
        assert request.device_id == common_name
