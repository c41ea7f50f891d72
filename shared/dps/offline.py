"""DPS offline: nothing is sent; the documents that would be are recorded, under PKI_HOME/dps-offline on
the embedded default, or in a table when the ledger is in Table Storage (so nothing needs local disk)."""

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from ..errors import CaError
from . import Dps

NOT_CONFIGURED = "DPS is not configured: nothing was sent; the document is recorded in {path}"


class Documents(Protocol):
    """Where offline DPS documents are kept: `put` stores one and says where (for the message)."""

    location: str

    def put(self, kind: str, name: str, document: dict[str, Any]) -> str: ...

    def get(self, kind: str, name: str) -> dict[str, Any] | None: ...

    def lock(self, kind: str, name: str) -> AbstractContextManager[None]:
        """Held while one document is read and rewritten: as wide as the store can make it."""

    def backup_into(self, home: Path) -> str | None:
        """Copy the documents kept under PKI_HOME into the PKI home `home` (for `backup`); one sentence for
        the operator, or None when none are kept there."""


class FolderDocuments:
    """Documents as JSON files: `<directory>/<kind>/<name>.json`, each replaced atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.location = str(self.directory)

    def put(self, kind: str, name: str, document: dict[str, Any]) -> str:
        path = self.directory / kind / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".json.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(temporary, path)
        return str(path)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        path = self.directory / kind / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def backup_into(self, home: Path) -> str | None:
        if not self.directory.is_dir():
            return None
        shutil.copytree(self.directory, home / self.directory.name, ignore=shutil.ignore_patterns("*.lock", "*.tmp"))
        return f"the documents offline DPS recorded, in {self.directory.name}/"

    @contextmanager
    def lock(self, kind: str, name: str) -> Iterator[None]:
        """A file lock beside the document: it holds across processes (serve --workers)."""
        path = self.directory / kind / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class OfflineDps(Dps):
    configured = False

    def __init__(self, home: Path | None = None, documents: Documents | None = None) -> None:
        """Records under `home`/dps-offline, or in `documents` when given."""
        if documents is None:
            if home is None:
                raise ValueError("OfflineDps needs a PKI home or a document store")
            documents = FolderDocuments(Path(home) / "dps-offline")
        self.documents = documents

    def describe(self) -> dict[str, str]:
        return {"backend": "offline", "recordedIn": self.documents.location}

    def backup_into(self, home: Path) -> str | None:
        return self.documents.backup_into(Path(home))

    def registration_info(self, device_id: str) -> dict[str, str] | None:
        return None

    def register_root(self, root_id: str, certificate_pem: str, verified: bool = False) -> dict[str, Any]:
        document = {"certificateName": root_id, "certificate": certificate_pem, "isVerified": verified}
        return self._record("ca-certificates", root_id, document)

    def verification_code(self, root_id: str) -> str:
        raise CaError(
            "DPS is not configured: give the verification code DPS shows for the root", "verification-code-required"
        )

    def verify_root(self, root_id: str, verification_code: str, certificate_pem: str) -> dict[str, Any]:
        document = {"certificateName": root_id, "verificationCode": verification_code, "certificate": certificate_pem}
        return self._record("verifications", root_id, document)

    def put_enrollment_group(
        self, group_id: str, certificate_pem: str, enabled: bool | Callable[[], bool]
    ) -> dict[str, Any]:
        enabled = enabled() if callable(enabled) else enabled
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
        with super().device_lock(device_id), self.documents.lock("individual-enrollments", device_id):
            yield

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
        where = self.documents.put(kind, name, document)
        return {"mode": "offline", "recorded": where, "message": NOT_CONFIGURED.format(path=where)}
