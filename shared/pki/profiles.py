"""Certificate profiles of the CA: root, intermediate, device and proof of possession.

Every builder signs with "a key": any `ec.EllipticCurvePrivateKey`, a local one or one whose `sign`
calls Key Vault. Nothing of a CSR but its public key and (checked) CN reaches a certificate.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .curves import signature_hash
from .errors import PkiError
from .names import check_verification_code
from .validity import Validity, plan_validity

PROOF_OF_POSSESSION_LIFETIME = timedelta(days=1)
PROOF_OF_POSSESSION_BACKDATE = timedelta(minutes=10)

_CA_BASIC = x509.BasicConstraints(ca=True, path_length=None)
_INTERMEDIATE_BASIC = x509.BasicConstraints(ca=True, path_length=0)
_END_ENTITY_BASIC = x509.BasicConstraints(ca=False, path_length=None)
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_DEVICE_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


def new_serial() -> int:
    """A positive serial of 159 random bits: at most 20 octets in DER, well over 64 bits of entropy."""
    return x509.random_serial_number()


def ca_name(common_name: str, organization: str | None = None) -> x509.Name:
    """A CA's subject: CN and optional O, each 1-64 printable characters (RFC 5280 ub-common-name and
    ub-organization-name are 64). PkiError "invalid-common-name" / "invalid-organization" otherwise."""
    _check_name_part(common_name, "common name", "invalid-common-name")
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        _check_name_part(organization, "organization", "invalid-organization")
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _check_name_part(value: str, what: str, code: str) -> None:
    if not value or len(value) > 64:
        raise PkiError(code, f"the CA {what} must be 1-64 characters, got {len(value or '')}")
    if not value.isprintable() or value != value.strip():
        # control characters (NUL among them), lone surrogates and edge spaces make names that
        # compare or display differently from what an admin typed
        raise PkiError(code, f"the CA {what} must be printable characters without leading or trailing spaces")


def public_key_sha256(public_key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of the SubjectPublicKeyInfo: how the ledger recognises a key."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize().hex()


def build_root(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    validity: Validity,
) -> x509.Certificate:
    """A self-signed root. `public_key` must be the public half of `signing_key`."""
    if public_key_sha256(public_key) != public_key_sha256(signing_key.public_key()):
        raise PkiError("key-mismatch", "the root's public key is not the public half of its signing key")
    builder = (
        _base(subject, subject, public_key, validity)
        .add_extension(_CA_BASIC, critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return builder.sign(signing_key, signature_hash(signing_key))


@dataclass
class Issuer:
    """A CA certificate with the key that signs for it, ready to issue children quickly."""

    certificate: x509.Certificate
    signing_key: ec.EllipticCurvePrivateKey
    _hash: hashes.HashAlgorithm = field(init=False, repr=False)
    _aki: x509.AuthorityKeyIdentifier = field(init=False, repr=False)
    _device_template: tuple[Validity, x509.CertificateBuilder] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        cert_key = self.certificate.public_key()
        if not isinstance(cert_key, ec.EllipticCurvePublicKey):
            raise PkiError("unsupported-issuer", "the issuer certificate does not hold an ECC key")
        if public_key_sha256(cert_key) != public_key_sha256(self.signing_key.public_key()):
            raise PkiError("key-mismatch", "the issuer's signing key does not match its certificate")
        self._hash = signature_hash(self.signing_key)
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(cert_key)

    @property
    def subject(self) -> x509.Name:
        return self.certificate.subject

    def validity(self, now: datetime, days: float) -> Validity:
        return plan_validity(now, days, self.certificate)

    def issue_intermediate(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, validity: Validity
    ) -> x509.Certificate:
        builder = (
            _base(subject, self.subject, public_key, validity)
            .add_extension(_INTERMEDIATE_BASIC, critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        return builder.sign(self.signing_key, self._hash)

    def issue_device(
        self, device_id: str, public_key: ec.EllipticCurvePublicKey, validity: Validity
    ) -> x509.Certificate:
        """A device certificate: CN = device ID, clientAuth; the caller has checked the CSR."""
        builder = (
            self._device_builder(validity)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .public_key(public_key)
            .serial_number(new_serial())
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        return builder.sign(self.signing_key, self._hash)

    def _device_builder(self, validity: Validity) -> x509.CertificateBuilder:
        """What every device certificate of one validity period shares, built once (builders are immutable)."""
        template = self._device_template
        if template is None or template[0] != validity:
            builder = (
                x509.CertificateBuilder()
                .issuer_name(self.subject)
                .not_valid_before(validity.not_before)
                .not_valid_after(validity.not_after)
                .add_extension(_END_ENTITY_BASIC, critical=True)
                .add_extension(_DEVICE_KEY_USAGE, critical=True)
                .add_extension(_CLIENT_AUTH, critical=False)
                .add_extension(self._aki, critical=False)
            )
            template = self._device_template = (validity, builder)
        return template[1]

    def issue_proof_of_possession(self, verification_code: str, now: datetime) -> x509.Certificate:
        """The verification certificate DPS asks for: CN = its code, signed by this (root) key."""
        check_verification_code(verification_code)
        validity = plan_validity(
            now, PROOF_OF_POSSESSION_LIFETIME.days, self.certificate, backdate=PROOF_OF_POSSESSION_BACKDATE
        )
        # Only the root's signature proves possession; the subject key is a throwaway, as in Microsoft's
        # own verification scripts.
        public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, verification_code)])
        builder = (
            _base(subject, self.subject, public_key, validity)
            .add_extension(_END_ENTITY_BASIC, critical=True)
            .add_extension(_DEVICE_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        return builder.sign(self.signing_key, self._hash)


def _base(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    validity: Validity,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
    )
