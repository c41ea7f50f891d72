"""DESIGN.md's certificate rules, checked field by field on every certificate the tests issue."""

from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

# The device bundle of the contract (DESIGN.md), without the optional "dps" and "warnings".
DEVICE_BUNDLE_FIELDS = {
    "deviceId",
    "serialNumber",
    "notBefore",
    "notAfter",
    "certificate",
    "certificateChain",
    "intermediateId",
}
CURVE_HASH = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384}
CA_KEY_USAGE = {"key_cert_sign", "crl_sign"}
DEVICE_KEY_USAGE = {"digital_signature"}
_KEY_USAGE_FLAGS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def key_usage_flags(usage: x509.KeyUsage) -> set[str]:
    return {flag for flag in _KEY_USAGE_FLAGS if getattr(usage, flag)}


def check_serial(cert: x509.Certificate) -> None:
    serial = cert.serial_number
    assert serial > 0
    assert (serial.bit_length() + 8) // 8 <= 20, "serial must fit in 20 octets of DER"
    assert serial.bit_length() >= 64, "serial must carry at least 64 random bits"


def check_common(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    assert cert.version == x509.Version.v3
    check_serial(cert)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in CURVE_HASH
    issuer_key = issuer.public_key()
    assert isinstance(cert.signature_hash_algorithm, CURVE_HASH[issuer_key.curve.name])
    assert cert.issuer == issuer.subject
    cert.verify_directly_issued_by(issuer)
    assert cert.not_valid_before_utc < cert.not_valid_after_utc
    assert issuer.not_valid_before_utc <= cert.not_valid_before_utc
    assert cert.not_valid_after_utc <= issuer.not_valid_after_utc
    ski = _ext(cert, x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(key)


def _ext(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def _check_aki(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert aki.value.key_identifier == _ext(issuer, x509.SubjectKeyIdentifier).value.digest


def _extension_oids(cert: x509.Certificate) -> set:
    return {extension.oid for extension in cert.extensions}


def check_root(root: x509.Certificate) -> None:
    check_common(root, root)
    assert root.subject == root.issuer
    basic = _ext(root, x509.BasicConstraints)
    assert basic.critical and basic.value.ca is True
    usage = _ext(root, x509.KeyUsage)
    assert usage.critical and key_usage_flags(usage.value) == CA_KEY_USAGE
    assert _extension_oids(root) == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    }


def check_intermediate(cert: x509.Certificate, root: x509.Certificate) -> None:
    check_common(cert, root)
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca is True and basic.value.path_length == 0
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and key_usage_flags(usage.value) == CA_KEY_USAGE
    _check_aki(cert, root)
    assert _extension_oids(cert) == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }


def check_device(cert: x509.Certificate, intermediate: x509.Certificate, device_id: str) -> None:
    check_common(cert, intermediate)
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False and basic.value.path_length is None
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and key_usage_flags(usage.value) == DEVICE_KEY_USAGE
    eku = _ext(cert, x509.ExtendedKeyUsage)
    assert not eku.critical and list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _check_aki(cert, intermediate)
    assert _extension_oids(cert) == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }


def check_proof_of_possession(cert: x509.Certificate, root: x509.Certificate, code: str) -> None:
    check_common(cert, root)
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)])
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False and basic.value.path_length is None
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and key_usage_flags(usage.value) == DEVICE_KEY_USAGE
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=2), "must be short-lived"
    _check_aki(cert, root)
    assert _extension_oids(cert) == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }


def load(pem: str | bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def load_chain(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def check_ledger(ledger) -> int:
    """Check every certificate a ledger holds against the rules; how many there were."""
    from shared.ledger.models import INTERMEDIATE, ROOT, CertificateQuery

    cas = ledger.list_cas()
    roots = [load(ca.certificate_pem) for ca in cas if ca.kind == ROOT]
    for root in roots:
        check_root(root)
    intermediates = {ca.id: load(ca.certificate_pem) for ca in cas if ca.kind == INTERMEDIATE}
    for intermediate in intermediates.values():
        check_intermediate(intermediate, roots[0])
    checked, cursor = len(cas), None
    while True:
        page = ledger.list_certificates(CertificateQuery(limit=1000, cursor=cursor))
        for record in page.items:
            check_device(load(record.certificate_pem), intermediates[record.intermediate_id], record.device_id)
        checked += len(page.items)
        if not page.next_cursor:
            return checked
        cursor = page.next_cursor
