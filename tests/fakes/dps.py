"""A fake Azure DPS at the HTTP level: ARM's DPS resource and CA certificates, the DPS service API's
enrollment groups and individual enrollments, and an App Service managed-identity token endpoint.

It is a real HTTPS server on localhost (its certificate trusted through REQUESTS_CA_BUNDLE), so that the
real clients reach it in this process and in a CLI subprocess alike: `IotDpsClient` at `DPS_ARM_ENDPOINT`,
the service API at the `serviceOperationsHostName` the resource names (this server), and
DefaultAzureCredential's managed identity at IDENTITY_ENDPOINT.

It refuses what DPS refuses: an unknown api-version; a missing or wrong token or SAS signature (401);
bodies not in the documented shape (400); a PUT on an existing enrollment without If-Match (409, errorCode
409202) or with a stale one (412); iotHubs without allocationPolicy (400004); a 101st enrollment group
(403); on ARM, a stale etag (412), a quoted etag when `arm_etag_forms` excludes it (412 IH412001), and a
proof whose certificate's CN is not the issued code or whose signature the root's key does not verify
(400 IH400053). Answers never echo an enrollment's certificate. `failures[operation](n)` may answer the
n-th call of an operation with a status instead. `admits(chain)` answers as DPS matches a device.
"""

import base64
import hashlib
import hmac
import itertools
import json
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..tls import make_server_identity

SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
RESOURCE_GROUP = "device-ca-rg"
DPS_NAME = "device-ca-dps"
ID_SCOPE = "0ne00FAKE01"
GLOBAL_HOST = "global.azure-devices-provisioning.net"
TOKEN = "fake-managed-identity-token"
IDENTITY_HEADER = "fake-identity-header"
POLICY = "provisioningserviceowner"
ARM_API_VERSIONS = {"2026-11-01", "2025-02-01", "2022-12-12", "2022-02-05"}
SERVICE_API_VERSIONS = {"2021-10-01", "2026-04-01"}
MAX_GROUPS = 100
ARM_PATH = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    f"/providers/Microsoft.Devices/provisioningServices/{DPS_NAME}"
)
OPERATIONS = (
    "token",
    "arm-resource",
    "arm-certificate-get",
    "arm-certificate-put",
    "arm-code",
    "arm-verify",
    "group-get",
    "group-put",
    "group-query",
    "enrollment-get",
    "enrollment-put",
)


class PlainText(str):
    """A body sent as it is, not as JSON."""


@dataclass
class ArmCertificate:
    name: str
    der: bytes
    verified: bool
    etag: str
    code: str | None = None


@dataclass
class Enrollment:
    """An enrollment group (`certificate` = its signing certificate) or an individual enrollment (the
    device's client certificate), as DPS holds it."""

    id: str
    body: dict
    certificate: x509.Certificate
    etag: str
    enabled: bool
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


