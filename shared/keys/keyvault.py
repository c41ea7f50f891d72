"""CA keys and CA certificates in Azure Key Vault.

Each CA key is created inside the vault as the key of a Key Vault certificate (issuer "Unknown", EC-HSM
on a Premium vault or EC, not exportable) and never leaves it: every signature is a Key Vault `sign`
call. The root is built from the pending certificate's CSR public key and signed with that same key; an
intermediate's is signed by the root's. Both are then merged into the vault.

Sign calls are paced to the vault's throttle limit (slowing down when Key Vault answers 429, as other
callers may share the vault) and retried on 429 and transient failures with exponential backoff and
jitter, honouring Retry-After; azure-core does not retry a POST on 429 without one. After a bounded time
of failing, the caller gets BackendUnavailable ("Key Vault unavailable").
"""

import email.utils
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import requests
from azure.core.credentials import TokenCredential
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import RequestsTransport
from azure.keyvault.certificates import (
    CertificateClient,
    CertificateOperation,
    CertificatePolicy,
    KeyCurveName,
    KeyType,
    KeyUsageType,
)
from azure.keyvault.keys import KeyClient, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient, SignatureAlgorithm
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from requests.adapters import HTTPAdapter

from ..errors import BackendUnavailable, CaError, Conflict, Misconfigured
from . import KeyStore

T = TypeVar("T")

_CURVES = {
    "P-256": (KeyCurveName.p_256, SignatureAlgorithm.es256, hashes.SHA256),
    "P-384": (KeyCurveName.p_384, SignatureAlgorithm.es384, hashes.SHA384),
}
_BY_CURVE_NAME = {"secp256r1": "P-256", "secp384r1": "P-384"}
_TRANSIENT = {408, 429, 500, 502, 503, 504}
ROLES_HINT = (
    "the service identity needs 'Key Vault Crypto User' to sign, and 'Key Vault Certificates Officer' to create "
    "and merge CA certificates"
)


@dataclass(frozen=True)
class KeyVaultOptions:
    hardware_protected: bool = True  # EC-HSM (Premium vault); EC for a Standard vault
    sign_rate: float | None = 200.0  # signs a second this instance allows itself; None: no pacing
    parallel_signatures: int = 32  # sign calls in flight at once when signing many certificates
    retry_seconds: float = 30.0  # how long a sign may keep failing before the caller is told
    first_retry_delay: float = 1.0  # Microsoft's guidance for 429: 1 s, 2 s, 4 s ...
    max_retry_delay: float = 8.0


class SignPacer:
    """Spaces sign calls to at most `rate` a second across threads. A 429 means someone else uses the vault
    too: the rate drops by 30%, and comes back by 1% of the maximum with each sign that succeeds."""

    def __init__(self, rate: float) -> None:
        self.max_rate = self.rate = rate
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + 1 / self.rate
        if slot > now:
            time.sleep(slot - now)

    def throttled(self) -> None:
        with self._lock:
            self.rate = max(self.max_rate / 10, self.rate * 0.7)

    def succeeded(self) -> None:
        if self.rate < self.max_rate:
            with self._lock:
                self.rate = min(self.max_rate, self.rate + self.max_rate / 100)


class VaultGate:
    """Every sign call to one vault goes through here: paced, retried, and given up on in bounded time."""

    def __init__(self, options: KeyVaultOptions) -> None:
        self.options = options
        self.pacer = SignPacer(options.sign_rate) if options.sign_rate else None

    def sign(self, client: CryptographyClient, algorithm: SignatureAlgorithm, digest: bytes) -> bytes:
        failing_since: float | None = None
        attempt = 0
        while True:
            if self.pacer:
                self.pacer.wait()
            try:
                signature = client.sign(algorithm, digest).signature
            except HttpResponseError as error:
                if error.status_code not in _TRANSIENT:
                    raise vault_error(error, "sign") from None
                if error.status_code == 429 and self.pacer:
                    self.pacer.throttled()
                last = f"{error.status_code} {error.reason or ''}".strip()
                wait = _retry_after(error) or self._backoff(attempt)
            except (ServiceRequestError, ServiceResponseError) as error:
                last, wait = f"no answer ({type(error).__name__})", self._backoff(attempt)
            else:
                if self.pacer:
                    self.pacer.succeeded()
                return signature
            now = time.monotonic()
            failing_since = failing_since if failing_since is not None else now
            if now + wait - failing_since > self.options.retry_seconds:
                raise BackendUnavailable(
                    f"Key Vault unavailable: signing kept failing for {now - failing_since:.1f} s "
                    f"(last answer: {last})",
                    "key-vault-unavailable",
                    retry_after=max(1, round(wait)),
                )
            time.sleep(wait)
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.options.max_retry_delay, self.options.first_retry_delay * 2**attempt)
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret


