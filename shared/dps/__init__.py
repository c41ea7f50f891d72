"""The Device Provisioning Service port: root registration, enrollment groups, device disables.

The embedded default is `OfflineDps`, which records the documents it would send and says plainly that
DPS is not configured.
"""

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CaError, Conflict

GLOBAL_ENDPOINT = "global.azure-devices-provisioning.net"  # where every device first connects
# DPS is asked only when a device provisions: a session already open in IoT Hub is not ended by DPS.
CONNECTED_DEVICES = "devices already connected keep their IoT Hub session until they are disabled in the hub"


def device_registration(device_id: str, known: dict[str, str] | None) -> dict[str, Any]:
    """What a device needs to provision itself: DPS's answer when configured, else what is known here."""
    if known:
        return dict(known)
    return {
        "registrationId": device_id,
        "globalEndpoint": GLOBAL_ENDPOINT,
        "idScope": None,
        "note": "DPS is not configured here: take the ID scope from your DPS instance's overview",
    }


class DpsRefused(CaError):
    """DPS refused a request (a 4xx other than an etag conflict): retrying the same request will not help.
    The message carries DPS's error code and message, which describe the request, not the server."""

    status = 409
    code = "dps-refused"


class DpsConflict(Conflict):
    """An enrollment changed between our read and our write (412, or 409 "already exists"): read again."""

    code = "dps-conflict"


class Dps(ABC):
    configured: bool = False

    @contextmanager
    def device_lock(self, device_id: str) -> Iterator[None]:
        """Held while a device's individual enrollment is read from the ledger and written here, so that two
        updates for one device through this adapter never cross (one adapter per process). Across processes
        the adapters' own means hold: a file lock offline, the enrollment's etag read before the ledger in
        Azure (`keep_device`)."""
        locks: dict[str, threading.Lock] = self.__dict__.setdefault("_device_locks", {})  # atomic under the GIL
        with locks.setdefault(device_id, threading.Lock()):
            yield

    def keep_device(self, device_id: str, decide: Callable[[], tuple[str, bool]]) -> dict[str, Any]:
        """Write device `device_id`'s individual enrollment as `decide()` says now: (the certificate PEM it
        holds, whether it is enabled), `decide` reading the ledger under the device lock. Adapters whose
        writes carry etags read the enrollment before calling `decide`, so a write decided from a ledger read
        that another process has since overtaken fails (DpsConflict) instead of undoing that process's write."""
        with self.device_lock(device_id):
            certificate_pem, enabled = decide()
            if enabled:
                return self.admit_only(device_id, certificate_pem)
            return self.disable_device(device_id, certificate_pem)

    @abstractmethod
    def describe(self) -> dict[str, str]: ...

    @abstractmethod
    def backup_into(self, home: Path) -> str | None:
        """Copy what this adapter keeps under PKI_HOME into the PKI home `home` (for `backup`); one
        sentence for the operator, or None when it keeps nothing there."""

    @abstractmethod
    def registration_info(self, device_id: str) -> dict[str, str] | None:
        """What a device needs to provision itself (globalEndpoint, idScope, registrationId), if known."""

    @abstractmethod
    def register_root(self, root_id: str, certificate_pem: str, verified: bool = False) -> dict[str, Any]:
        """Upload the root CA certificate (`verified`: marked verified on upload). Returns the state to keep
        in the ledger."""

    @abstractmethod
    def verification_code(self, root_id: str) -> str:
        """A new proof-of-possession code for the root, from DPS. CaError "verification-code-required"
        where there is no DPS to ask."""

    @abstractmethod
    def verify_root(self, root_id: str, verification_code: str, certificate_pem: str) -> dict[str, Any]:
        """Send the proof-of-possession certificate. Returns the state to keep in the ledger."""

    @abstractmethod
    def put_enrollment_group(
        self, group_id: str, certificate_pem: str, enabled: bool | Callable[[], bool]
    ) -> dict[str, Any]:
        """Create or update the enrollment group of an intermediate. `enabled` may be a callable that reads
        the ledger: adapters with etags call it after reading the group, so that a write decided from a
        ledger read another process has since overtaken fails and is decided again."""

    @abstractmethod
    def disable_device(self, device_id: str, certificate_pem: str) -> dict[str, Any]:
        """Stop one device of a group: a disabled individual enrollment holding its certificate."""

    @abstractmethod
    def admit_only(self, device_id: str, certificate_pem: str) -> dict[str, Any]:
        """Admit one device with this certificate only: an enabled individual enrollment holding it, which
        DPS matches before the group (DESIGN "Revocation and DPS")."""
