"""The Device Provisioning Service port: root registration, enrollment groups, device disables.

The embedded default is `OfflineDps`, which records the documents it would send and says plainly that
DPS is not configured.
"""

from abc import ABC, abstractmethod
from typing import Any


class Dps(ABC):
    configured: bool = False

    @abstractmethod
    def describe(self) -> dict[str, str]: ...

    @abstractmethod
    def registration_info(self, device_id: str) -> dict[str, str] | None:
        """What a device needs to provision itself (globalEndpoint, idScope, registrationId), if known."""

    @abstractmethod
    def register_root(self, root_id: str, certificate_pem: str) -> dict[str, Any]:
        """Upload the root CA certificate. Returns the state to keep in the ledger."""

    @abstractmethod
    def verify_root(self, root_id: str, verification_code: str, certificate_pem: str) -> dict[str, Any]:
        """Send the proof-of-possession certificate. Returns the state to keep in the ledger."""

    @abstractmethod
    def put_enrollment_group(self, group_id: str, certificate_pem: str, enabled: bool) -> dict[str, Any]:
        """Create or update the enrollment group of an intermediate."""

    @abstractmethod
    def disable_device(self, device_id: str, certificate_pem: str) -> dict[str, Any]:
        """Stop one device of a group: a disabled individual enrollment holding its certificate."""