class KeyVaultSigningKey(ec.EllipticCurvePrivateKey):
    """A CA key held in Key Vault, as `cryptography` sees a private key: `sign` hashes the data, calls Key
    Vault's sign (ES256 or ES384), and turns its raw r||s into DER. There is nothing else to take."""

    def __init__(self, client: CryptographyClient, key: KeyVaultKey, gate: VaultGate) -> None:
        jwk = key.key
        # the SDK gives a curve it knows as its enum (whose str() is the enum's name), a newer one as text
        self.curve_name = str(getattr(jwk.crv, "value", jwk.crv))
        if jwk.crv is None:  # no curve at all: an RSA (or symmetric) key, named by its type
            kty = str(getattr(jwk.kty, "value", jwk.kty)).removesuffix("-HSM")
            raise Misconfigured(
                f"Key Vault key {key.name} is an {kty} key; CA keys are EC, on P-256 or P-384", "key-invalid"
            )
        if self.curve_name not in _CURVES:
            raise Misconfigured(
                f"Key Vault key {key.name} is on {self.curve_name}; CA keys are P-256 or P-384", "key-invalid"
            )
        _, self._algorithm, self._hash = _CURVES[self.curve_name]
        curve = ec.SECP256R1() if self.curve_name == "P-256" else ec.SECP384R1()
        numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(jwk.x, "big"), int.from_bytes(jwk.y, "big"), curve)
        self._public_key = numbers.public_key()
        self._size = (curve.key_size + 7) // 8
        self._client = client
        self._gate = gate
        self.parallel_signatures = gate.options.parallel_signatures

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise ValueError("Key Vault EC keys sign with ECDSA only")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            algorithm, digest = algorithm._algorithm, data
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(data)
            digest = hasher.finalize()
        if not isinstance(algorithm, self._hash):
            raise ValueError(f"a {self.curve_name} key in Key Vault signs with {self._hash.name}, not {algorithm.name}")
        raw = self._gate.sign(self._client, self._algorithm, digest)
        if len(raw) != 2 * self._size:
            raise BackendUnavailable(f"Key Vault returned a {len(raw)}-byte signature", "key-vault-bad-answer")
        r, s = int.from_bytes(raw[: self._size], "big"), int.from_bytes(raw[self._size :], "big")
        return utils.encode_dss_signature(r, s)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise NotImplementedError("CA keys in Key Vault only sign")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise NotImplementedError("a Key Vault key never leaves the vault")

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        raise NotImplementedError("a Key Vault key never leaves the vault")

    def __copy__(self) -> "KeyVaultSigningKey":
        return self

    def __deepcopy__(self, memo: dict) -> "KeyVaultSigningKey":
        return self


