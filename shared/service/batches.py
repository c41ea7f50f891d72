"""Use case: sign a batch of device CSRs through a queue (DESIGN "Batches").

`submit_batch` stores every item in the ledger (a malformed item as that item's failure), then queues one
message per chunk of items; the message names the chunk (`ChunkMessage`: batch ID and chunk number), never
a CSR. `sign_batch_chunk` is the queue handler, the same whether the Functions host (a Storage queue) or the
embedded server (an in-process queue) delivers the message: it signs the chunk's pending items with the
use case that signs one CSR (`sign_csrs`: ownership, policy, key binding, the same CSR's certificate given
back), in one ledger commit, and records each item's result. Delivery is at least once: a chunk whose items
are finished is left alone, and one whose certificates were committed before its results were recorded gets
them back from the ledger, so a redelivered message issues nothing new. A failure that a later delivery may
not meet (Key Vault or Storage unavailable, an unexpected error) is raised, so that the message is delivered
again, once the items that did finish have their results recorded (a certificate this delivery committed is
never left for the poison handler to call failed); after the host's maxDequeueCount the poison handler
`fail_batch_chunk` fails the chunk's unfinished items with the last failure's words.

Mixed into `DeviceCA`, which holds the key store, the ledger, the settings, the clock and `batch_queue`.
"""

import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import parameters
from ..errors import BackendUnavailable, CaError, NotFound, for_callers, shown_to_callers, unexpected
from ..jsonlines import line_problem
from ..ledger import invalid_cursor
from ..ledger.models import (
    FACTORY,
    ITEM_FAILED,
    ITEM_ISSUED,
    MAX_CHUNK_ITEMS,
    BatchItem,
    BatchPage,
    BatchRecord,
    BatchSummary,
    CertificateRecord,
)
from ..pki import PkiError, whole_seconds
from ..pki.csr import check_device_csr
from ..pki.names import check_ca_id
from ..queues import MessageQueue
from .common import IssuedCertificate, SignRequest

log = logging.getLogger("device_ca.batches")

MAX_BATCH_ITEMS = 10_000
# Items a queue message names: as many as one Table Storage transaction records with the chunk's row.
CHUNK_SIZE = MAX_CHUNK_ITEMS
QUEUE_SENDS_AT_ONCE = 8  # chunk messages sent in parallel when a batch is submitted
MAX_ITEM_CSR = 8 * 1024  # characters of one item's CSR, as for POST /api/devices/{id}/certificate
MAX_ITEM_DEVICE_ID = 128  # characters; DPS registration IDs are at most 128 (64 for X.509)
# PEM is printable ASCII: anything else could never be a CSR, and would swell a chunk's Table Storage transaction
# past its 4 MiB (a character like U+20AC or U+0000 takes 6 bytes as JSON) before the item could fail
_PEM_TEXT = re.compile(r"[\x20-\x7e\t\r\n]*")
_BATCH_ID = re.compile(r"[0-9a-f]{16}")


class ChunkMessage(BaseModel):
    """A queue message: which chunk of which batch to sign. Never a CSR: those are in the ledger."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # no true for 1, no "0" for 0

    batchId: str = Field(pattern=_BATCH_ID.pattern)
    chunk: int = Field(ge=0, lt=MAX_BATCH_ITEMS)

    def text(self) -> str:
        return self.model_dump_json()

    @classmethod
    def read(cls, text: str | bytes) -> "ChunkMessage":
        """The message in `text`; CaError "invalid-message" when it is not one this app sends."""
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            raise CaError("the queue message is not a batch chunk message", "invalid-message") from None


@dataclass(frozen=True)
class ChunkOutcome:
    """What one delivery of a chunk did: `recorded` items got their result now (`issued` of them with a
    certificate this delivery created); `already_finished` when every item had its result before."""

    batch_id: str
    chunk: int
    recorded: int = 0
    issued: int = 0
    already_finished: bool = False


@dataclass(frozen=True)
class BatchResult:
    """One item's result as a caller reads it: its certificate (in the ledger) or its error, or pending."""

    index: int
    device_id: str
    status: str
    issued: IssuedCertificate | None = None
    error: tuple[str, str] | None = None  # (code, message)


