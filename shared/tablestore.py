"""Azure Table Storage plumbing shared by the adapters that keep state there (the ledger, offline DPS).

One `TableStore` per process and setting: a `TableServiceClient` built from a Storage connection string
or from an account's table endpoint URL with `DefaultAzureCredential` (a managed identity in Azure, a
developer's login on a workstation), the table names under one prefix, the SDK's retry policy bounded
in time, and errors turned into the service's own.

Retries: azure-core's `TablesRetryPolicy` retries connection failures, 408, 429, 500, 502, 503 and 504
(a POST such as a transaction only on 500, 503 and 504) with exponential backoff; here it is bounded
to `retry_seconds` in all (`timeout`), after which the caller gets BackendUnavailable (HTTP 503 with
Retry-After). Facts: ../shared/AZURE-FACTS.md "Azurite and the Storage SDKs".
"""

import json
import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import requests
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ServiceResponseError
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.core.pipeline.transport import HttpTransport, RequestsTransport
from azure.data.tables import TableClient, TableServiceClient
from azure.data.tables._policies import TablesRetryPolicy
from requests.adapters import HTTPAdapter

from .errors import BackendUnavailable, CaError, Misconfigured

# Table names: 3-63 letters and digits, starting with a letter (Azure Table Storage naming rules).
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9]{0,39}")
ROLE_HINT = "the service identity needs the 'Storage Table Data Contributor' role on the Storage account"
RETRY_AFTER_SECONDS = 5
# Table Storage answers a query with at most 1,000 entities a request (Query Entities, "Query timeout and
# pagination"); a listing that needs more reads the next page
MAX_ENTITIES_PER_REQUEST = 1000


class TransactionCounter(SansIOHTTPPolicy):
    """Counts the requests sent to Storage, each retry included: what Azure bills as transactions (an
    entity group transaction is one). Installed after the SDK's retry policy, so every attempt counts;
    `retries` counts the attempts after a request's first (its context is the same on every attempt), so
    that `count - retries` is what the ledger asked for, however slow Storage was."""

    _SENT = "device_ca.sent"  # set in a request's context at its first attempt

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.retries = 0

    def on_request(self, request: PipelineRequest) -> None:
        again = self._SENT in request.context
        request.context[self._SENT] = True
        with self._lock:
            self.count += 1
            self.retries += again

    @property
    def requests(self) -> int:
        """The requests the ledger made, each counted once however many attempts it took."""
        return self.count - self.retries


class TableStore:
    """The tables of one deployment (`<prefix><name>`) on one account, through one pipeline."""

    def __init__(
        self,
        service: TableServiceClient,
        prefix: str,
        description: str,
        counter: TransactionCounter | None = None,
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise Misconfigured(
                f"table prefix {prefix!r} must be 1-40 letters and digits, starting with a letter", "invalid-setting"
            )
        self.service = service
        self.prefix = prefix
        self.description = description
        self.counter = counter or TransactionCounter()
        policies: list[Any] = service._policies  # shared by every TableClient made from this service client
        retry = next(i for i, policy in enumerate(policies) if isinstance(policy, TablesRetryPolicy))
        policies.insert(retry + 1, self.counter)
        self._tables: dict[str, TableClient] = {}
        self._lock = threading.Lock()

    def table(self, name: str) -> TableClient:
        """The client of table `<prefix><name>` (made once; clients are thread-safe)."""
        with self._lock:
            client = self._tables.get(name)
            if client is None:
                client = self._tables[name] = self.service.get_table_client(self.prefix + name)
            return client

    def ensure_tables(self, names: list[str]) -> None:
        """Create the tables that do not exist yet (a deployment's first start)."""
        for name in names:
            with storage_errors(f"create table {self.prefix + name}"), suppress(ResourceExistsError):
                self.table(name).create_table()

    def describe(self) -> dict[str, str]:
        return {"endpoint": self.description, "tablePrefix": self.prefix}

    def close(self) -> None:
        for client in self._tables.values():
            client.close()
        self.service.close()


def connect(
    target: str,
    prefix: str,
    retry_seconds: float = 30.0,
    credential: TokenCredential | None = None,
    transport: HttpTransport | None = None,
    backoff_seconds: float = 0.4,
) -> TableStore:
    """A TableStore for `target`: a Storage (or Cosmos DB for Table) connection string, or a table endpoint
    URL (`https://<account>.table.core.windows.net`) used with `credential` (DefaultAzureCredential when
    None). `retry_seconds` bounds each operation's retries, which wait 2 times `backoff_seconds`, doubling
    (azure-core retries a second time at once); `transport` replaces the HTTP transport (tests)."""
    options: dict[str, Any] = {
        "transport": transport or _transport(retry_seconds),
        "retry_total": 8,
        "retry_backoff_factor": backoff_seconds,
        "retry_backoff_max": 8,
        "timeout": retry_seconds,
    }
    if target.lower().startswith(("http://", "https://")):
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        service = TableServiceClient(endpoint=target.rstrip("/"), credential=credential, **options)
        description = target.split("?")[0].rstrip("/")
    else:
        try:
            service = TableServiceClient.from_connection_string(target, **options)
        except ValueError as error:
            raise Misconfigured(f"the Storage connection string is not valid: {error}", "invalid-setting") from None
        description = service.url.split("?")[0].rstrip("/")
    return TableStore(service, prefix, description)


def _transport(retry_seconds: float) -> RequestsTransport:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=64)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return RequestsTransport(
        session=session, session_owner=True, connection_timeout=5, read_timeout=min(30.0, retry_seconds)
    )


@contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Turn what Storage raised while doing `action` into the service's errors: unavailable (no answer,
    5xx, 408, 429 once the SDK's retries are spent) is BackendUnavailable; a refused identity is
    Misconfigured. Other answers are bugs here and go on as they are."""
    try:
        yield
    except CaError:
        raise
    except AzureError as error:
        failure = storage_failure(error, action)
        if failure is error:
            raise
        raise failure from None


def storage_failure(error: AzureError, action: str) -> CaError | AzureError:
    status = getattr(error, "status_code", None) if isinstance(error, HttpResponseError) else None
    if status in (401, 403):
        code = _error_code(error)
        return Misconfigured(f"Table Storage refused to {action} ({status} {code}); {ROLE_HINT}", "ledger-forbidden")
    if status is None or status in (408, 429) or status >= 500:
        reason = f"{status} {_error_code(error)}" if status else type(error).__name__
        # a request sent whose answer was lost may have been carried out: say so, not "nothing was recorded"
        lost = isinstance(error, ServiceResponseError)
        outcome = "its answer was lost: it may have been done" if lost else "nothing was recorded"
        return BackendUnavailable(
            f"the ledger (Table Storage) is unavailable: could not {action} ({reason}); {outcome}",
            "ledger-unavailable",
            retry_after=RETRY_AFTER_SECONDS,
        )
    return error


def error_code(error: HttpResponseError) -> str:
    """Storage's error code (`x-ms-error-code`), which azure-data-tables 12.7 does not set on every error."""
    return _error_code(error)


def _error_code(error: AzureError) -> str:
    code = getattr(error, "error_code", None)
    response = getattr(error, "response", None)
    if not code and response is not None:
        code = response.headers.get("x-ms-error-code")
    return str(getattr(code, "value", code) or "")  # Storage's own code, not the SDK's enum member name


class TableDocuments:
    """Documents kept in a table (`PartitionKey` = kind, `RowKey` = name): what offline DPS would have sent."""

    def __init__(self, store: TableStore, name: str = "dpsoffline") -> None:
        self.store = store
        self.name = name
        store.ensure_tables([name])

    @property
    def location(self) -> str:
        return f"table {self.store.prefix + self.name}"

    def backup_into(self, home: Path) -> str | None:
        """These documents live in Table Storage, not under PKI_HOME: a backup of PKI_HOME holds none."""
        return None

    def lock(self, kind: str, name: str) -> AbstractContextManager[None]:
        """Nothing wider than the service's own per-process lock: offline records are for reading, and the
        real DPS adapter keeps instances in order with etags."""
        return nullcontext()

    def put(self, kind: str, name: str, document: dict[str, Any]) -> str:
        with storage_errors("record an offline DPS document"):
            self.store.table(self.name).upsert_entity(
                {"PartitionKey": kind, "RowKey": name, "document": json.dumps(document, sort_keys=True)}
            )
        return f"{self.location} ({kind}/{name})"

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        from azure.core.exceptions import ResourceNotFoundError

        with storage_errors("read an offline DPS document"):
            try:
                entity = self.store.table(self.name).get_entity(kind, name)
            except ResourceNotFoundError:
                return None
        return json.loads(entity["document"])
