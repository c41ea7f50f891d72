"""What the benchmarks share: pre-made device CSRs (P-256 keys, CN = device ID)."""

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def device_csrs(count: int, prefix: str) -> list[tuple[str, bytes]]:
    """(device ID, PEM CSR) for `count` devices called PREFIX-00000, PREFIX-00001, ..."""
    csrs = []
    for index in range(count):
        device_id = f"{prefix}-{index:05d}"
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id)])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        csrs.append((device_id, csr.public_bytes(serialization.Encoding.PEM)))
    return csrs
