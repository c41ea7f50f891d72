"""CSR parsing and the device CSR policy.

What a CSR contributes to a device certificate is its public key, after the checks below. Its subject
beyond the CN, its attributes and its requested extensions are never read.

A clean PEM or DER CSR is read by `cryptography` alone, as fast as it can be. Anything else (text around it,
base64, an nRF91 modem's answer, BER, the encoding slips openssl tolerates) goes through `csr_encoding`, which
normalises what cannot change what was signed and refuses the rest. Either way the signature is checked over the
CertificationRequestInfo exactly as sent, with the CSR's own key.
"""

import warnings
from dataclasses import dataclass
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from .csr_encoding import normalise_csr, unwrap_csr
from .curves import DEVICE_CURVES, curve_name
from .errors import CsrRejected
from .names import check_device_id, registration_id_problem
from .profiles import public_key_sha256

_ACCEPTED_CURVES = {curve.name for curve in DEVICE_CURVES.values()}
_ACCEPTED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_ECDSA_SIGNATURES = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA1,
    SignatureAlgorithmOID.ECDSA_WITH_SHA224,
    SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    SignatureAlgorithmOID.ECDSA_WITH_SHA384,
    SignatureAlgorithmOID.ECDSA_WITH_SHA512,
}
_KEY_KINDS = (
    (rsa.RSAPublicKey, "RSA"),
    (dsa.DSAPublicKey, "DSA"),
    (ed25519.Ed25519PublicKey, "Ed25519"),
    (ed448.Ed448PublicKey, "Ed448"),
)
# what cryptography raises on a CSR it cannot read (InvalidVersion is not a ValueError)
_UNREADABLE = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion)


@dataclass(frozen=True)
class DeviceRequest:
    """A CSR that passed the device policy: who it is for and the key to certify.

    `notes` has one sentence per normalisation applied to read it (an nRF91 modem's NULL parameters, BER, ...),
    for the caller to show as warnings; empty for a clean CSR.
    """

    device_id: str
    public_key: ec.EllipticCurvePublicKey
    public_key_sha256: str
    curve: str
    notes: tuple[str, ...] = ()


class _ReadCsr(NamedTuple):
    """What the policy needs of a CSR, however it was read: `signature` is checked over `signed_bytes`."""

    csr: x509.CertificateSigningRequest
    public_key: CertificatePublicKeyTypes
    common_names: list[str]
    signed_bytes: bytes
    signature: bytes
    notes: tuple[str, ...] = ()