@dataclass(frozen=True)
class BatchResults:
    summary: BatchSummary
    results: list[BatchResult]
    next_cursor: str | None


class BatchUseCases:
    batch_queue: MessageQueue | None = None

    # -- submitting ----------------------------------------------------------------------------------

    def submit_batch(
        self,
        items: Sequence[Any],
        *,
        requested_by: str,
        allowed_intermediates: Sequence[str] | None = None,
        intermediate_id: str | None = None,
        enqueue: bool = True,
        lines: Sequence[int] | None = None,
    ) -> BatchSummary:
        """Store a batch of `{"deviceId", "csr"}` items (1 to MAX_BATCH_ITEMS) and queue its chunks.

        The intermediate is chosen now, by the rules of one CSR (Forbidden, NotFound, Conflict as there;
        PkiError "invalid-ca-id" when `intermediate_id` is no CA ID); an item that is not an object with a
        device ID (Unicode text) and a CSR (PEM text: printable ASCII, at most MAX_ITEM_CSR characters) is
        that item's failure ("invalid-item"). Every item is in the ledger before this returns.
        `lines`, for items read from JSON Lines (shared.jsonlines), is each item's line number: an item's
        failure then names its line ("line 3 is not JSON: ...") where it would name its index ("item 2: ...").
        With `enqueue` False the chunks are not queued (the CLI signs them itself with `sign_batch_chunk`).
        BackendUnavailable when a chunk cannot be queued: its items are then failed, so that nothing waits for
        a message that never came."""
        if not items:
            raise CaError("a batch needs at least one item", "empty-batch")
        if len(items) > MAX_BATCH_ITEMS:
            raise CaError(f"a batch holds at most {MAX_BATCH_ITEMS} items, not {len(items)}", "too-many-items")
        allowed = tuple(allowed_intermediates) if allowed_intermediates is not None else None
        if intermediate_id is not None:
            check_ca_id(intermediate_id)  # a body's intermediateId: "" or "\\udc00" is no CA's
        intermediate = self._signing_intermediate(intermediate_id, allowed)
        now = whole_seconds(self._now())
        batch = BatchRecord(
            id=secrets.token_hex(8),
            requested_by=requested_by,
            intermediate_id=intermediate.id,
            allowed_intermediates=allowed,
            created_at=now,
            total=len(items),
            chunk_size=CHUNK_SIZE,
        )
        numbers = lines if lines is not None else [None] * len(items)
        stored = [
            _batch_item(batch, index, raw, line) for index, (raw, line) in enumerate(zip(items, numbers, strict=True))
        ]
        try:
            self.ledger.add_batch(batch, stored)
        except BackendUnavailable:
            if not self._stored(batch.id):
                raise
        failed = sum(item.status == ITEM_FAILED for item in stored)
        waiting = sorted({item.index // CHUNK_SIZE for item in stored if item.status != ITEM_FAILED})
        if enqueue:
            self._queue_chunks(batch, waiting)
        return BatchSummary(batch, 0, failed, None, now if not waiting else None)

    def _stored(self, batch_id: str) -> bool:
        """Whether the ledger holds batch `batch_id` after its write failed: its last step (the batch's own
        row) may have landed and only the answer been lost, and a stored batch must then be queued. False
        when the ledger cannot tell: the caller's 503 stands (the embedded server resumes such a batch)."""
        try:
            return self.ledger.get_batch(batch_id) is not None
        except CaError:
            return False

    def _queue_chunks(self, batch: BatchRecord, chunks: list[int]) -> None:
        """Send the chunks' messages, several at once (each is a Storage request); the items of a chunk whose
        message could not be sent are failed, and BackendUnavailable says which."""
        queue = self.batch_queue
        if queue is None:
            raise CaError("this service has no batch queue", "no-batch-queue")

        def send(chunk: int) -> CaError | None:
            try:
                queue.send(ChunkMessage(batchId=batch.id, chunk=chunk).text())
            except CaError as error:
                return error
            return None

        with ThreadPoolExecutor(max_workers=min(QUEUE_SENDS_AT_ONCE, len(chunks) or 1)) as pool:
            failures = [(chunk, error) for chunk, error in zip(chunks, pool.map(send, chunks), strict=True) if error]
        if not failures:
            return
        reason = for_callers(failures[0][1], f"queueing chunks of batch {batch.id}")
        for chunk, _ in failures:
            self._fail_pending(batch.id, chunk, "not-queued", f"the chunk could not be queued: {reason.message}")
        unsent = ", ".join(str(chunk) for chunk, _ in failures[:10]) + (" ..." if len(failures) > 10 else "")
        raise BackendUnavailable(
            f"batch {batch.id}: its items are stored, but {len(failures)} of its {len(chunks)} chunks could not be "
            f"queued (chunks {unsent}) and their items failed ({reason.message}); submit those items again",
            "batch-not-queued",
        )

    def resume_batches(self, *, last_first: bool = False) -> int:
        """Queue again every chunk with a pending item (an embedded server's in-process queue is lost with
        its process): returns how many. A chunk still queued elsewhere is then delivered twice, harmlessly
        (DESIGN "Batches"). `last_first` queues them from the newest batch's last chunk back, for when
        living processes are still signing some of them from the first chunk on (`serve --workers` after
        one died): the two meet in the middle of such a batch, and only a chunk they happen to reach at
        the same moment is signed twice; the rest are found finished and left alone."""
        chunks = self.ledger.unfinished_chunks()
        for batch_id, chunk in reversed(chunks) if last_first else chunks:
            self.batch_queue.send(ChunkMessage(batchId=batch_id, chunk=chunk).text())
        return len(chunks)

    # -- the queue handlers ------------------------------------------------------------------------------

    def sign_batch_chunk(self, message: str | bytes) -> ChunkOutcome:
        """Sign one chunk's pending items and record their results (the queue-triggered function).

        Raises, so that the message is delivered again, when a failure may pass: a backend unavailable or an
        unexpected error (the chunk keeps its words for the poison handler); the items that finished are
        recorded first. A refusal of the whole chunk
        (the intermediate disabled since, the factory no longer bound to it) fails each item with it. A
        message that names no stored chunk raises CaError (400 "invalid-message" or 404)."""
        chunk = ChunkMessage.read(message)
        batch = self._stored_batch(chunk.batchId)
        state, items = self.ledger.chunk_items(batch.id, chunk.chunk)
        pending = [item for item in items if item.status not in (ITEM_ISSUED, ITEM_FAILED)]
        if not pending:
            return ChunkOutcome(batch.id, chunk.chunk, already_finished=True)
        self.ledger.start_chunk(batch.id, chunk.chunk, self._now())
        try:
            results = self._sign_items(batch, pending)
        except CaError as error:
            if error.status >= 500:
                self._note_failure(batch.id, chunk.chunk, error)
                raise
            results = [error] * len(pending)
        except Exception as error:
            failure = unexpected(error, f"signing chunk {chunk.chunk} of batch {batch.id}")
            self._note_failure(batch.id, chunk.chunk, failure)
            raise failure from None
        finished = self._with_committed(
            batch,
            [
                _finished(item, result)
                for item, result in zip(pending, results, strict=True)
                if not (isinstance(result, CaError) and result.status >= 500)
            ],
        )
        # Recorded before a transient failure is raised: a certificate committed by this delivery is the
        # item's result even if every later delivery fails and the poison handler fails the rest.
        recorded = self.ledger.finish_chunk_items(batch.id, chunk.chunk, finished, self._now()) if finished else 0
        transient = [r for r in results if isinstance(r, CaError) and r.status >= 500]
        if transient:
            self._note_failure(batch.id, chunk.chunk, transient[0])
            raise transient[0]
        issued = sum(isinstance(r, IssuedCertificate) and r.created for r in results)
        log.info(
            "batch %s chunk %d: %d items recorded (attempt %d)", batch.id, chunk.chunk, recorded, state.attempts + 1
        )
        return ChunkOutcome(batch.id, chunk.chunk, recorded=recorded, issued=issued)

    def fail_batch_chunk(self, message: str | bytes) -> ChunkOutcome:
        """The poison handler: fail the unfinished items of a chunk whose deliveries all failed, with the
        last failure's words. Items with a result keep it."""
        chunk = ChunkMessage.read(message)
        batch = self._stored_batch(chunk.batchId)
        state, _ = self.ledger.chunk_items(batch.id, chunk.chunk)
        reason = (
            f"signing failed on every delivery of this item's chunk ({state.attempts}); the last failure: "
            f"{state.last_error or 'not recorded'}. Submitting the item again is safe: a certificate already "
            "issued for the same CSR is given back, never a second one"
        )
        recorded = self._fail_pending(batch.id, chunk.chunk, "chunk-failed", reason)
        log.warning("batch %s chunk %d failed after %d deliveries", batch.id, chunk.chunk, state.attempts)
        return ChunkOutcome(batch.id, chunk.chunk, recorded=recorded)

    def cancel_batch(self, batch_id: str, reason: str) -> int:
        """Fail every unfinished item of a batch ("batch-cancelled", with `reason`), as a caller that signs
        its chunks itself does when it stops; returns how many. Items with a result keep it."""
        batch = self._stored_batch(batch_id)
        return sum(self._fail_pending(batch.id, chunk, "batch-cancelled", reason) for chunk in range(batch.chunks))

    def _fail_pending(self, batch_id: str, chunk: int, code: str, message: str) -> int:
        _, items = self.ledger.chunk_items(batch_id, chunk)
        failed = [_failed_item(item, code, message) for item in items if item.status not in (ITEM_ISSUED, ITEM_FAILED)]
        if failed and code == "chunk-failed":
            failed = self._with_committed(self._stored_batch(batch_id), failed)
        return self.ledger.finish_chunk_items(batch_id, chunk, failed, self._now())

    def _with_committed(self, batch: BatchRecord, finished: list[BatchItem]) -> list[BatchItem]:
        """`finished`, with each failed item whose certificate an earlier delivery committed but could not
        record (it stopped between the two writes) given that certificate instead: the device's active
        certificate, for the item's key, signed by the batch's intermediate for its submitter since the
        batch was submitted. So neither a later refusal of the whole chunk (a factory unbound since) nor
        the poison handler calls failed an item whose certificate the ledger holds."""
        keys: dict[int, str] = {}
        for item in finished:
            if item.status == ITEM_FAILED and item.csr:
                with suppress(CaError, PkiError):  # a CSR the policy refuses was never signed
                    keys[item.index] = check_device_csr(item.csr, item.device_id).public_key_sha256
        if not keys:
            return finished
        actives = self.ledger.active_certificates(sorted({i.device_id for i in finished if i.index in keys}))

        def committed(item: BatchItem) -> CertificateRecord | None:
            record = actives.get(item.device_id)
            if (
                item.index not in keys
                or record is None
                or record.public_key_sha256 != keys[item.index]
                or record.requested_by != batch.requested_by
                or record.intermediate_id != batch.intermediate_id
                or record.created_at < batch.created_at
            ):
                return None
            return record

        return [item if (record := committed(item)) is None else _finished_with(item, record) for item in finished]

    def _note_failure(self, batch_id: str, chunk: int, error: CaError) -> None:
        public = for_callers(error, f"signing chunk {chunk} of batch {batch_id}")
        with suppress(CaError):  # the ledger itself is away: the poison handler says no reason was recorded
            self.ledger.note_chunk_failure(batch_id, chunk, f"{public.code}: {public.message}")

    def _sign_items(self, batch: BatchRecord, pending: list[BatchItem]) -> list[IssuedCertificate | CaError]:
        """The chunk through the use case of one CSR, with the submitter's rights as they are now: a factory's
        current binding (none, if it is gone), so that unbinding a factory stops its queued batches too."""
        allowed: tuple[str, ...] | None = None
        if batch.allowed_intermediates is not None:
            principal = self.ledger.get_principal(batch.requested_by)
            allowed = principal.intermediates if principal is not None and principal.role == FACTORY else ()
        return self.sign_csrs(
            [SignRequest(item.csr, item.device_id) for item in pending],
            intermediate_id=batch.intermediate_id,
            requested_by=batch.requested_by,
            allowed_intermediates=allowed,
        )

    # -- reading -------------------------------------------------------------------------------------

    def batch(self, batch_id: str, reader: str | None = None) -> BatchSummary:
        """A batch and its progress. `reader` is the caller (None: an admin, who reads every batch); a batch
        another caller submitted is NotFound, as one that does not exist."""
        summary = self.ledger.get_batch(batch_id) if _BATCH_ID.fullmatch(batch_id) else None
        if summary is None or (reader is not None and summary.record.requested_by != reader):
            raise NotFound(f"no batch with ID {batch_id!r}", "batch-not-found")
        return summary

    def batch_results(
        self, batch_id: str, reader: str | None = None, limit: int = parameters.DEFAULT_PAGE, cursor: str | None = None
    ) -> BatchResults:
        """A batch and a page of its items' results, in submission order; `cursor` is a previous page's
        `next_cursor` (CaError "invalid-cursor" otherwise)."""
        parameters.page_limit(limit)
        start = 0
        if cursor is not None:
            parameters.cursor(cursor)
            if not cursor.isdigit() or len(cursor) > 6:
                raise invalid_cursor()
            start = int(cursor)
        summary = self.batch(batch_id, reader)
        items = self.ledger.batch_items(summary.record.id, start, limit)
        intermediates: dict[str, Any] = {}
        results = [self._result(item, intermediates) for item in items]
        following = start + limit
        return BatchResults(summary, results, str(following) if following < summary.record.total else None)

    def _result(self, item: BatchItem, intermediates: dict[str, Any]) -> BatchResult:
        if item.status == ITEM_ISSUED and item.certificate is not None:
            record = item.certificate
            if record.intermediate_id not in intermediates:
                intermediates[record.intermediate_id] = self.intermediate(record.intermediate_id)
            issued = IssuedCertificate(
                record=record,
                intermediate_pem=intermediates[record.intermediate_id].certificate_pem,
                created=item.created,
                warnings=item.warnings,
                dps=self.dps.registration_info(record.device_id),
            )
            return BatchResult(item.index, item.device_id, item.status, issued=issued)
        if item.status == ITEM_FAILED:
            error = (item.error_code or "failed", item.error_message or "")
            return BatchResult(item.index, item.device_id, item.status, error=error)
        return BatchResult(item.index, item.device_id, item.status)

    def batches(
        self, reader: str | None = None, limit: int = parameters.DEFAULT_PAGE, cursor: str | None = None
    ) -> BatchPage:
        """A page of batches in the order they were accepted: the reader's own (None: an admin, every batch)."""
        parameters.page_limit(limit)
        if cursor is not None:
            parameters.cursor(cursor)
        return self.ledger.list_batches(reader, limit, cursor)

    def _stored_batch(self, batch_id: str) -> BatchRecord:
        summary = self.ledger.get_batch(batch_id)
        if summary is None:
            raise NotFound(
                f"the queue message names batch {batch_id}, which the ledger does not hold", "batch-not-found"
            )
        return summary.record


def _batch_item(batch: BatchRecord, index: int, raw: Any, line: int | None = None) -> BatchItem:
    """An item as stored: pending, or failed with what is wrong with it ("invalid-item"), named by its line
    in a JSON Lines body when `line` is given, else by its index."""
    problem = None
    device_id = csr = None
    if not isinstance(raw, Mapping):
        problem = "an item must be an object with deviceId and csr"
    else:
        device_id, csr = raw.get("deviceId"), raw.get("csr")
        unknown = sorted(set(raw) - {"deviceId", "csr"})
        if not isinstance(device_id, str) or not device_id:
            problem = "deviceId is missing or not a string"
        elif len(device_id) > MAX_ITEM_DEVICE_ID:
            problem = f"deviceId is longer than {MAX_ITEM_DEVICE_ID} characters"
        elif not parameters.unicode_text(device_id):
            problem = (
                "deviceId is not Unicode text: it holds a lone surrogate (such as \\ud800), which UTF-8 cannot encode"
            )
        elif not isinstance(csr, str) or not csr.strip():
            problem = "csr is missing or not a string (PEM)"
        elif len(csr) > MAX_ITEM_CSR:
            problem = f"csr is longer than {MAX_ITEM_CSR} characters"
        elif not _PEM_TEXT.fullmatch(csr):
            problem = "csr is not PEM text: it holds characters other than printable ASCII and line breaks"
        elif unknown:
            problem = f"unknown field(s): {', '.join(repr(name)[:40] for name in unknown[:3])}"
    shown = isinstance(device_id, str) and len(device_id) <= MAX_ITEM_DEVICE_ID and parameters.unicode_text(device_id)
    shown_id = shown_to_callers(device_id) if shown else ""  # an API key pasted as a device ID: not kept
    if problem is None:
        return BatchItem(batch.id, index, shown_id, csr)
    return BatchItem(
        batch.id,
        index,
        shown_id,
        "",
        ITEM_FAILED,
        error_code="invalid-item",
        error_message=shown_to_callers(
            f"item {index}: {problem}" if line is None else line_problem(line, raw, problem)
        ),
        finished_at=batch.created_at,
    )


def _finished(item: BatchItem, result: IssuedCertificate | CaError) -> BatchItem:
    if isinstance(result, IssuedCertificate):
        return BatchItem(
            item.batch_id,
            item.index,
            item.device_id,
            item.csr,
            ITEM_ISSUED,
            certificate=result.record,
            created=result.created,
            warnings=result.warnings,
        )
    return _failed_item(item, result.code, _item_words(item, result))


def _item_words(item: BatchItem, error: CaError) -> str:
    """An item's failure in words true of a batch item: the CSR parser's "the body ..." is the item's csr
    (shared/pki speaks of a request body), and a device that already has a certificate is renewed alone,
    since a batch does not renew (shared/ledger's words name renew=true and --renew, which batches lack)."""
    message = error.message
    if message.startswith("the body "):
        message = "the item's csr " + message.removeprefix("the body ")
    if error.code == "device-has-certificate":
        message = (
            message.split("; ask for renewal", 1)[0] + "; a batch does not renew: renew this device alone with "
            f"POST /api/devices/{item.device_id}/certificate?renew=true, or python cli.py sign-csr CSR_FILE "
            f"--device-id {item.device_id} --renew"
        )
    return message


def _finished_with(item: BatchItem, record: CertificateRecord) -> BatchItem:
    """`item` issued with a certificate found in the ledger (not created by this delivery)."""
    return BatchItem(item.batch_id, item.index, item.device_id, item.csr, ITEM_ISSUED, certificate=record)


def _failed_item(item: BatchItem, code: str, message: str) -> BatchItem:
    """`item` failed: its message kept as callers may be shown it (shared.errors.shown_to_callers: an API key
    pasted as a device ID is stored and answered without its secret)."""
    return BatchItem(
        item.batch_id,
        item.index,
        item.device_id,
        item.csr,
        ITEM_FAILED,
        error_code=code,
        error_message=shown_to_callers(message),
    )