class KeyVaultKeyStore(KeyStore):
    backend = "keyvault"
    remote = True

    def __init__(
        self,
        vault_url: str,
        credential: TokenCredential,
        options: KeyVaultOptions | None = None,
        session: requests.Session | None = None,
    ) -> None:
        """One connection pool (sized for the parallel signs) and one set of clients serve every call. A
        `session` passed in stays its caller's: closing the store closes only a session it made."""
        self.vault_url = vault_url.rstrip("/")
        self.options = options or KeyVaultOptions()
        self._owns_session = session is None
        self._session = session or _pooled_session(self.options.parallel_signatures + 4)
        # every client shares the transport, so none may close the session when it is closed
        self._transport = RequestsTransport(session=self._session, session_owner=False)
        self._credential = credential
        self._certificates = CertificateClient(self.vault_url, credential, transport=self._transport)
        self._keys = KeyClient(self.vault_url, credential, transport=self._transport)
        self._gate = VaultGate(self.options)
        self._signers: dict[str, KeyVaultSigningKey] = {}
        self._lock = threading.Lock()

    def create_ca_key(self, name: str, curve: str, common_name: str) -> ec.EllipticCurvePrivateKey:
        curve = curve.upper()
        if curve not in _CURVES:
            raise CaError(f"CA curve {curve!r} is not accepted; use P-256 or P-384", "unsupported-curve")
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)]).rfc4514_string()
        policy = CertificatePolicy(
            issuer_name="Unknown",
            subject=subject,
            key_type=KeyType.ec_hsm if self.options.hardware_protected else KeyType.ec,
            key_curve_name=_CURVES[curve][0],
            exportable=False,
            reuse_key=False,
            key_usage=[KeyUsageType.key_cert_sign, KeyUsageType.crl_sign],
        )
        operation = _vault_call(
            f"create certificate {name}", lambda: self._certificates.begin_create_certificate(name, policy).result()
        )
        if not isinstance(operation, CertificateOperation) or not operation.csr:
            raise Misconfigured(
                f"Key Vault did not leave certificate {name} pending with a CSR", "key-vault-bad-answer"
            )
        csr = x509.load_der_x509_csr(bytes(operation.csr))
        signer = self._signer(name)  # the pending certificate's key: the newest version of `name`
        if _spki(csr.public_key()) != _spki(signer.public_key()):
            raise Misconfigured(f"Key Vault's key {name} does not match its pending CSR", "key-vault-bad-answer")
        return signer

    def install_ca_certificate(self, name: str, certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
        ders = [c.public_bytes(serialization.Encoding.DER) for c in [certificate, *chain]]
        _vault_call(f"merge certificate {name}", lambda: self._certificates.merge_certificate(name, ders))

    def delete_ca_key(self, name: str) -> str | None:
        """Key Vault's deletion is soft and may lack permission here: the certificate (with its key) is
        left in place, and the sentence says how an admin removes it."""
        with self._lock:
            self._signers.pop(name, None)
        vault = urlparse(self.vault_url).hostname or self.vault_url
        vault_name = vault.split(".", 1)[0]
        return (
            f"Key Vault certificate {name!r} (with its key) was made for this attempt and left in the vault; "
            f"remove it with: az keyvault certificate delete --vault-name {vault_name} --name {name}"
        )

    def signing_key(self, name: str) -> ec.EllipticCurvePrivateKey:
        with self._lock:
            signer = self._signers.get(name)
        return signer or self._signer(name)

    def certificate_expiries(self) -> dict[str, datetime | None]:
        """When each certificate in the vault expires, as Key Vault lists them (for the expiry scan)."""
        return _vault_call(
            "list certificates",
            lambda: {p.name or "": p.expires_on for p in self._certificates.list_properties_of_certificates()},
        )

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.backend,
            "vault": self.vault_url,
            "keyType": "EC-HSM" if self.options.hardware_protected else "EC",
        }

    def backup_into(self, home: Path) -> str:
        return f"no CA keys: they stay in Key Vault {self.vault_url}, where a restored ledger finds them by name"

    def close(self) -> None:
        self._certificates.close()
        self._keys.close()
        if self._owns_session:
            self._session.close()

    def _signer(self, name: str) -> KeyVaultSigningKey:
        key = _vault_call(f"get key {name}", lambda: self._keys.get_key(name))
        # Built from the key itself, the client has the public key and never fetches it again; sign calls
        # are retried by the gate alone (no azure-core retries under it).
        client = CryptographyClient(key, self._credential, transport=self._transport, retry_total=0)
        signer = KeyVaultSigningKey(client, key, self._gate)
        with self._lock:
            self._signers[name] = signer
        return signer


def vault_error(error: HttpResponseError, action: str) -> CaError:
    """What a Key Vault error means for our caller."""
    status = error.status_code or 0
    detail = " ".join(str(error.message or error.reason or "").split())[:300]
    if status in (401, 403):
        return Misconfigured(f"Key Vault refused to {action}: {detail}; {ROLES_HINT}", "key-vault-forbidden")
    if status == 404:
        # the caller never names a vault object: a key or certificate missing there is the service's fault (a
        # 500, whose words callers do not see), never a 404 that hands Key Vault's own text to a device
        return Misconfigured(f"Key Vault could not {action}: not found ({detail})", "key-vault-not-found")
    if status == 409:
        return Conflict(f"Key Vault could not {action}: {detail}", "key-vault-conflict")
    if status in _TRANSIENT:
        return BackendUnavailable(f"Key Vault unavailable: could not {action} ({status})", "key-vault-unavailable")
    return Misconfigured(f"Key Vault could not {action}: {status} {detail}", "key-vault-error")


def _vault_call(action: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except HttpResponseError as error:
        raise vault_error(error, action) from None
    except (ServiceRequestError, ServiceResponseError) as error:
        raise BackendUnavailable(
            f"Key Vault unavailable: could not {action} ({error})", "key-vault-unavailable"
        ) from None


def _retry_after(error: HttpResponseError) -> float | None:
    value = error.response.headers.get("Retry-After") if error.response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _pooled_session(connections: int) -> requests.Session:
    session = requests.Session()
    session.mount("https://", HTTPAdapter(pool_connections=4, pool_maxsize=connections))
    return session


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
