"""The use cases of the device CA: the only place that orchestrates keys, ledger and DPS.

Every entry point (CLI, HTTP, queue, timer) calls these and nothing below them.
"""

import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from ..coalesce import Coalescer
from ..config import Settings
from ..dps import Dps
from ..errors import CaError, unexpected
from ..keys import KeyStore
from ..ledger import Ledger
from ..ledger.models import CA_ACTIVE
from ..pki import Issuer
from ..queues import BATCH_CHUNKS, EXPIRING_CERTIFICATES, InProcessQueue, MessageQueue
from .access import Principals
from .batches import BatchUseCases
from .ca import CaUseCases
from .common import (
    RENEWAL_RETRY_WINDOW,
    ROOT_ID,
    Backup,
    CaChain,
    CaResult,
    HealthReport,
    IssuedCertificate,
    ProofOfPossession,
    SignRequest,
    check_backup_destination,
    normalize_serial,
    pem,
    serial_text,
    utcnow,
)
from .devices import DeviceUseCases, _SignOptions
from .dps import DpsUseCases
from .expiry import ExpiryFinding, ExpiryReport, ExpiryThresholds, ExpiryUseCases


class DeviceCA(CaUseCases, DeviceUseCases, DpsUseCases, ExpiryUseCases, BatchUseCases):
    def __init__(
        self,
        keys: KeyStore,
        ledger: Ledger,
        dps: Dps,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
        expiry_queue: MessageQueue | None = None,
        batch_queue: MessageQueue | None = None,
    ) -> None:
        self.keys = keys
        self.ledger = ledger
        self.dps = dps
        self.settings = settings
        self._now = clock
        self.batch_queue = batch_queue if batch_queue is not None else InProcessQueue(BATCH_CHUNKS)
        self._issuers: dict[tuple[str, str], Issuer] = {}
        self._issuers_lock = threading.Lock()
        self._ca_pems: dict[str, str] = {}  # CA ID -> its certificate: IDs are never reused (unique CA IDs)
        # a factory's two writes (principal, then key) end within the ledger's retry time, twice over
        self.principals = Principals(ledger, clock, creation_seconds=2 * settings.ledger_retry_seconds)
        self.dps_registrations = None  # a MessageQueue for DPS registrations (composition sets it)
        self._ca_creation = threading.Lock()  # concurrent creations here never make a key they then lose
        # where the expiry scan's notices go (composition.py: Storage with QUEUE_STORAGE, else in-process)
        self.expiry_queue = expiry_queue or InProcessQueue(EXPIRING_CERTIFICATES)
        self._coalescer: Coalescer[_SignOptions, SignRequest, IssuedCertificate | CaError] = Coalescer(
            self._sign_batch_async
        )

    def close(self) -> None:
        self.batch_queue.close()  # first: an in-process queue's worker may be signing
        self.keys.close()
        self.ledger.close()

    def backup(self, destination: Path) -> Backup:
        """Write a consistent copy of this CA into `destination`, a folder that does not exist yet (its
        parent must) or is empty, made with mode 0700: the ledger as of one moment as one file, then the
        local CA key files (after the ledger, so that every key it names is there), then the offline DPS
        records. Point PKI_HOME at it to restore. CaError "backup-destination" when it cannot be a backup's
        home; a backup that fails part way is removed."""
        destination = Path(destination)
        check_backup_destination(destination)
        if destination.resolve().is_relative_to(Path(self.settings.pki_home).resolve()):
            raise CaError(
                f"cannot back up to {destination}: it is inside PKI_HOME, which the backup copies", "backup-destination"
            )
        made = not destination.exists()
        destination.mkdir(mode=0o700, exist_ok=True)
        try:
            counts = self.ledger.backup_into(destination)
            contents = [f"the ledger: {counts['cas']} CA(s), {counts['certificates']} certificate(s), as one file"]
            contents.append(self.keys.backup_into(destination))
            dps = self.dps.backup_into(destination)
            contents += [dps] if dps else []
        except BaseException:
            for path in sorted(destination.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            if made:
                destination.rmdir()
            raise
        return Backup(destination, counts["cas"], counts["certificates"], tuple(contents))

    def backends(self) -> dict[str, dict[str, str]]:
        """Which backends are in use, and where (for the operator: these name paths and vaults)."""
        return {"keys": self.keys.describe(), "ledger": self.ledger.describe(), "dps": self.dps.describe()}

    def health(self) -> HealthReport:
        """Whether the service can work: the ledger can be read, and the keys of the root and of every
        active intermediate can be used (a wrong PKI_KEY_PASSPHRASE, a missing key file, a Key Vault that
        refuses). Never raises for a part that fails: each is in `problems` with its error."""
        problems: list[tuple[str, CaError]] = []
        try:
            self.ledger.ping()
            cas = [ca for ca in self.ledger.list_cas() if ca.status == CA_ACTIVE]
        except CaError as error:
            problems.append(("ledger", error))
            cas = []
        except Exception as error:  # a ledger file that is not one, say
            problems.append(("ledger", unexpected(error, "reading the ledger")))
            cas = []
        for record in cas:
            try:
                self._issuer(record)  # loads the key once; later checks find it loaded
            except CaError as error:
                problems.append(("keys", error))
                break
            except Exception as error:
                problems.append(("keys", unexpected(error, f"loading the key of CA {record.id}")))
                break
        return HealthReport(self.backends(), tuple(problems))


__all__ = [
    "RENEWAL_RETRY_WINDOW",
    "ROOT_ID",
    "Backup",
    "CaChain",
    "CaResult",
    "DeviceCA",
    "ExpiryFinding",
    "ExpiryReport",
    "ExpiryThresholds",
    "HealthReport",
    "IssuedCertificate",
    "ProofOfPossession",
    "SignRequest",
    "normalize_serial",
    "pem",
    "serial_text",
    "utcnow",
]
