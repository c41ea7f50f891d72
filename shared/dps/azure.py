"""DPS for real: the root and its proof of possession through Azure Resource Manager, enrollment groups
and individual enrollments through the DPS service API.

- Management (ARM): `azure-mgmt-iothubprovisioningservices` (`IotDpsClient`): the DPS resource (ID scope,
  hosts), the root CA certificate (upload, verification code, verify).
- Enrollments: the DPS service REST API (api-version 2021-10-01) on an azure-core pipeline. The only
  Python SDK for it, `azure-iot-deviceprovisioning` 1.0.0b1, is a 2023 beta that was never released
  further; the API it wraps is four plain JSON resources, so a pipeline of azure-core's own retry,
  logging and authentication policies gives the same wire with nothing unmaintained in between (and
  newer api-versions stay one constant away).

Every write that replaces an existing item sends its etag: DPS answers 409 to a PUT on an existing
enrollment without `If-Match` and 412 to a stale one (AZURE-FACTS "DPS service API, in detail"); a
stale write is raised as `DpsConflict` so that the service re-reads what it decided from. ARM's etags
are sent quoted, as azure-mgmt 2.1 does, and bare when DPS answers 412 IH412001 to the quoted form.
Answers never echo an enrollment's certificate, so every update sends the certificate again.
"""

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from azure.core import MatchConditions, PipelineClient
from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.core.pipeline.policies import (
    BearerTokenCredentialPolicy,
    HeadersPolicy,
    NetworkTraceLoggingPolicy,
    RetryPolicy,
    SansIOHTTPPolicy,
    UserAgentPolicy,
)
from azure.core.rest import HttpRequest

from ..errors import BackendUnavailable, CaError, Misconfigured
from . import CONNECTED_DEVICES, GLOBAL_ENDPOINT, Dps, DpsConflict, DpsRefused

SERVICE_API_VERSION = "2021-10-01"
SERVICE_SCOPE = "https://azure-devices-provisioning.net/.default"
MAX_ENROLLMENT_GROUPS = 100  # X.509 enrollment groups per DPS instance (DPS quotas and limits)


@dataclass(frozen=True)
class DpsResource:
    """What the DPS resource says of itself (ARM GET), read once per process."""

    id_scope: str
    service_host: str  # <name>.azure-devices-provisioning.net: the service API
    device_host: str  # global.azure-devices-provisioning.net: where devices connect


@dataclass(frozen=True)
class AzureDpsConfig:
    """Which DPS, and what its enrollment groups hold (README "Settings": the DPS_* settings)."""

    subscription_id: str
    resource_group: str
    name: str
    arm_endpoint: str = "https://management.azure.com"
    # a shared access policy's (a secret: kept out of repr); None: the token credential
    connection_string: str | None = field(default=None, repr=False)
    allocation_policy: str | None = None  # hashed, geoLatency, static, custom
    iot_hubs: tuple[str, ...] = ()
    initial_twin: dict[str, Any] | None = None


def parse_connection_string(text: str) -> tuple[str, str, str]:
    """(host, key name, key) of `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`.
    Misconfigured when a part is missing or the key is not base64."""
    parts = dict(part.split("=", 1) for part in text.split(";") if "=" in part)
    try:
        host, name, key = parts["HostName"], parts["SharedAccessKeyName"], parts["SharedAccessKey"]
        base64.b64decode(key, validate=True)
    except (KeyError, ValueError):
        raise Misconfigured(
            "DPS_CONNECTION_STRING must be HostName=...;SharedAccessKeyName=...;SharedAccessKey=<base64>",
            "invalid-setting",
        ) from None
    return host, name, key


