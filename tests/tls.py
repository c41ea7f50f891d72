"""A real TLS stack on loopback, configured as IoT Hub and DPS are: TLS 1.2, ECDHE-ECDSA-AES-GCM, client certs."""

import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEVICE_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"


@dataclass
class HandshakeResult:
    ok: bool
    server_error: str | None
    client_error: str | None
    peer_common_name: str | None
    cipher: str | None
    version: str | None


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_server_identity(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway "hub" CA and an ECDSA server certificate for localhost: (ca, cert, key) files."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Hub CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = directory / "hub-ca.pem", directory / "hub.pem", directory / "hub.key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(key_file, server_key)
    return ca_file, cert_file, key_file


def server_context(trusted_root: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(DEVICE_CIPHERS)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(trusted_root))  # only the device CA root
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def device_context(hub_ca: Path, chain_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(hub_ca))
    context.load_cert_chain(str(chain_file), str(key_file))  # device certificate, then the intermediate
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> HandshakeResult:
    """One connection on loopback; both sides' view of it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    outcome: dict = {}

    def serve() -> None:
        connection, _ = listener.accept()
        try:
            with server.wrap_socket(connection, server_side=True) as tls:
                peer = tls.getpeercert()
                subject = dict(item[0] for item in peer["subject"])
                outcome.update(cn=subject.get("commonName"), cipher=tls.cipher()[0], version=tls.version())
                tls.sendall(b"hello device")
        except (ssl.SSLError, OSError) as error:
            outcome["server_error"] = str(error)
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_error = None
    try:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            greeting = tls.recv(64)  # TLS 1.2: a refused client certificate surfaces here at the latest
            if greeting != b"hello device":
                client_error = f"unexpected greeting {greeting!r}"
    except (ssl.SSLError, OSError) as error:
        client_error = str(error)
    thread.join(timeout=30)
    server_error = outcome.get("server_error")
    return HandshakeResult(
        ok=server_error is None and client_error is None,
        server_error=server_error,
        client_error=client_error,
        peer_common_name=outcome.get("cn"),
        cipher=outcome.get("cipher"),
        version=outcome.get("version"),
    )
