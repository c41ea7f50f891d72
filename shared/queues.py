"""Storage queues: where the service hands work to the queue-triggered functions and to automation.

One setting names the Storage account, the way the Functions host names a trigger's connection
(`connection="QUEUE_STORAGE"` in function_app.py), so the producer here and the host's triggers always
reach the same queues:

- `QUEUE_STORAGE`: a Storage connection string (Azurite's, or an account key's), or
- `QUEUE_STORAGE__queueServiceUri`: `https://<account>.queue.core.windows.net`, reached with
  DefaultAzureCredential (a managed identity in Azure; role "Storage Queue Data Contributor", since
  the producer creates the queue on first use).

With neither, there is no Storage queue: each feature says what it does in the embedded default
(batches run on an in-process queue, for example). Messages are sent in the encoding host.json's
`extensions.queues.messageEncoding` names ("base64", the host's default, or "none"), since the host
decodes with it before a function sees the message.
"""

import heapq
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import AzureError, ResourceExistsError

from .errors import BackendUnavailable, Misconfigured

if TYPE_CHECKING:
    from .config import Settings

CONNECTION_SETTING = "QUEUE_STORAGE"
SERVICE_URI_SETTING = f"{CONNECTION_SETTING}__queueServiceUri"
HOST_JSON = Path(__file__).resolve().parent.parent / "host.json"
# A queue message's size limit (Azure Queue Storage: 64 KiB, after encoding).
MAX_MESSAGE_BYTES = 64 * 1024

# The queues this app uses; function_app.py's triggers and the producers take the names from here.
log = logging.getLogger("device_ca.queues")

BATCH_CHUNKS = "batch-chunks"
DPS_REGISTRATIONS = "dps-registrations"
EXPIRING_CERTIFICATES = "expiring-certificates"


def poison_queue(name: str) -> str:
    """The queue the Functions host moves a message to after maxDequeueCount failed deliveries."""
    return f"{name}-poison"


def host_message_encoding(host_json: Path = HOST_JSON) -> str:
    """ "base64" or "none": what the Functions host expects on the queues (host.json, base64 when unset)."""
    document: Any = json.loads(host_json.read_text())
    encoding = document.get("extensions", {}).get("queues", {}).get("messageEncoding", "base64")
    if encoding not in ("base64", "none"):
        raise Misconfigured(f"host.json messageEncoding {encoding!r} must be base64 or none", "invalid-setting")
    return encoding