def sas_token(host: str, key_name: str, key: str, expiry: int) -> str:
    """A DPS service SAS token for `host` valid until `expiry` (Unix seconds): HMAC-SHA256 with the
    policy's key over "<url-encoded host>\\n<expiry>" (DPS "Control access to the service API")."""
    resource = quote(host.lower(), safe="")
    signature = hmac.new(base64.b64decode(key), f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    return (
        f"SharedAccessSignature sr={resource}&sig={quote(base64.b64encode(signature).decode(), safe='')}"
        f"&se={expiry}&skn={quote(key_name, safe='')}"
    )


class _SasPolicy(SansIOHTTPPolicy):
    """Signs each request with a fresh SAS token (one hour)."""

    def __init__(self, host: str, key_name: str, key: str) -> None:
        self._host, self._key_name, self._key = host, key_name, key

    def on_request(self, request: Any) -> None:
        token = sas_token(self._host, self._key_name, self._key, int(time.time()) + 3600)
        request.http_request.headers["Authorization"] = token


def _group_status(enabled: bool) -> str:
    return "enabled" if enabled else "disabled"


class AzureDps(Dps):
    """The Dps port on a real DPS instance. `credential` is a TokenCredential (DefaultAzureCredential in
    production) for ARM, and for the service API when the config has no connection string."""

    configured = True

    def __init__(self, config: AzureDpsConfig, credential: Any, transport: Any = None) -> None:
        from azure.mgmt.iothubprovisioningservices import IotDpsClient

        self.config = config
        self._transport = {"transport": transport} if transport is not None else {}
        self._arm = IotDpsClient(
            credential,
            config.subscription_id,
            base_url=config.arm_endpoint,
            retry_total=3,
            **self._transport,
        )
        self._credential = credential
        self._resource: DpsResource | None = None
        self._service: PipelineClient | None = None
        self._lock = threading.Lock()

    # -- the resource --------------------------------------------------------------------------------

    def resource(self) -> DpsResource:
        """The DPS resource's ID scope and hosts, read once (ARM GET) and kept."""
        with self._lock:
            if self._resource is None:
                found = self._call_arm(
                    "reading the DPS resource",
                    lambda bare: self._arm.iot_dps_resource.get(
                        provisioning_service_name=self.config.name, resource_group_name=self.config.resource_group
                    ),
                )
                properties = found.properties
                self._resource = DpsResource(
                    id_scope=properties.id_scope,
                    service_host=properties.service_operations_host_name,
                    device_host=properties.device_provisioning_host_name or GLOBAL_ENDPOINT,
                )
            return self._resource

    def describe(self) -> dict[str, str]:
        return {
            "backend": "azure",
            "subscription": self.config.subscription_id,
            "resourceGroup": self.config.resource_group,
            "name": self.config.name,
        }

    def backup_into(self, home: Path) -> str | None:
        return None  # everything is in DPS itself

    def registration_info(self, device_id: str) -> dict[str, str] | None:
        """From the DPS resource (read once). None when it cannot be read now: an issued certificate is
        never held back for it (the bundle then says where to find the ID scope)."""
        try:
            resource = self.resource()
        except CaError:
            return None
        return {"globalEndpoint": resource.device_host, "idScope": resource.id_scope, "registrationId": device_id}

    # -- the root (ARM) ------------------------------------------------------------------------------

    def register_root(self, root_id: str, certificate_pem: str, verified: bool = False) -> dict[str, Any]:
        """Upload the root as a CA certificate named `root_id`; `verified` True is "verified on upload".
        An existing certificate of that name is replaced with its etag."""
        from azure.mgmt.iothubprovisioningservices.models import CertificateProperties, CertificateResponse

        existing = self._root_etag(root_id)
        description = CertificateResponse(
            properties=CertificateProperties(certificate=certificate_pem.encode(), is_verified=verified or None)
        )
        answer = self._call_arm(
            "uploading the root certificate",
            lambda bare: self._arm.dps_certificate.create_or_update(
                certificate_description=description,
                **self._certificate(root_id, existing, bare),
            ),
        )
        return self._root_state(root_id, answer)

    def verification_code(self, root_id: str) -> str:
        """A new verification code for the root (each call makes a new one)."""
        etag = self._root_etag(root_id)
        if etag is None:
            raise DpsRefused(f"DPS holds no CA certificate named {root_id!r}: create the root first", "dps-refused")
        answer = self._call_arm(
            "asking DPS for a verification code",
            lambda bare: self._arm.dps_certificate.generate_verification_code(
                **self._certificate(root_id, etag, bare),
            ),
        )
        return answer.properties.verification_code

    def verify_root(self, root_id: str, verification_code: str, certificate_pem: str) -> dict[str, Any]:
        from azure.mgmt.iothubprovisioningservices.models import VerificationCodeRequest

        etag = self._root_etag(root_id)
        answer = self._call_arm(
            "verifying the root with DPS",
            lambda bare: self._arm.dps_certificate.verify_certificate(
                request=VerificationCodeRequest(certificate=certificate_pem),
                **self._certificate(root_id, etag, bare),
            ),
        )
        return self._root_state(root_id, answer)

    def _root_etag(self, root_id: str) -> str | None:
        try:
            found = self._call_arm(
                "reading the root certificate in DPS",
                lambda bare: self._arm.dps_certificate.get(**self._certificate(root_id)),
                missing_ok=True,
            )
        except ResourceNotFoundError:
            return None
        return found.etag

    def _certificate(self, root_id: str, etag: str | None = None, bare: bool = False) -> dict[str, Any]:
        """The dps_certificate operations' arguments naming the root's CA certificate, with its etag when
        given: quoted by the SDK (IfNotModified), or `bare` in our own If-Match header."""
        names = {
            "resource_group_name": self.config.resource_group,
            "provisioning_service_name": self.config.name,
            "certificate_name": root_id,
        }
        if etag is None:
            return names
        if bare:
            return {
                **names,
                "etag": etag,
                "match_condition": MatchConditions.Unconditionally,
                "headers": {"If-Match": etag.strip('"')},
            }
        return {**names, "etag": etag, "match_condition": MatchConditions.IfNotModified}

    def _root_state(self, root_id: str, answer: Any) -> dict[str, Any]:
        verified = bool(answer.properties.is_verified)
        return {
            "mode": "azure",
            "certificateName": root_id,
            "isVerified": verified,
            "state": "verified" if verified else "uploaded",
            "etag": answer.etag,
        }

    def _call_arm(self, doing: str, call: Callable[[bool], Any], missing_ok: bool = False) -> Any:
        """One ARM call, given whether to send its etag bare: quoted first (as azure-mgmt 2.1 does), bare
        when DPS refuses the quoted form with 412 IH412001 (AZURE-FACTS "DPS management (ARM), more")."""
        try:
            try:
                return call(False)
            except HttpResponseError as error:
                if error.status_code != 412 or "IH412001" not in _text(error):
                    raise
                return call(True)
        except ResourceNotFoundError:
            if missing_ok:
                raise
            raise DpsRefused(f"DPS {self.config.name!r} was not found while {doing}", "dps-not-found") from None
        except ClientAuthenticationError as error:
            raise _no_token(error, doing) from None
        except HttpResponseError as error:
            raise _dps_error(error, doing) from None
        except AzureError as error:
            raise BackendUnavailable(f"DPS is unreachable while {doing}: {type(error).__name__}") from None

    # -- enrollments (service API) -------------------------------------------------------------------

    def _enrollment(self, certificates: str, certificate_pem: str, enabled: bool) -> dict[str, Any]:
        """What a group (`signingCertificates`) and an individual enrollment (`clientCertificates`) share:
        X.509 attestation with the one certificate, status, reprovisioning, allocation from the settings."""
        body: dict[str, Any] = {
            "attestation": {"type": "x509", "x509": {certificates: {"primary": {"certificate": certificate_pem}}}},
            "provisioningStatus": _group_status(enabled),
            "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": True},
        }
        if self.config.allocation_policy:
            body["allocationPolicy"] = self.config.allocation_policy
        if self.config.iot_hubs:
            body["iotHubs"] = list(self.config.iot_hubs)
        return body

    def enrollment_group_body(self, group_id: str, certificate_pem: str, enabled: bool) -> dict[str, Any]:
        """The X.509 enrollment group of an intermediate (DPS REST "Enrollment Group - Create Or Update")."""
        body = {"enrollmentGroupId": group_id, **self._enrollment("signingCertificates", certificate_pem, enabled)}
        if self.config.initial_twin is not None:
            body["initialTwin"] = self.config.initial_twin
        return body

    def put_enrollment_group(
        self, group_id: str, certificate_pem: str, enabled: bool | Callable[[], bool]
    ) -> dict[str, Any]:
        """Create the group, or update it with the etag of a GET (the certificate sent again); a callable
        `enabled` is asked after the GET (see the port). DpsRefused names the 100-group limit when DPS
        refuses a new group while 100 exist."""
        path = f"/enrollmentGroups/{quote(group_id, safe='')}"
        decide = enabled if callable(enabled) else lambda: enabled
        for _ in range(3):
            current = self._service_call("GET", path, doing=f"reading enrollment group {group_id}", missing_ok=True)
            etag = current.get("etag") if current else None
            enabled = decide()
            try:
                answer = self._service_call(
                    "PUT",
                    path,
                    self.enrollment_group_body(group_id, certificate_pem, enabled),
                    etag=etag,
                    doing=f"writing enrollment group {group_id}",
                )
            except DpsConflict:
                continue  # changed between our GET and PUT: read it again
            except DpsRefused as error:
                if current is None and self._group_count() >= MAX_ENROLLMENT_GROUPS:
                    raise DpsRefused(
                        f"DPS holds at most {MAX_ENROLLMENT_GROUPS} enrollment groups and has "
                        f"{MAX_ENROLLMENT_GROUPS}: disable and delete one in DPS, or use another DPS "
                        f"({error.message})",
                        "dps-group-limit",
                    ) from None
                raise
            return {
                "mode": "azure",
                "state": "registered",
                "enrollmentGroupId": group_id,
                "provisioningStatus": answer.get("provisioningStatus", _group_status(enabled)),
                "etag": answer.get("etag"),
            }
        raise DpsConflict(f"enrollment group {group_id} kept changing while it was written; try again")

    def _group_count(self) -> int:
        count, continuation = 0, None
        while True:
            headers = {"x-ms-continuation": continuation} if continuation else {}
            response = self._send("POST", "/enrollmentGroups/query", {"query": "SELECT *"}, headers, "counting groups")
            count += len(response.json())
            continuation = response.headers.get("x-ms-continuation")
            if not continuation:
                return count

    def disable_device(self, device_id: str, certificate_pem: str) -> dict[str, Any]:
        return self.keep_device(device_id, lambda: (certificate_pem, False))

    def admit_only(self, device_id: str, certificate_pem: str) -> dict[str, Any]:
        return self.keep_device(device_id, lambda: (certificate_pem, True))

    def keep_device(self, device_id: str, decide: Callable[[], tuple[str, bool]]) -> dict[str, Any]:
        """The enrollment is read (its etag) before `decide` reads the ledger: another process that changes the
        ledger after our read also writes DPS after it, so our write then meets a stale etag (DpsConflict) and
        the caller decides again; the last write is always one decided from the newest ledger."""
        with self.device_lock(device_id):
            etag = self._enrollment_etag(device_id)
            certificate_pem, enabled = decide()
            return self._write_individual(device_id, certificate_pem, enabled, etag)

    def _enrollment_etag(self, device_id: str) -> str | None:
        path = f"/enrollments/{quote(device_id, safe='')}"
        current = self._service_call("GET", path, doing=f"reading the enrollment of {device_id}", missing_ok=True)
        return current.get("etag") if current else None

    def _write_individual(
        self, device_id: str, certificate_pem: str, enabled: bool, etag: str | None
    ) -> dict[str, Any]:
        """Create or update the device's individual enrollment with `etag` (None: it did not exist).
        DpsConflict when it changed since: the caller reads the ledger again and decides again."""
        path = f"/enrollments/{quote(device_id, safe='')}"
        body = {"registrationId": device_id, **self._enrollment("clientCertificates", certificate_pem, enabled)}
        answer = self._service_call(
            "PUT",
            path,
            body,
            etag=etag,
            doing=f"writing the enrollment of {device_id}",
        )
        what = "admits only its active certificate" if enabled else "is blocked"
        return {
            "mode": "azure",
            "registrationId": device_id,
            "provisioningStatus": answer.get("provisioningStatus", _group_status(enabled)),
            "etag": answer.get("etag"),
            "message": f"DPS: device {device_id} {what} (an individual enrollment); {CONNECTED_DEVICES}",
        }

    def _service_call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        etag: str | None = None,
        doing: str,
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        headers = {"If-Match": etag} if etag else {}
        response = self._send(method, path, body, headers, doing, missing_ok)
        if response is None:
            return None
        try:
            document = response.json()
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise BackendUnavailable(f"DPS answered {doing} with something that is not a JSON object")
        return document

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        headers: dict[str, str],
        doing: str,
        missing_ok: bool = False,
    ) -> Any:
        try:
            client = self._service_client()
            request = HttpRequest(
                method, client.format_url(path), params={"api-version": SERVICE_API_VERSION}, json=body, headers=headers
            )
            response = client.send_request(request)
        except ClientAuthenticationError as error:
            raise _no_token(error, doing) from None
        except AzureError as error:
            raise BackendUnavailable(f"DPS is unreachable while {doing}: {type(error).__name__}") from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            raise _dps_error(HttpResponseError(response=response), doing)
        return response

    def _service_client(self) -> PipelineClient:
        with self._lock:
            if self._service is not None:
                return self._service
        if self.config.connection_string:
            host, key_name, key = parse_connection_string(self.config.connection_string)
            auth: Any = _SasPolicy(host, key_name, key)
        else:
            host = self.resource().service_host
            auth = BearerTokenCredentialPolicy(self._credential, SERVICE_SCOPE)
        policies = [
            HeadersPolicy({"Accept": "application/json"}),
            UserAgentPolicy("device-ca"),
            RetryPolicy(retry_total=3, retry_backoff_factor=0.5),
            auth,
            NetworkTraceLoggingPolicy(),
        ]
        client = PipelineClient(f"https://{host}", policies=policies, **self._transport)
        with self._lock:
            self._service = self._service or client
            return self._service


