"""A fake Azure Key Vault that speaks its REST API at the HTTP level.

It is a `requests` transport adapter: mount it on the session of the real azure-keyvault clients and
every request they make (the bearer-challenge handshake, certificate create / pending / merge / get /
list, key get, sign) arrives here as an HTTP request and leaves as an HTTP response. Keys are real ECDSA
keys that never leave the fake: only public JWKs and signatures go out, and a sign answers with raw
`r||s` as Key Vault does. Latency, a sign throttle and failures can be switched on, for sign or for any
other operation.

It refuses what Key Vault refuses: an api-version it does not know, a create while the certificate's
creation is pending (409), a sign with a key that is disabled, outside its nbf/exp, or without the `sign`
operation (403); and it pages listings with `nextLink`.
"""

import asyncio
import base64
import hashlib
import io
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlparse

import requests
import urllib3
from azure.core.credentials import AccessToken
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import ExtendedKeyUsageOID
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

VAULT_URL = "https://device-ca-test.vault.azure.net"
TOKEN = "fake-key-vault-token"
TENANT = "72f988bf-0000-0000-0000-000000000000"
CHALLENGE = f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="https://vault.azure.net"'
# Key Vault's EC curves: (curve, sign algorithm, coordinate bytes, digest)
_CURVES = {
    "P-256": (ec.SECP256R1(), "ES256", 32, hashes.SHA256()),
    "P-384": (ec.SECP384R1(), "ES384", 48, hashes.SHA384()),
    "P-521": (ec.SECP521R1(), "ES512", 66, hashes.SHA512()),
    "P-256K": (ec.SECP256K1(), "ES256K", 32, hashes.SHA256()),
}
API_VERSIONS = {"7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01", "2026-04-01"}
OPERATIONS = ("create", "pending", "merge", "list", "get-certificate", "get-key", "sign")


