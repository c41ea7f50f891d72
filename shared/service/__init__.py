"""The use cases of the device CA: the only place that orchestrates keys, ledger and DPS.

Every entry point (CLI, HTTP, queue, timer) calls these and nothing below them.
"""

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..coalesce import Coalescer
from ..config import Settings
from ..dps import Dps
from ..errors import CaError
from ..keys import KeyStore
from ..ledger import Ledger
from ..pki import Issuer
from .access import Principals
from .ca import CaUseCases
from .common import (
    ROOT_ID,
    CaResult,
    IssuedCertificate,
    ProofOfPossession,
    SignRequest,
    normalize_serial,
    pem,
    serial_text,
    utcnow,
)
from .devices import DeviceUseCases, _SignOptions


class DeviceCA(CaUseCases, DeviceUseCases):
    def __init__(
        self,
        keys: KeyStore,
        ledger: Ledger,
        dps: Dps,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.keys = keys
        self.ledger = ledger
        self.dps = dps
        self.settings = settings
        self._now = clock
        self._issuers: dict[tuple[str, str], Issuer] = {}
        self._issuers_lock = threading.Lock()
        self.principals = Principals(ledger, clock)
        self._ca_creation = threading.Lock()  # concurrent creations here never make a key they then lose
        self._coalescer: Coalescer[_SignOptions, SignRequest, IssuedCertificate | CaError] = Coalescer(
            self._sign_batch_async
        )

    def close(self) -> None:
        self.keys.close()
        self.ledger.close()

    def health(self) -> dict[str, Any]:
        """Which backends are in use; BackendUnavailable when the ledger cannot be read."""
        self.ledger.ping()
        return {
            "status": "ok",
            "keys": self.keys.describe(),
            "ledger": self.ledger.describe(),
            "dps": self.dps.describe(),
        }


__all__ = [
    "ROOT_ID",
    "CaResult",
    "DeviceCA",
    "IssuedCertificate",
    "ProofOfPossession",
    "SignRequest",
    "normalize_serial",
    "pem",
    "serial_text",
    "utcnow",
]
