"""The floor of this stack, for bench/http_sign.py: an ASGI app on uvicorn that does only what any Python
CA must do per request with `cryptography`, and nothing a real CA adds (no authentication, no CSR policy,
no ledger, no error handling): read the PEM CSR, verify its signature, build and sign a device certificate
with the device extensions, answer its PEM in JSON. No server on this stack can sign faster than this.

    PYTHONPATH=bench uvicorn floor_app:app
"""

import json
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from starlette.types import Receive, Scope, Send

_KEY = ec.generate_private_key(ec.SECP256R1())
_NOW = datetime.now(UTC)
_TEMPLATE = (
    x509.CertificateBuilder()
    .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "floor intermediate")]))
    .not_valid_before(_NOW - timedelta(minutes=5))
    .not_valid_after(_NOW + timedelta(days=365))
    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(_KEY.public_key()), critical=False)
)
_HEADERS = [(b"content-type", b"application/json")]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    csr = x509.load_pem_x509_csr(body)
    if not csr.is_signature_valid:
        raise ValueError("bad CSR signature")
    public_key = csr.public_key()
    certificate = (
        _TEMPLATE.subject_name(csr.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(_KEY, hashes.SHA256())
    )
    payload = json.dumps({"certificate": certificate.public_bytes(serialization.Encoding.PEM).decode()}).encode()
    headers = [*_HEADERS, (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