def encoded_size(text: str, encoding: str) -> int:
    """The bytes `text` takes on the queue in `encoding` (base64 grows it by 4/3)."""
    raw = len(text.encode())
    return 4 * ((raw + 2) // 3) if encoding == "base64" else raw


class MessageQueue(ABC):
    """A queue that takes text messages (JSON, by this app's convention)."""

    name: str

    @abstractmethod
    def send(self, text: str, delay_seconds: int = 0) -> None:
        """Queue `text`, visible after `delay_seconds`. Raises Misconfigured when it would exceed
        MAX_MESSAGE_BYTES once encoded, BackendUnavailable when Storage stays unreachable."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (and stop a worker)."""


class StorageQueue(MessageQueue):
    """A queue in Azure Queue Storage (or Azurite), created on first use."""

    def __init__(self, client: Any, encoding: str) -> None:
        self._client = client
        self.name: str = client.queue_name
        self.encoding = encoding
        self._created = False
        self._lock = threading.Lock()

    def send(self, text: str, delay_seconds: int = 0) -> None:
        _check_size(text, self.encoding)
        self._ensure_created()
        try:
            self._client.send_message(text, visibility_timeout=delay_seconds or None)
        except AzureError as error:
            raise BackendUnavailable(f"Queue Storage did not take the message: {type(error).__name__}") from None

    def receive(self, max_messages: int = 32, visibility_timeout: int = 30) -> list[Any]:
        """Up to `max_messages` messages, decoded, hidden for `visibility_timeout` seconds (tests, tools)."""
        self._ensure_created()
        return list(self._client.receive_messages(max_messages=max_messages, visibility_timeout=visibility_timeout))

    def delete(self, message: Any) -> None:
        self._client.delete_message(message)

    def close(self) -> None:
        self._client.close()

    def _ensure_created(self) -> None:
        if self._created:
            return
        with self._lock:
            try:
                self._client.create_queue()
            except ResourceExistsError:
                pass
            except AzureError as error:
                raise BackendUnavailable(f"Queue Storage is unreachable: {type(error).__name__}") from None
            self._created = True


class InProcessQueue(MessageQueue):
    """A queue in this process's memory: what the embedded default uses where a feature needs one.

    With `serve(handler, poison)`, a worker thread (started by the first message) hands each message to
    `handler`, as the Functions host does with a Storage queue's: a message whose handler raises is
    delivered again after `retry_seconds` (doubling, at most 60 s), and after `max_dequeue_count`
    failed deliveries it goes to `poison` instead. Messages are lost with the process."""

    def __init__(self, name: str, max_dequeue_count: int = 5, retry_seconds: float = 1.0) -> None:
        self.name = name
        self.messages: deque[str] = deque()
        self.max_dequeue_count = max_dequeue_count
        self.retry_seconds = retry_seconds
        self._retries: list[tuple[float, int, str]] = []  # (due on the monotonic clock, deliveries so far, text)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._handlers: tuple[Callable[[str], Any], Callable[[str], Any]] | None = None
        self._worker: threading.Thread | None = None
        self._busy = False
        self._closed = False

    def send(self, text: str, delay_seconds: int = 0) -> None:
        _check_size(text, "none")
        with self._lock:
            if delay_seconds:
                heapq.heappush(self._retries, (time.monotonic() + delay_seconds, 0, text))
            else:
                self.messages.append(text)
            if self._handlers is not None and self._worker is None and not self._closed:
                self._worker = threading.Thread(target=self._work, name=f"queue-{self.name}", daemon=True)
                self._worker.start()
            self._changed.notify_all()

    def take(self) -> str | None:
        """The oldest message, removed; None when the queue is empty."""
        with self._lock:
            return self.messages.popleft() if self.messages else None

    def serve(self, handler: Callable[[str], Any], poison: Callable[[str], Any]) -> None:
        """Deliver every message to `handler` in a worker thread, from the next message sent on."""
        with self._lock:
            self._handlers = (handler, poison)

    def wait_idle(self) -> None:
        """Return once no message is waiting, due later or being handled (tests, a server's shutdown)."""
        with self._lock:
            while self.messages or self._retries or self._busy:
                self._changed.wait()

    def close(self) -> None:
        """Stop the worker after the message it is handling; messages still queued are dropped."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join()

    def _next(self) -> tuple[str, int] | None:
        """The next message to deliver and its deliveries so far, waiting for one; None once closed."""
        with self._lock:
            while not self._closed:
                if self.messages:
                    self._busy = True
                    return self.messages.popleft(), 0
                if self._retries:
                    due, deliveries, text = self._retries[0]
                    wait = due - time.monotonic()
                    if wait <= 0:
                        heapq.heappop(self._retries)
                        self._busy = True
                        return text, deliveries
                    self._changed.wait(wait)
                else:
                    self._changed.wait()
            return None

    def _work(self) -> None:
        assert self._handlers is not None
        handler, poison = self._handlers
        while (taken := self._next()) is not None:
            text, deliveries = taken
            deliveries += 1
            try:
                if deliveries > self.max_dequeue_count:
                    poison(text)
                else:
                    handler(text)
            except Exception:
                log.warning("queue %s: delivery %d of a message failed", self.name, deliveries, exc_info=True)
                if deliveries <= self.max_dequeue_count:
                    delay = min(self.retry_seconds * 2 ** (deliveries - 1), 60.0)
                    with self._lock:
                        heapq.heappush(self._retries, (time.monotonic() + delay, deliveries, text))
            finally:
                with self._lock:
                    self._busy = False
                    self._changed.notify_all()


def _check_size(text: str, encoding: str) -> None:
    size = encoded_size(text, encoding)
    if size > MAX_MESSAGE_BYTES:
        raise Misconfigured(f"a queue message of {size} bytes exceeds Queue Storage's 64 KiB", "message-too-large")


def storage_queue(settings: "Settings", name: str, encoding: str | None = None, credential: Any = None) -> StorageQueue:
    """The Storage queue `name` in the account the settings name (see the module docstring).

    Raises Misconfigured when neither setting is given or the connection string is not valid."""
    from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

    encoding = encoding or host_message_encoding()
    codecs: dict[str, Any] = {}
    if encoding == "base64":
        codecs = {"message_encode_policy": TextBase64EncodePolicy(), "message_decode_policy": TextBase64DecodePolicy()}
    options: dict[str, Any] = {"retry_total": 5, "retry_backoff_factor": 0.4, "retry_backoff_max": 8, **codecs}
    if settings.queue_storage:
        try:
            client = QueueClient.from_connection_string(settings.queue_storage, name, **options)
        except ValueError as error:
            raise Misconfigured(
                f"{CONNECTION_SETTING} is not a valid connection string: {error}", "invalid-setting"
            ) from None
    elif settings.queue_service_uri:
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        client = QueueClient(settings.queue_service_uri.rstrip("/"), name, credential=credential, **options)
    else:
        raise Misconfigured(f"set {CONNECTION_SETTING} or {SERVICE_URI_SETTING} for Storage queues", "invalid-setting")
    return StorageQueue(client, encoding)
