"""DPS offline: nothing is sent; the documents that would be are written under PKI_HOME/dps-offline."""

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import Dps

NOT_CONFIGURED = "DPS is not configured: nothing was sent; the document is recorded in {path}"


class OfflineDps(Dps):
    configured = False

    def __init__(self, home: Path) -> None:
        self.directory = Path(home) / "dps-offline"

    def describe(self) -> dict[str, str]:
        return {"backend": "offline", "directory": str(self.directory)}

    def registration_info(self, device_id: str) -> dict[str, str] | None:
        return None

    def register_root(self, root_id: str, certificate_pem: str) -> dict[str, Any]:
        document = {"certificateName": root_id, "certificate": certificate_pem, "isVerified": False}
        return self._record("ca-certificates", root_id, document)

    def verify_root(self, root_id: str, verification_code: str, certificate_pem: str) -> dict[str, Any]:
        document = {"certificateName": root_id, "verificationCode": verification_code, "certificate": certificate_pem}
        return self._record("verifications", root_id, document)

    def put_enrollment_group(self, group_id: str, certificate_pem: str, enabled: bool) -> dict[str, Any]:
        document = {
            "enrollmentGroupId": group_id,
            "attestation": {
                "type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": certificate_pem}}},
            },
            "provisioningStatus": "enabled" if enabled else "disabled",
            "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": True},
        }
        return self._record("enrollment-groups", group_id, document)

    @contextmanager
    def device_lock(self, device_id: str) -> Iterator[None]:
        """A file lock beside the device's recorded enrollment: it holds across processes (serve --workers)."""
        path = self.directory / "individual-enrollments" / f"{device_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def disable_device(self, device_id: str, certificate_pem: str) -> dict[str, Any]:
        return self._individual_enrollment(device_id, certificate_pem, enabled=False)

    def admit_only(self, device_id: str, certificate_pem: str) -> dict[str, Any]:
        return self._individual_enrollment(device_id, certificate_pem, enabled=True)

    def _individual_enrollment(self, device_id: str, certificate_pem: str, enabled: bool) -> dict[str, Any]:
        document = {
            "registrationId": device_id,
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": certificate_pem}}},
            },
            "provisioningStatus": "enabled" if enabled else "disabled",
        }
        return self._record("individual-enrollments", device_id, document)

    def _record(self, kind: str, name: str, document: dict[str, Any]) -> dict[str, Any]:
        path = self.directory / kind / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".json.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(temporary, path)
        return {"mode": "offline", "recorded": str(path), "message": NOT_CONFIGURED.format(path=path)}