def _no_token(error: ClientAuthenticationError, doing: str) -> Misconfigured:
    """No token for DPS: the app's identity (or developer login) is missing or has no role there."""
    return Misconfigured(
        f"no Azure token for DPS while {doing} (check the managed identity or login and its DPS role): "
        f"{type(error).__name__}",
        "dps-credential",
    )


def _text(error: HttpResponseError) -> str:
    try:
        return error.response.text() if error.response is not None else str(error)
    except Exception:  # a body that cannot be read as text names nothing we could use
        return ""


def _dps_error(error: HttpResponseError, doing: str) -> CaError:
    """A DPS answer as the service's error: 409/412 on an etag → DpsConflict; 429 and 5xx →
    BackendUnavailable; any other 4xx → DpsRefused with DPS's errorCode and message (its body is
    `{"errorCode", "trackingId", "message"}` on the service API, `{"code", "message"}` or
    `{"error": {...}}` on ARM)."""
    status = error.status_code or 0
    code, message = _error_parts(error)
    if status == 412 or (status == 409 and str(code).startswith("409")):
        return DpsConflict(f"DPS: {message or 'the item changed'} while {doing}")
    if status == 429 or status >= 500:
        return BackendUnavailable(f"DPS answered {status} while {doing}; try again later")
    return DpsRefused(f"DPS refused {doing}: {code} {message}".rstrip(), "dps-refused")


def _error_parts(error: HttpResponseError) -> tuple[str, str]:
    try:
        document = json.loads(_text(error))
    except ValueError:
        return str(error.status_code), ""
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        document = document["error"]
    if not isinstance(document, dict):
        return str(error.status_code), ""
    code = document.get("errorCode", document.get("code", error.status_code))
    return str(code), str(document.get("message", ""))
