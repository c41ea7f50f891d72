"""CSR parsing and the device CSR policy.

What a CSR contributes to a device certificate is its public key, after the checks below. Its subject
beyond the CN, its attributes and its requested extensions are never read.
"""

import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from .curves import DEVICE_CURVES, curve_name
from .errors import CsrRejected
from .names import check_device_id, registration_id_problem
from .profiles import public_key_sha256

_ACCEPTED_CURVES = {curve.name for curve in DEVICE_CURVES.values()}
_ACCEPTED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_KEY_KINDS = (
    (rsa.RSAPublicKey, "RSA"),
    (dsa.DSAPublicKey, "DSA"),
    (ed25519.Ed25519PublicKey, "Ed25519"),
    (ed448.Ed448PublicKey, "Ed448"),
)


@dataclass(frozen=True)
class DeviceRequest:
    """A CSR that passed the device policy: who it is for and the key to certify."""

    device_id: str
    public_key: ec.EllipticCurvePublicKey
    public_key_sha256: str
    curve: str


def load_csr(data: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a PKCS#10 request in PEM or DER; CsrRejected with a reason when it is not one."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    text = raw.strip()  # only PEM may be trimmed: a DER signature can end in a whitespace byte
    if not text:
        raise CsrRejected("empty-csr", "the CSR is empty")
    try:
        if text.startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(text)
        return x509.load_der_x509_csr(raw)
    except (ValueError, UnsupportedAlgorithm):
        pass
    if text.startswith(b"-----BEGIN"):
        label = text.split(b"\n", 1)[0].decode("ascii", "replace").strip("- ")
        if "REQUEST" not in label:
            raise CsrRejected("not-a-csr", f"expected a PEM CERTIFICATE REQUEST, got {label}") from None
    raise CsrRejected("not-a-csr", "the body is not a PKCS#10 certificate signing request (PEM or DER)") from None


def check_device_csr(data: bytes | str, device_id: str) -> DeviceRequest:
    """Apply the device policy to a CSR for `device_id`; CsrRejected names the first problem."""
    check_device_id(device_id)
    csr = load_csr(data)
    public_key = _public_key(csr)
    _verify_signature(csr, public_key)
    common_name = _single_common_name(csr)
    problem = None if common_name == device_id else registration_id_problem(common_name)
    if problem:
        raise CsrRejected("invalid-cn", f"the CSR's CN {common_name!r} is not a valid DPS registration ID: {problem}")
    if common_name != device_id:
        raise CsrRejected("cn-mismatch", f"the CSR's CN {common_name!r} does not match the device ID {device_id!r}")
    return DeviceRequest(device_id, public_key, public_key_sha256(public_key), curve_name(public_key))


def _public_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CsrRejected(
            "unsupported-key", "the CSR's key type is not supported; devices need an ECC P-256 or P-384 key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = next((name for cls, name in _KEY_KINDS if isinstance(key, cls)), type(key).__name__)
        raise CsrRejected("unsupported-key", f"the CSR's key is {kind}; devices need an ECC P-256 or P-384 key")
    if key.curve.name not in _ACCEPTED_CURVES:
        raise CsrRejected(
            "unsupported-curve",
            f"the CSR's key is on curve {key.curve.name}; devices need P-256 (secp256r1) or P-384 (secp384r1)",
        )
    return key


def _verify_signature(csr: x509.CertificateSigningRequest, public_key: ec.EllipticCurvePublicKey) -> None:
    """The CSR's self-signature, with SHA-256 or stronger (the same check as `is_signature_valid`,
    without parsing the key a second time)."""
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if not isinstance(algorithm, _ACCEPTED_HASHES):
        name = algorithm.name if algorithm else "an unsupported hash"
        raise CsrRejected("weak-signature", f"the CSR is signed with {name}; use SHA-256 or stronger")
    try:
        public_key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        raise CsrRejected("bad-signature", "the CSR's signature does not verify with its own public key") from None


def _single_common_name(csr: x509.CertificateSigningRequest) -> str:
    with warnings.catch_warnings():
        # cryptography warns about over-long CNs while parsing; we refuse them with our own message
        warnings.simplefilter("ignore", UserWarning)
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise CsrRejected("missing-cn", "the CSR's subject has no CN; the CN must be the device ID")
    if len(names) > 1:
        raise CsrRejected(
            "multiple-cn", f"the CSR's subject has {len(names)} CNs; exactly one, the device ID, is allowed"
        )
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