def load_csr(data: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a PKCS#10 request in any form `check_device_csr` takes; CsrRejected with a reason when it is not one.

    A request that needed normalising comes back re-encoded in clean DER (see `csr_encoding.NormalisedCsr`): its
    own signature need not verify then, and `check_device_csr` checks the one that was sent.
    """
    return _read(_as_bytes(data)).csr


def check_device_csr(data: bytes | str, device_id: str) -> DeviceRequest:
    """Apply the device policy to a CSR for `device_id`; CsrRejected names the first problem.

    Whatever the bytes, nothing but CsrRejected is raised for a bad CSR.
    """
    check_device_id(device_id)
    read = _read(_as_bytes(data))
    public_key = _device_key(read.public_key)
    _verify_signature(read, public_key)
    common_name = _single_common_name(read.common_names)
    problem = None if common_name == device_id else registration_id_problem(common_name)
    if problem:
        raise CsrRejected("invalid-cn", f"the CSR's CN {common_name!r} is not a valid DPS registration ID: {problem}")
    if common_name != device_id:
        raise CsrRejected("cn-mismatch", f"the CSR's CN {common_name!r} does not match the device ID {device_id!r}")
    return DeviceRequest(device_id, public_key, public_key_sha256(public_key), curve_name(public_key), read.notes)


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)


def _read(raw: bytes) -> _ReadCsr:
    clean = _read_clean(raw)
    if clean:
        return clean
    if not raw.strip():
        raise CsrRejected("empty-csr", "the CSR is empty")
    der, notes = unwrap_csr(raw)
    clean = _read_clean(der) if der != raw else None
    if clean:
        return clean._replace(notes=notes)
    return _read_normalised(der, notes)


def _read_clean(raw: bytes) -> _ReadCsr | None:
    """A plain PEM or DER CSR read by cryptography alone; None when it needs a closer look."""
    text = raw.strip()  # only PEM may be trimmed: a DER signature can end in a whitespace byte
    try:
        if text.startswith(b"-----BEGIN"):
            if text.count(b"-----BEGIN") != 1 or not text.endswith(b"-----"):
                return None  # more than one PEM block, or text after it: csr_encoding looks at all of it
            csr = x509.load_pem_x509_csr(text)
        else:
            csr = x509.load_der_x509_csr(raw)
        public_key = csr.public_key()
        signed = csr.tbs_certrequest_bytes
        if not _plainly_encoded(csr, public_key, signed):
            return None
        return _ReadCsr(csr, public_key, _common_names(csr), signed, csr.signature)
    except _UNREADABLE:
        return None


def _read_normalised(der: bytes, notes: tuple[str, ...]) -> _ReadCsr:
    normalised = normalise_csr(der)
    try:
        csr = x509.load_der_x509_csr(normalised.der)
    except _UNREADABLE:
        raise CsrRejected("malformed-csr", "the CSR cannot be read, even re-encoded in DER") from None
    try:
        common_names = _common_names(csr)
    except _UNREADABLE:  # csr_encoding re-encoded every name as a UTF8String: not expected
        raise CsrRejected("invalid-subject", "the CSR's subject cannot be read") from None
    notes = (*notes, *normalised.notes)
    return _ReadCsr(csr, _public_key(csr), common_names, normalised.signed_bytes, normalised.signature, notes)


def _public_key(csr: x509.CertificateSigningRequest) -> CertificatePublicKeyTypes:
    try:
        return csr.public_key()
    except UnsupportedAlgorithm:
        raise CsrRejected(
            "unsupported-key", "the CSR's key type is not supported; devices need an ECC P-256 or P-384 key"
        ) from None
    except _UNREADABLE:
        raise CsrRejected("invalid-public-key", "the CSR's public key is not a valid key of its type") from None


def _plainly_encoded(csr: x509.CertificateSigningRequest, public_key: CertificatePublicKeyTypes, signed: bytes) -> bool:
    """Whether the CertificationRequestInfo, as signed, opens with version 0, the subject and the key's plain
    SubjectPublicKeyInfo (a named curve, an uncompressed point) right after its SEQUENCE header (2 to 4 octets
    for any CSR a body may hold). False sends the CSR to csr_encoding, which decides on compressed or hybrid
    points and explicit curve parameters: cryptography reads those too. The position matters: the same octets
    inside an attribute prove nothing about the key field."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in _ACCEPTED_CURVES:
        return True  # the key policy refuses these with its own message
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with warnings.catch_warnings():  # an over-long CN warns; the name policy refuses it with its own message
        warnings.simplefilter("ignore", UserWarning)
        subject = csr.subject.public_bytes()
    opening = _VERSION_0 + subject + spki
    return signed.find(opening, 2, 4 + len(opening)) in (2, 3, 4)


_VERSION_0 = b"\x02\x01\x00"


def _device_key(key: CertificatePublicKeyTypes) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = next((name for cls, name in _KEY_KINDS if isinstance(key, cls)), type(key).__name__)
        raise CsrRejected("unsupported-key", f"the CSR's key is {kind}; devices need an ECC P-256 or P-384 key")
    if key.curve.name not in _ACCEPTED_CURVES:
        raise CsrRejected(
            "unsupported-curve",
            f"the CSR's key is on curve {key.curve.name}; devices need P-256 (secp256r1) or P-384 (secp384r1)",
        )
    return key


def _verify_signature(read: _ReadCsr, public_key: ec.EllipticCurvePublicKey) -> None:
    """The CSR's self-signature: ECDSA with SHA-256 or stronger, over the CertificationRequestInfo as sent."""
    oid = read.csr.signature_algorithm_oid
    if oid not in _ECDSA_SIGNATURES:
        raise CsrRejected(
            "bad-signature", f"the CSR's signature algorithm ({oid.dotted_string}) is not ECDSA, which its EC key makes"
        )
    algorithm = read.csr.signature_hash_algorithm  # every ECDSA algorithm names its hash
    if not isinstance(algorithm, _ACCEPTED_HASHES):
        raise CsrRejected("weak-signature", f"the CSR is signed with {algorithm.name}; use SHA-256 or stronger")
    try:
        public_key.verify(read.signature, read.signed_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        raise CsrRejected("bad-signature", "the CSR's signature does not verify with its own public key") from None


def _common_names(csr: x509.CertificateSigningRequest) -> list[str]:
    with warnings.catch_warnings():
        # cryptography warns about over-long CNs while parsing; we refuse them with our own message
        warnings.simplefilter("ignore", UserWarning)
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return [name.value if isinstance(name.value, str) else name.value.decode("utf-8", "replace") for name in names]


def _single_common_name(names: list[str]) -> str:
    if not names:
        raise CsrRejected("missing-cn", "the CSR's subject has no CN; the CN must be the device ID")
    if len(names) > 1:
        raise CsrRejected(
            "multiple-cn", f"the CSR's subject has {len(names)} CNs; exactly one, the device ID, is allowed"
        )
    return names[0]
