"""The composition root: the service wired to the adapters the settings ask for.

Every entry point (the CLI, the HTTP API and so the Functions app) builds its service here, and nothing
else picks adapters. With no settings: local key files, SQLite and offline DPS under PKI_HOME. With
KEY_VAULT_URL and LEDGER_TABLES set, nothing is kept on local disk.
"""

import logging
from collections.abc import Callable
from datetime import datetime

from .config import Settings
from .dps import Dps
from .errors import CaError
from .keys import KeyStore
from .ledger import Ledger
from .queues import (
    BATCH_CHUNKS,
    DPS_REGISTRATIONS,
    EXPIRING_CERTIFICATES,
    InProcessQueue,
    MessageQueue,
    storage_queue,
)
from .service import DeviceCA, utcnow

log = logging.getLogger("device_ca.queues")


def build_service(settings: Settings | None = None, clock: Callable[[], datetime] | None = None) -> DeviceCA:
    """The service for `settings` (read from the environment and local.settings.json when None)."""
    settings = settings or Settings.load()
    keys = key_store(settings)
    ledger, dps = ledger_and_dps(settings)
    if settings.dps_configured:
        dps = azure_dps(settings)
    queue = batch_queue(settings)
    service = DeviceCA(
        keys=keys,
        ledger=ledger,
        dps=dps,
        settings=settings,
        clock=clock or utcnow,
        expiry_queue=expiry_queue(settings),
        batch_queue=queue,
    )
    if settings.storage_queues:
        service.dps_registrations = storage_queue(settings, DPS_REGISTRATIONS)
    if isinstance(queue, InProcessQueue):  # the embedded default: this process signs what it queues
        queue.serve(_unless_unsignable(service.sign_batch_chunk), _unless_unsignable(service.fail_batch_chunk))
    return service


def _unless_unsignable(handle: Callable[[str], object]) -> Callable[[str], None]:
    """`handle`, but a message that can never be signed (not this app's, or naming nothing in the ledger: a
    refusal under 500) is logged and dropped, as the queue functions do (shared/batch_functions.py),
    rather than delivered again and again until the poison handler refuses it too."""

    def run(text: str) -> None:
        try:
            handle(text)
        except CaError as error:
            if error.status >= 500:
                raise
            log.warning("queue message dropped: %s (%s)", error.message, error.code)

    return run


def batch_queue(settings: Settings) -> MessageQueue:
    """Where batch chunks are queued: the Storage queue BATCH_CHUNKS when QUEUE_STORAGE (or its service URI)
    is set, for function_app.py's queue trigger; else a queue in this process, whose worker thread runs the
    same handler (so `serve` takes batches with no Azure at all)."""
    if settings.storage_queues:
        return storage_queue(settings, BATCH_CHUNKS)
    return InProcessQueue(BATCH_CHUNKS)


def azure_dps(settings: Settings) -> Dps:
    """The real DPS the settings name; DefaultAzureCredential for ARM (and for the service API unless
    DPS_CONNECTION_STRING gives a shared access policy)."""
    from azure.identity import DefaultAzureCredential

    from .dps.azure import AzureDps

    return AzureDps(settings.dps_config(), DefaultAzureCredential())


def key_store(settings: Settings) -> KeyStore:
    """Key Vault when KEY_VAULT_URL is set, else key files under PKI_HOME."""
    if settings.key_vault_url:
        from azure.identity import DefaultAzureCredential

        from .keys.keyvault import KeyVaultKeyStore

        # Managed identity in Azure, a developer's login (az, azd, VS Code) on a workstation.
        return KeyVaultKeyStore(settings.key_vault_url, DefaultAzureCredential(), settings.key_vault_options())
    from .keys.local import LocalKeyStore

    return LocalKeyStore(settings.pki_home, settings.key_passphrase)


def expiry_queue(settings: Settings) -> MessageQueue:
    """Where expiry notices go: the `expiring-certificates` Storage queue with QUEUE_STORAGE (or its
    queueServiceUri), else an in-process queue that nothing reads, and the warning log line is the notice."""
    if settings.storage_queues:
        return storage_queue(settings, EXPIRING_CERTIFICATES)
    return InProcessQueue(EXPIRING_CERTIFICATES)


def ledger_and_dps(settings: Settings) -> tuple[Ledger, Dps]:
    """The Table Storage ledger (with offline DPS documents in a table beside it) when LEDGER_TABLES is
    set, else SQLite and offline DPS files under PKI_HOME."""
    from .dps.offline import OfflineDps

    if settings.ledger_tables:
        from .ledger.tables import TableLedger
        from .tablestore import TableDocuments, connect

        store = connect(settings.ledger_tables, settings.ledger_table_prefix, settings.ledger_retry_seconds)
        return TableLedger(store), OfflineDps(documents=TableDocuments(store))
    from .ledger.sqlite import SqliteLedger

    return SqliteLedger(settings.pki_home / "ledger.sqlite3"), OfflineDps(settings.pki_home)