class FakeCredential:
    """A TokenCredential that hands out one fixed token and records the scopes asked for."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(TOKEN, int(time.time()) + 3600)


@dataclass
class KeyVersion:
    name: str
    version: str
    curve: str
    kty: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    key_ops: tuple[str, ...] = ("sign", "verify")
    enabled: bool = True
    not_before: int | None = None  # Unix seconds, as Key Vault's attributes.nbf / exp
    expires: int | None = None
    reported_curve: str | None = None  # the crv the vault reports instead, as a newer service might

    def refuses(self, operation: str) -> str | None:
        """Why Key Vault would refuse `operation` with this key now (it answers 403), or None."""
        now = time.time()
        if not self.enabled:
            return f"Operation {operation} is not allowed on a disabled key"
        if (self.not_before and now < self.not_before) or (self.expires and now >= self.expires):
            return f"Operation {operation} is not allowed: the key is not valid at this time"
        if operation not in self.key_ops:
            return f"Operation {operation} is not permitted on this key"
        return None

    @property
    def kid(self) -> str:
        return f"{VAULT_URL}/keys/{self.name}/{self.version}"

    def jwk(self) -> dict:
        numbers = self.private_key.public_key().public_numbers()
        size = _CURVES[self.curve][2]
        return {
            "kid": self.kid,
            "kty": self.kty,
            "crv": self.reported_curve or self.curve,
            "key_ops": list(self.key_ops),
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }


@dataclass
class CertificateState:
    name: str
    policy: dict
    pending_key: KeyVersion | None = None
    pending_csr: bytes | None = None
    versions: list[tuple[str, bytes, KeyVersion]] = field(default_factory=list)  # (version, DER, key)


class TokenBucket:
    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity, self.tokens = rate, capacity, capacity
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class FakeKeyVault(BaseAdapter):
    def __init__(
        self,
        premium: bool = True,
        sign_latency: float = 0.0,
        sign_rate: float | None = None,
        sign_failures: Callable[[int], int | None] | None = None,
        failure_headers: dict[str, str] | None = None,
        page_size: int = 25,
    ) -> None:
        """`sign_rate` throttles signs (429 without Retry-After above it); `sign_failures(n)` may
        return a status to answer the n-th sign call with (1-based) instead of signing, with
        `failure_headers` (none by default: Key Vault's 429s have come without Retry-After).
        `failures[operation]` does the same for any operation of OPERATIONS (sign included);
        listings come `page_size` items a page."""
        super().__init__()
        self.premium = premium
        self.sign_latency = sign_latency
        self.throttle = TokenBucket(sign_rate, sign_rate) if sign_rate else None
        self.sign_failures = sign_failures
        self.failure_headers = failure_headers or {}
        self.failures: dict[str, Callable[[int], int | None]] = {}
        self.calls: dict[str, int] = dict.fromkeys(OPERATIONS, 0)
        self.page_size = page_size
        self.csrs: dict[str, bytes] = {}  # every CSR made, by certificate name
        self.in_flight = self.most_in_flight = 0
        # signs_meet = n: each sign waits (up to 10 s) until n signs are in flight, so a test sees whether the
        # client really keeps n at once, whatever the threads' timing
        self.signs_meet: int | None = None
        self.keys: dict[str, list[KeyVersion]] = {}
        self.certificates: dict[str, CertificateState] = {}
        self.lock = threading.Lock()
        self.arrivals = threading.Condition(self.lock)
        self.sign_calls = 0
        self.sign_algorithms: list[str] = []
        self.statuses: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.on_event_loop: list[str] = []  # the paths of requests made from a thread running an event loop
        self.unauthenticated = 0
        self.closed = False  # a session this fake is mounted on was closed

    def session(self) -> requests.Session:
        """A requests session whose calls to the vault land here."""
        session = requests.Session()
        session.mount(VAULT_URL, self)
        return session

    # -- the HTTP level ----------------------------------------------------------------------------

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:
        url = urlparse(request.url)
        try:
            asyncio.get_running_loop()
            self.on_event_loop.append(url.path)  # a blocking call that holds every other request's coroutine
        except RuntimeError:
            pass
        versions = parse_qs(url.query or "").get("api-version", [])
        if not versions:
            return self._answer(request, 400, _error("BadParameter", "api-version is required"))
        if versions[0] not in API_VERSIONS:
            return self._answer(
                request, 400, _error("BadParameter", f"The specified version ({versions[0]}) is not recognized")
            )
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.unauthenticated += 1
            return self._answer(
                request, 401, _error("Unauthorized", "no bearer token"), {"WWW-Authenticate": CHALLENGE}
            )
        body = json.loads(request.body) if request.body else {}
        for method, pattern, operation, handler in self._routes():
            match = re.fullmatch(pattern, url.path)
            if match and request.method == method:
                injected = self._injected_failure(operation)
                if injected:
                    return self._answer(request, *injected)
                if operation == "list":
                    status, document, headers = handler(body, parse_qs(url.query or ""))
                else:
                    status, document, headers = handler(body, *match.groups())
                return self._answer(request, status, document, headers)
        return self._answer(request, 404, _error("NotFound", f"no route {request.method} {url.path}"))

    def close(self) -> None:
        """requests calls this for each mounted adapter when the session is closed."""
        self.closed = True

    def _routes(self) -> list:
        name, version = r"([0-9a-zA-Z-]+)", r"([0-9a-f]{32})"
        return [
            ("POST", rf"/certificates/{name}/create", "create", self._create_certificate),
            ("GET", rf"/certificates/{name}/pending", "pending", self._pending),
            ("POST", rf"/certificates/{name}/pending/merge", "merge", self._merge),
            ("GET", r"/certificates/?", "list", self._list_certificates),
            ("GET", rf"/certificates/{name}/?", "get-certificate", self._get_certificate),
            ("GET", rf"/keys/{name}/?", "get-key", self._get_key),
            ("GET", rf"/keys/{name}/{version}", "get-key", self._get_key),
            ("POST", rf"/keys/{name}/{version}/sign", "sign", self._sign),
        ]

    def _injected_failure(self, operation: str) -> tuple | None:
        """(status, error, headers) when `failures[operation]` says this call fails (sign counts its own)."""
        with self.lock:
            self.calls[operation] += 1
            call = self.calls[operation]
        failing = self.failures.get(operation)
        status = failing(call) if failing else None
        if not status:
            return None
        return status, _error("Throttled" if status == 429 else "Failed", f"answering {status}"), self.failure_headers

    def key(self, name: str) -> KeyVersion:
        """The newest version of key `name`, to change its attributes in a test."""
        return self.keys[name][-1]

    def add_key_version(self, name: str, curve: str, kty: str = "EC") -> KeyVersion:
        """A new version of key `name` on `curve`, as an admin's `az keyvault key create` makes one."""
        return self._new_key_version(name, curve, kty)

    def _answer(
        self, request: requests.PreparedRequest, status: int, document: dict | None, headers: dict | None = None
    ) -> requests.Response:
        response = requests.Response()
        response.status_code = status
        response.reason = {200: "OK", 201: "Created", 202: "Accepted"}.get(status, "Error")
        content = json.dumps(document).encode() if document is not None else b""
        response.headers = CaseInsensitiveDict(
            {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(content)), **(headers or {})}
        )
        response.raw = urllib3.HTTPResponse(
            body=io.BytesIO(content), headers=dict(response.headers), status=status, preload_content=False
        )
        response._content = content
        response.encoding = "utf-8"
        response.url = request.url
        response.request = request
        with self.lock:
            self.statuses.append((request.method or "", urlparse(request.url).path, status))
        return response

    # -- certificates ------------------------------------------------------------------------------

    def _create_certificate(self, body: dict, name: str) -> tuple:
        policy = body.get("policy", {})
        key_props, issuer = policy.get("key_props", {}), policy.get("issuer", {})
        subject = policy.get("x509_props", {}).get("subject")
        kty, curve = key_props.get("kty"), key_props.get("crv")
        if kty not in ("EC", "EC-HSM") or curve not in _CURVES:
            return 400, _error("BadParameter", f"The curve {curve} of key type {kty} is not supported"), None
        if kty == "EC-HSM" and not self.premium:
            return 400, _error("BadParameter", "EC-HSM keys need a Premium vault"), None
        if key_props.get("exportable"):
            return 400, _error("BadParameter", "exportable keys need a release policy"), None
        if issuer.get("name") != "Unknown" or not subject:
            return 400, _error("BadParameter", "this fake makes CSRs for issuer Unknown with a subject"), None
        existing = self.certificates.get(name)
        if existing is not None and existing.pending_key is not None:
            return 409, _error("Conflict", f"Certificate {name} is currently being created"), None
        key = self._new_key_version(name, curve, kty)
        csr = _key_vault_csr(key, subject)
        with self.lock:
            state = self.certificates.setdefault(name, CertificateState(name, policy))
            state.policy, state.pending_key, state.pending_csr = policy, key, csr
            self.csrs[name] = csr
        return 202, self._operation(state), {"Location": f"{VAULT_URL}/certificates/{name}/pending"}

    def _pending(self, body: dict, name: str) -> tuple:
        state = self.certificates.get(name)
        if state is None or state.pending_key is None:
            return 404, _error("PendingCertificateNotFound", f"no pending certificate {name}"), None
        return 200, self._operation(state), None

    def _merge(self, body: dict, name: str) -> tuple:
        state = self.certificates.get(name)
        if state is None or state.pending_key is None:
            return 404, _error("PendingCertificateNotFound", f"no pending certificate {name}"), None
        chain = [base64.b64decode(item) for item in body.get("x5c", [])]
        if not chain:
            return 400, _error("BadParameter", "x5c is empty"), None
        leaf = x509.load_der_x509_certificate(chain[0])
        if _spki(leaf.public_key()) != _spki(state.pending_key.private_key.public_key()):
            return (
                400,
                _error("BadParameter", "Public key from x509 certificate and key of this instance doesn't match"),
                None,
            )
        with self.lock:
            state.versions.append((state.pending_key.version, chain[0], state.pending_key))
            state.pending_key, state.pending_csr = None, None
        return 201, self._bundle(state, -1), None

    def _get_certificate(self, body: dict, name: str) -> tuple:
        state = self.certificates.get(name)
        if state is None or not state.versions:
            return 404, _error("CertificateNotFound", f"no certificate {name}"), None
        return 200, self._bundle(state, -1), None

    def _list_certificates(self, body: dict, query: dict) -> tuple:
        """One page of certificates; `nextLink` carries the offset as Key Vault's $skiptoken does."""
        start = int(query.get("$skiptoken", ["0"])[0])
        items = [
            {
                "id": f"{VAULT_URL}/certificates/{s.name}",
                "x5t": _x5t(s.versions[-1][1]),
                "attributes": _attributes(s.versions[-1][1]),
            }
            for s in self.certificates.values()
            if s.versions
        ]
        end = start + self.page_size
        next_link = f"{VAULT_URL}/certificates?api-version=7.6&$skiptoken={end}" if end < len(items) else None
        return 200, {"value": items[start:end], "nextLink": next_link}, None

    def _operation(self, state: CertificateState) -> dict:
        return {
            "id": f"{VAULT_URL}/certificates/{state.name}/pending",
            "issuer": {"name": "Unknown"},
            "csr": base64.b64encode(state.pending_csr or b"").decode(),
            "cancellation_requested": False,
            "status": "inProgress",
            "status_details": "Pending certificate created. Please Perform Merge to complete the request.",
            "request_id": secrets.token_hex(16),
        }

    def _bundle(self, state: CertificateState, index: int) -> dict:
        version, der, key = state.versions[index]
        return {
            "id": f"{VAULT_URL}/certificates/{state.name}/{version}",
            "kid": key.kid,
            "sid": f"{VAULT_URL}/secrets/{state.name}/{version}",
            "x5t": _x5t(der),
            "cer": base64.b64encode(der).decode(),
            "attributes": _attributes(der),
            "policy": {"id": f"{VAULT_URL}/certificates/{state.name}/policy", **state.policy},
        }

    # -- keys --------------------------------------------------------------------------------------

    def _new_key_version(self, name: str, curve: str, kty: str) -> KeyVersion:
        key = KeyVersion(name, secrets.token_hex(16), curve, kty, ec.generate_private_key(_CURVES[curve][0]))
        with self.lock:
            self.keys.setdefault(name, []).append(key)
        return key

    def _find_key(self, name: str, version: str | None) -> KeyVersion | None:
        versions = self.keys.get(name, [])
        if version is None:
            return versions[-1] if versions else None
        return next((key for key in versions if key.version == version), None)

    def _get_key(self, body: dict, name: str, version: str | None = None) -> tuple:
        key = self._find_key(name, version)
        if key is None:
            return 404, _error("KeyNotFound", f"no key {name}"), None
        now = int(time.time())
        attributes = {"enabled": key.enabled, "created": now, "updated": now, "nbf": key.not_before, "exp": key.expires}
        attributes = {name: value for name, value in attributes.items() if value is not None}
        return 200, {"key": key.jwk(), "attributes": attributes, "managed": True}, None

    def _sign(self, body: dict, name: str, version: str) -> tuple:
        with self.lock:
            self.sign_calls += 1
            call = self.sign_calls
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.arrivals.notify_all()
            if self.signs_meet:
                self.arrivals.wait_for(lambda: self.in_flight >= (self.signs_meet or 0), timeout=10)
        try:
            return self._sign_call(call, body, name, version)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _sign_call(self, call: int, body: dict, name: str, version: str) -> tuple:
        if self.sign_latency:
            time.sleep(self.sign_latency)
        if self.sign_failures and (status := self.sign_failures(call)):
            error = _error("Throttled" if status == 429 else "Failed", f"answering {status}")
            return status, error, self.failure_headers
        if self.throttle and not self.throttle.take():
            return 429, _error("Throttled", "Request was not processed because too many requests were received"), None
        key = self._find_key(name, version)
        if key is None:
            return 404, _error("KeyNotFound", f"no key {name}/{version}"), None
        refusal = key.refuses("sign")
        if refusal:
            return 403, _error("Forbidden", refusal), None
        _, algorithm, size, digest_algorithm = _CURVES[key.curve]
        digest = _b64url_decode(body.get("value", ""))
        if body.get("alg") != algorithm or len(digest) != digest_algorithm.digest_size:
            return 400, _error("BadParameter", f"{key.curve} signs {algorithm} over its own digest"), None
        prehashed = utils.Prehashed(digest_algorithm)
        r, s = utils.decode_dss_signature(key.private_key.sign(digest, ec.ECDSA(prehashed)))
        with self.lock:
            self.sign_algorithms.append(algorithm)
        return 200, {"kid": key.kid, "value": _b64url(r.to_bytes(size, "big") + s.to_bytes(size, "big"))}, None


def _key_vault_csr(key: KeyVersion, subject: str) -> bytes:
    """A CSR as Key Vault makes one: with extensions of its own, which a CA must not copy."""
    name = x509.Name.from_rfc4514_string(subject)
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    return builder.sign(key.private_key, _CURVES[key.curve][3]).public_bytes(serialization.Encoding.DER)


def _attributes(der: bytes) -> dict:
    cert = x509.load_der_x509_certificate(der)
    now = int(datetime.now(UTC).timestamp())
    return {
        "enabled": True,
        "nbf": int(cert.not_valid_before_utc.timestamp()),
        "exp": int(cert.not_valid_after_utc.timestamp()),
        "created": now,
        "updated": now,
    }


def _x5t(der: bytes) -> str:
    return _b64url(hashlib.sha1(der).digest())  # noqa: S324 - x5t is defined as SHA-1


def _spki(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _error(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


__all__ = ["VAULT_URL", "FakeCredential", "FakeKeyVault"]