class FakeDps:
    def __init__(self, directory: Path, arm_etag_forms: tuple[str, ...] = ("quoted", "bare"), page_size: int = 10):
        self.arm_etag_forms = arm_etag_forms
        self.page_size = page_size
        self.key = base64.b64encode(secrets.token_bytes(32)).decode()
        self.failures: dict[str, Callable[[int], int | None]] = {}
        self.plain_failures = False  # injected failures answer text/plain instead of DPS's JSON error
        self.garbage: set[str] = set()  # operations that answer 200 with a body that is not JSON
        self.calls: dict[str, int] = dict.fromkeys(OPERATIONS, 0)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers) of each call
        self.certificates: dict[str, ArmCertificate] = {}
        self.groups: dict[str, Enrollment] = {}
        self.enrollments: dict[str, Enrollment] = {}
        self.lock = threading.Lock()
        self.ca_file, cert_file, key_file = make_server_identity(directory)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_file), str(key_file))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self)

            do_PUT = do_POST = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.host = f"localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what tests use ---------------------------------------------------------------------------

    @property
    def connection_string(self) -> str:
        return f"HostName={self.host};SharedAccessKeyName={POLICY};SharedAccessKey={self.key}"

    def environment(self, connection_string: bool = True) -> dict[str, str]:
        """The settings and environment that point the app at this fake (and trust its certificate)."""
        values = {
            "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION,
            "RESOURCE_GROUP_NAME": RESOURCE_GROUP,
            "DPS_NAME": DPS_NAME,
            "DPS_ARM_ENDPOINT": f"https://{self.host}",
            "REQUESTS_CA_BUNDLE": str(self.ca_file),
            "IDENTITY_ENDPOINT": f"https://{self.host}/msi/token",
            "IDENTITY_HEADER": IDENTITY_HEADER,
            "AZURE_TOKEN_CREDENTIALS": "ManagedIdentityCredential",
        }
        if connection_string:
            values["DPS_CONNECTION_STRING"] = self.connection_string
        return values

    def admits(self, chain_pems: list[str] | str) -> bool:
        """Whether DPS would admit a device presenting this chain (device first, then intermediates):
        the individual enrollment whose registration ID is the device's CN first, then the enrollment group
        of the first intermediate in the chain, upward. The first match decides, even when disabled."""
        if isinstance(chain_pems, str):
            chain = x509.load_pem_x509_certificates(chain_pems.encode())
        else:
            chain = [x509.load_pem_x509_certificate(p.encode()) for p in chain_pems]
        device, issuers = chain[0], chain[1:]
        now = datetime.now(UTC)
        if not device.not_valid_before_utc <= now <= device.not_valid_after_utc:
            return False
        registration_id = device.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value.lower()
        with self.lock:
            individual = self.enrollments.get(registration_id)
            groups = list(self.groups.values())
        if individual is not None:
            return individual.enabled and individual.certificate == device and _chain_ok(chain)
        for issuer in issuers:
            group = next((g for g in groups if g.certificate == issuer), None)
            if group is not None:
                return group.enabled and _chain_ok(chain)
        return False

    def group_status(self, group_id: str) -> str | None:
        group = self.groups.get(group_id)
        return None if group is None else group.body["provisioningStatus"]

    # -- the HTTP level ---------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlparse(handler.path)
        query = parse_qs(url.query)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self.lock:
            self.requests.append((handler.command, url.path, headers))
        status, document, extra = self._route(handler.command, url.path, query, headers, raw)
        content = json.dumps(document).encode() if document is not None else b""
        if isinstance(document, PlainText):
            content = document.encode()
        handler.send_response(status)
        plain = isinstance(document, PlainText)
        handler.send_header("Content-Type", "text/html" if plain else "application/json; charset=utf-8")
        handler.send_header("Content-Length", str(len(content)))
        for name, value in (extra or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(content)

    def _route(self, method: str, path: str, query: dict, headers: dict, raw: bytes) -> tuple:
        if path == "/msi/token":
            return self._token(query, headers)
        arm = ARM_PATH
        if path.startswith("/subscriptions/"):
            if headers.get("authorization") != f"Bearer {TOKEN}":
                return 401, {"error": {"code": "AuthenticationFailed", "message": "no valid token"}}, None
            if query.get("api-version", [""])[0] not in ARM_API_VERSIONS:
                return 400, {"error": {"code": "InvalidApiVersionParameter", "message": "unknown api-version"}}, None
            if not path.startswith(arm):
                return 404, {"error": {"code": "ResourceNotFound", "message": "no such DPS"}}, None
            rest = path[len(arm) :]
            body = json.loads(raw) if raw else None
            if rest == "" and method == "GET":
                return self._failing("arm-resource") or self._resource()
            parts = rest.strip("/").split("/")
            if parts[0] == "certificates" and len(parts) >= 2:
                name = unquote(parts[1])
                if len(parts) == 2 and method == "GET":
                    return self._failing("arm-certificate-get") or self._get_certificate(name)
                if len(parts) == 2 and method == "PUT":
                    return self._failing("arm-certificate-put") or self._put_certificate(name, headers, body)
                if parts[2:] == ["generateVerificationCode"] and method == "POST":
                    return self._failing("arm-code") or self._code(name, headers)
                if parts[2:] == ["verify"] and method == "POST":
                    return self._failing("arm-verify") or self._verify(name, headers, body)
            return 404, {"error": {"code": "NotFound", "message": f"no route {method} {path}"}}, None
        if query.get("api-version", [""])[0] not in SERVICE_API_VERSIONS:
            return 400, _service_error(400001, "unknown api-version"), None
        if not self._service_authorized(headers.get("authorization", "")):
            return 401, _service_error(401002, "unauthorized"), None
        body = json.loads(raw) if raw else None
        for kind, store, operation in (
            ("enrollmentGroups", self.groups, "group"),
            ("enrollments", self.enrollments, "enrollment"),
        ):
            if path == f"/{kind}/query" and method == "POST":
                return self._failing(f"{operation}-query") or self._query(store, headers)
            if path.startswith(f"/{kind}/"):
                item = unquote(path[len(kind) + 2 :]).lower()
                if method == "GET":
                    injected = self._failing(f"{operation}-get")  # first: a hook's writes show in this answer
                    if injected:
                        return injected
                    found = store.get(item)
                    if found is None:
                        return 404, _service_error(404201, "not found"), None
                    return 200, _answer(found, kind), None
                if method == "PUT":
                    return self._failing(f"{operation}-put") or self._put(kind, store, item, headers, body)
        return 404, _service_error(404000, f"no route {method} {path}"), None

    def _failing(self, operation: str) -> tuple | None:
        with self.lock:
            self.calls[operation] += 1
            call = self.calls[operation]
        if operation in self.garbage:
            return 200, PlainText("<html>a proxy's page</html>"), None
        failing = self.failures.get(operation)
        status = failing(call) if failing else None
        if not status:
            return None
        if self.plain_failures:
            return status, PlainText(f"answering {status}"), None
        if operation.startswith("arm"):
            return status, {"error": {"code": f"Injected{status}", "message": f"answering {status}"}}, None
        return status, _service_error(status * 1000, f"answering {status}"), None

    def _token(self, query: dict, headers: dict) -> tuple:
        injected = self._failing("token")
        if injected:
            return injected
        if headers.get("x-identity-header") != IDENTITY_HEADER:
            return 401, {"error": "missing X-IDENTITY-HEADER"}, None
        resource = query.get("resource", [""])[0]
        return (
            200,
            {
                "access_token": TOKEN,
                "expires_on": str(int(time.time()) + 3600),
                "resource": resource,
                "token_type": "Bearer",
            },
            None,
        )

    def _service_authorized(self, authorization: str) -> bool:
        if authorization == f"Bearer {TOKEN}":
            return True
        if not authorization.startswith("SharedAccessSignature "):
            return False
        fields = dict(part.split("=", 1) for part in authorization.split(" ", 1)[1].split("&") if "=" in part)
        resource = quote(self.host.lower(), safe="")
        if fields.get("sr") != resource or fields.get("skn") != POLICY or int(fields.get("se", "0")) < time.time():
            return False
        expected = hmac.new(base64.b64decode(self.key), f"{resource}\n{fields['se']}".encode(), hashlib.sha256).digest()
        return hmac.compare_digest(unquote(fields.get("sig", "")), base64.b64encode(expected).decode())

    # -- ARM ----------------------------------------------------------------------------------------

    def _resource(self) -> tuple:
        return (
            200,
            {
                "id": ARM_PATH,
                "name": DPS_NAME,
                "type": "Microsoft.Devices/provisioningServices",
                "location": "westeurope",
                "etag": "AAAAAAFD6M4=",
                "sku": {"name": "S1", "tier": "Standard", "capacity": 1},
                "properties": {
                    "state": "Active",
                    "provisioningState": "Succeeded",
                    "serviceOperationsHostName": self.host,
                    "deviceProvisioningHostName": GLOBAL_HOST,
                    "idScope": ID_SCOPE,
                    "allocationPolicy": "Hashed",
                },
            },
            None,
        )

    def _arm_etag_refusal(self, sent: str | None, certificate: ArmCertificate | None) -> tuple | None:
        """None when If-Match `sent` may go on; else the refusal. Both "etag" and etag are taken unless
        `arm_etag_forms` says otherwise."""
        if sent is None or sent == "*":
            return None
        quoted = sent.startswith('"') and sent.endswith('"')
        if ("quoted" if quoted else "bare") not in self.arm_etag_forms:
            return 412, {"code": "IH412001", "message": "Invalid ETag supplied"}, None
        if certificate is None or sent.strip('"') != certificate.etag:
            return 412, {"code": "IH412002", "message": "Precondition failed: the etag is stale"}, None
        return None

    def _certificate_answer(self, certificate: ArmCertificate, extra: dict | None = None) -> dict:
        parsed = x509.load_der_x509_certificate(certificate.der)
        return {
            "id": f"/subscriptions/{SUBSCRIPTION}/.../certificates/{certificate.name}",
            "name": certificate.name,
            "type": "Microsoft.Devices/provisioningServices/Certificates",
            "etag": certificate.etag,
            "properties": {
                "subject": parsed.subject.rfc4514_string(),
                "thumbprint": hashlib.sha1(certificate.der).hexdigest().upper(),  # noqa: S324 (what DPS shows)
                "isVerified": certificate.verified,
                "created": "Mon, 30 Nov 2026 00:00:00 GMT",
                "updated": "Mon, 30 Nov 2026 00:00:00 GMT",
                **(extra or {}),
            },
        }

    def _get_certificate(self, name: str) -> tuple:
        certificate = self.certificates.get(name)
        if certificate is None:
            return 404, {"error": {"code": "NotFound", "message": f"no certificate {name}"}}, None
        return 200, self._certificate_answer(certificate), None

    def _put_certificate(self, name: str, headers: dict, body: dict | None) -> tuple:
        properties = (body or {}).get("properties") or {}
        try:
            data = base64.b64decode(properties["certificate"], validate=True)
            der = (
                x509.load_pem_x509_certificate(data)
                if data.startswith(b"-----")
                else x509.load_der_x509_certificate(data)
            ).public_bytes(serialization.Encoding.DER)
        except (KeyError, TypeError, ValueError):
            return 400, {"code": "IH400001", "message": "properties.certificate must be a base64 certificate"}, None
        with self.lock:
            existing = self.certificates.get(name)
            if existing is not None and "if-match" not in headers:
                return 409, {"code": "IH409001", "message": "certificate exists: send its etag"}, None
            refusal = self._arm_etag_refusal(headers.get("if-match"), existing)
            if refusal:
                return refusal
            certificate = ArmCertificate(name, der, bool(properties.get("isVerified")), _etag())
            self.certificates[name] = certificate
        return 200, self._certificate_answer(certificate), None  # ARM answers 200 to a create too

    def _certificate_for_update(self, name: str, headers: dict) -> tuple:
        """(the CA certificate, None), or (None, the refusal) when it is missing or If-Match is absent or stale."""
        certificate = self.certificates.get(name)
        if certificate is None:
            return None, (404, {"error": {"code": "NotFound", "message": f"no certificate {name}"}}, None)
        if "if-match" not in headers:
            return None, (412, {"code": "IH412003", "message": "If-Match is required"}, None)
        return certificate, self._arm_etag_refusal(headers["if-match"], certificate)

    def _code(self, name: str, headers: dict) -> tuple:
        with self.lock:
            certificate, refusal = self._certificate_for_update(name, headers)
            if refusal:
                return refusal
            certificate.code = secrets.token_hex(16).upper()
            certificate.etag = _etag()
        return 200, self._certificate_answer(certificate, {"verificationCode": certificate.code}), None

    def _verify(self, name: str, headers: dict, body: dict | None) -> tuple:
        with self.lock:
            certificate, refusal = self._certificate_for_update(name, headers)
            if refusal:
                return refusal
            try:
                proof = x509.load_pem_x509_certificate(str((body or {})["certificate"]).encode())
            except (KeyError, ValueError):
                return 400, {"code": "IH400001", "message": "certificate must be a PEM certificate"}, None
            root = x509.load_der_x509_certificate(certificate.der)
            common_name = proof.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            if certificate.code is None or not common_name or common_name[0].value != certificate.code:
                return 400, _ih400053(), None
            if not _signed_by(proof, root):
                return 400, _ih400053(), None
            certificate.verified, certificate.code, certificate.etag = True, None, _etag()
        return 200, self._certificate_answer(certificate), None

    # -- the service API ---------------------------------------------------------------------------

    def _query(self, store: dict, headers: dict) -> tuple:
        start = int(headers.get("x-ms-continuation") or 0)
        items = list(store.values())[start : start + self.page_size]
        kind = "enrollmentGroups" if store is self.groups else "enrollments"
        more = start + self.page_size < len(store)
        return (
            200,
            [_answer(item, kind) for item in items],
            ({"x-ms-continuation": str(start + self.page_size)} if more else None),
        )

    def _put(self, kind: str, store: dict, item: str, headers: dict, body: dict | None) -> tuple:
        group = kind == "enrollmentGroups"
        id_field, certificates_field = (
            ("enrollmentGroupId", "signingCertificates") if group else ("registrationId", "clientCertificates")
        )
        problem = _shape_problem(body, id_field, certificates_field, item)
        if problem:
            return 400, _service_error(400004 if "allocationPolicy" in problem else 400000, problem), None
        certificate = x509.load_pem_x509_certificate(
            body["attestation"]["x509"][certificates_field]["primary"]["certificate"].encode()
        )
        with self.lock:
            existing = store.get(item)
            sent = headers.get("if-match")
            if existing is not None and sent is None:
                return 409, _service_error(409202, f"{item} already exists"), None
            if existing is not None and sent != "*" and sent.strip('"') != existing.etag:
                return 412, _service_error(412002, "precondition failed: stale etag"), None
            if existing is None and sent not in (None, "*"):
                return 412, _service_error(412002, "precondition failed: no such item"), None
            if group and existing is None and len(store) >= MAX_GROUPS:
                return 403, _service_error(403002, "the number of enrollment groups has reached its quota"), None
            enrollment = Enrollment(item, body, certificate, _etag(), body["provisioningStatus"] == "enabled")
            store[item] = enrollment
        return 200, _answer(enrollment, kind), None


def _etag() -> str:
    return base64.b64encode(secrets.token_bytes(8)).decode()


def _service_error(code: int, message: str) -> dict:
    return {
        "errorCode": code,
        "trackingId": secrets.token_hex(8),
        "message": message,
        "timestampUtc": datetime.now(UTC).isoformat(),
    }


def _ih400053() -> dict:
    return {
        "code": "IH400053",
        "httpStatusCode": "BadRequest",
        "message": "The verification failed: the issuer certificate of the verification certificate cannot be found",
    }


def _shape_problem(body: dict | None, id_field: str, certificates_field: str, item: str) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if str(body.get(id_field, "")).lower() != item:
        return f"{id_field} must equal the ID in the path"
    attestation = body.get("attestation")
    if not isinstance(attestation, dict) or attestation.get("type") != "x509":
        return "attestation.type must be x509"
    try:
        pem = attestation["x509"][certificates_field]["primary"]["certificate"]
        x509.load_pem_x509_certificate(pem.encode())
    except (KeyError, TypeError, ValueError):
        return f"attestation.x509.{certificates_field}.primary.certificate must be a PEM certificate"
    if body.get("provisioningStatus") not in ("enabled", "disabled"):
        return "provisioningStatus must be enabled or disabled"
    if body.get("iotHubs") and not body.get("allocationPolicy"):
        return "allocationPolicy is required when iotHubs is given"
    if body.get("allocationPolicy") not in (None, "hashed", "geoLatency", "static", "custom"):
        return "allocationPolicy must be hashed, geoLatency, static or custom"
    if body.get("allocationPolicy") == "custom" and not body.get("customAllocationDefinition"):
        return "customAllocationDefinition is required when allocationPolicy is custom"
    return None


def _answer(enrollment: Enrollment, kind: str) -> dict:
    """The enrollment as DPS returns it: the certificate replaced by its info."""
    document = json.loads(json.dumps(enrollment.body))
    field_name = "signingCertificates" if kind == "enrollmentGroups" else "clientCertificates"
    certificate = enrollment.certificate
    document["attestation"]["x509"][field_name]["primary"] = {
        "info": {
            "subjectName": certificate.subject.rfc4514_string(),
            "sha1Thumbprint": certificate.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 (what DPS shows)
            "sha256Thumbprint": certificate.fingerprint(hashes.SHA256()).hex().upper(),
            "issuerName": certificate.issuer.rfc4514_string(),
            "notBeforeUtc": certificate.not_valid_before_utc.isoformat(),
            "notAfterUtc": certificate.not_valid_after_utc.isoformat(),
            "serialNumber": format(certificate.serial_number, "X"),
            "version": 3,
        }
    }
    document.update(
        etag=enrollment.etag, createdDateTimeUtc=enrollment.created, lastUpdatedDateTimeUtc=enrollment.created
    )
    return document


def _signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    public_key = issuer.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        public_key.verify(
            certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(certificate.signature_hash_algorithm)
        )
    except InvalidSignature:
        return False
    return certificate.issuer == issuer.subject


def _chain_ok(chain: list[x509.Certificate]) -> bool:
    """Each certificate signed by the next, as the TLS handshake DPS runs checks."""
    return all(_signed_by(child, parent) for child, parent in itertools.pairwise(chain)) and len(chain) > 1
