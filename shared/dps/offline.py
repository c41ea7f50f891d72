"""DPS offline: nothing is sent; the documents that would be are written under PKI_HOME/dps-offline."""

import json
import os
import shutil
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

    def backup_into(self, home: Path) -> str | None:
        if not self.directory.is_dir():
            return None
        shutil.copytree(self.directory, Path(home) / self.directory.name)
        return f"the documents offline DPS recorded, in {self.directory.name}/"

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
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(temporary, path)
        return {"mode": "offline", "recorded": str(path), "message": NOT_CONFIGURED.format(path=path)}
