"""CA keys as PKCS#8 files under PKI_HOME/keys: mode 0600, encrypted when a passphrase is set."""

import os
import shlex
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import Conflict, Misconfigured, NotFound
from ..pki import ca_curve
from . import KeyStore


class LocalKeyStore(KeyStore):
    backend = "local"

    def __init__(self, home: Path, passphrase: str | None = None) -> None:
        self.directory = Path(home) / "keys"
        self._passphrase = passphrase.encode() if passphrase else None
        self._loaded: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._lock = threading.Lock()

    def create_ca_key(self, name: str, curve: str, common_name: str) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ca_curve(curve))
        encryption = (
            serialization.BestAvailableEncryption(self._passphrase)
            if self._passphrase
            else serialization.NoEncryption()
        )
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        self._write_new(self._key_path(name), pem, mode=0o600)
        with self._lock:
            self._loaded[name] = key
        return key

    def install_ca_certificate(self, name: str, certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [certificate, *chain])
        self._write_new(self.directory / f"{name}.crt.pem", pem, mode=0o644)

    def delete_ca_key(self, name: str) -> str | None:
        with self._lock:
            self._loaded.pop(name, None)
        for path in (self._key_path(name), self.directory / f"{name}.crt.pem"):
            path.unlink(missing_ok=True)
        _fsync_directory(self.directory)
        return None

    def signing_key(self, name: str) -> ec.EllipticCurvePrivateKey:
        with self._lock:
            key = self._loaded.get(name)
        if key is None:
            key = self._load(name)
            with self._lock:
                self._loaded[name] = key
        return key

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.backend,
            "directory": str(self.directory),
            "encrypted": "yes" if self._passphrase else "no",
        }

    def backup_into(self, home: Path) -> str:
        """The key and certificate files, byte for byte, into home/keys (folder 0700, keys 0600)."""
        target = Path(home) / "keys"
        target.mkdir(mode=0o700, exist_ok=True)
        files = sorted(self.directory.glob("*.pem")) if self.directory.is_dir() else []
        for source in files:
            mode = 0o600 if source.name.endswith(".key.pem") else 0o644
            self._copy(source, target / source.name, mode)
        _fsync_directory(target)
        keys = sum(source.name.endswith(".key.pem") for source in files)
        encrypted = "encrypted with PKI_KEY_PASSPHRASE" if self._passphrase else "NOT encrypted: keep the copy safe"
        return f"{keys} CA key file(s) in keys/ ({encrypted})"

    @staticmethod
    def _copy(source: Path, target: Path, mode: int) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, source.read_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _key_path(self, name: str) -> Path:
        return self.directory / f"{name}.key.pem"

    def _load(self, name: str) -> ec.EllipticCurvePrivateKey:
        path = self._key_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"CA key {name!r} is not in {self.directory}", "key-not-found") from None
        encrypted = b"ENCRYPTED PRIVATE KEY" in data
        if encrypted and not self._passphrase:
            raise Misconfigured(f"CA key file {path} is encrypted; set PKI_KEY_PASSPHRASE", "key-passphrase-missing")
        if self._passphrase and not encrypted:  # the operator believes the keys are encrypted: they are not
            source, target = shlex.quote(str(path)), shlex.quote(f"{path}.new")
            raise Misconfigured(
                f"CA key file {path} is not encrypted although PKI_KEY_PASSPHRASE is set (it was made without "
                f"one, as may be the other key files there): encrypt it with `openssl pkcs8 -topk8 -v2 aes-256-cbc "
                f"-in {source} -out {target} -passout env:PKI_KEY_PASSPHRASE` and move {path.name}.new over it, "
                "or unset PKI_KEY_PASSPHRASE",
                "key-not-encrypted",
            )
        try:
            key = serialization.load_pem_private_key(data, self._passphrase if encrypted else None)
        except (ValueError, TypeError):
            raise Misconfigured(
                f"CA key file {path} cannot be read with the configured PKI_KEY_PASSPHRASE", "key-passphrase-wrong"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise Misconfigured(f"CA key file {path} does not hold an ECC key", "key-invalid")
        return key

    def _write_new(self, path: Path, data: bytes, mode: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise Conflict(f"{path} already exists; refusing to overwrite a CA file", "key-exists") from None
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; make it exact
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
