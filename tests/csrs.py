"""Building CSRs for tests, good and bad."""

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def device_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def make_csr(
    common_name: str | list[str] | None = "device-1",
    key=None,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),
    hash_algorithm: hashes.HashAlgorithm | None = None,
    extra_attributes: list[x509.NameAttribute] = (),
    encoding: serialization.Encoding = serialization.Encoding.PEM,
) -> bytes:
    """A CSR for `common_name` (a list gives several CNs, None gives none); a new P-256 key by default."""
    key = key or device_key()
    names = [] if common_name is None else [common_name] if isinstance(common_name, str) else common_name
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False) for cn in names]
    attributes += list(extra_attributes)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    algorithm = hash_algorithm or (None if _is_edwards(key) else hashes.SHA256())
    return builder.sign(key, algorithm).public_bytes(encoding)


def csr_with_broken_signature(common_name: str = "device-1") -> bytes:
    der = bytearray(make_csr(common_name, encoding=serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature's INTEGER s: still DER, no longer valid
    return bytes(der)


def csr_asking_for_ca(common_name: str) -> bytes:
    """A CSR requesting CA:TRUE, keyCertSign and serverAuth: a device profile must ignore all of it."""
    return make_csr(
        common_name,
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]), False),
            (x509.SubjectAlternativeName([x509.DNSName("evil.example.com")]), False),
        ],
        extra_attributes=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Someone Else")],
    )


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _is_edwards(key) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    return isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
