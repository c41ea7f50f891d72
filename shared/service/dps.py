"""Use cases of DPS registration: an intermediate's enrollment group registered through a queue (so a DPS
outage delays it instead of losing it), its state on the CA record, and the retry.

An intermediate's DPS state (`CaRecord.dps`, kept with the ledger's `set_ca_dps`) is one of:
- `pending`: queued, not yet in DPS (`lastError` says why the last attempt failed, if one did);
- `registered`: the enrollment group exists with the provisioning status of the intermediate;
- `failed`: DPS refused it, or every delivery of its message failed (`error`); `retry-dps` queues it again.

With the offline adapter the group document is recorded at once, as before. Mixed into `DeviceCA`.
"""

import json
import logging
from collections.abc import Callable
from typing import Any

from ..errors import BackendUnavailable, CaError
from ..ledger.models import CA_ACTIVE, CaRecord

LOG = logging.getLogger("device_ca.dps")

# A queued registration's message: {"intermediateId": "<id>"} (an ID, never a certificate).
MESSAGE_FIELD = "intermediateId"


def registration_message(ca_id: str) -> str:
    """The queue message that asks for the registration of intermediate `ca_id`."""
    return json.dumps({MESSAGE_FIELD: ca_id})


def read_registration_message(text: str) -> str:
    """The intermediate ID of a registration message. CaError "invalid-message" for anything else."""
    try:
        document = json.loads(text)
        ca_id = document[MESSAGE_FIELD]
    except (ValueError, TypeError, KeyError):
        raise CaError('a DPS registration message must be JSON {"intermediateId": ...}', "invalid-message") from None
    if not isinstance(ca_id, str) or not ca_id:
        raise CaError("a DPS registration message must name an intermediate", "invalid-message")
    return ca_id


class DpsUseCases:
    dps_registrations: Any = None  # a MessageQueue (shared/queues.py) when Storage queues are configured

    def _register_new_intermediate(self, record: CaRecord) -> tuple[CaRecord, tuple[str, ...]]:
        """After an intermediate is in the ledger: register its enrollment group through the queue when
        there is one (state `pending`), else at once. Returns the record and what to tell the caller. The
        creation stands whatever happens here: a step that fails (the ledger unavailable as the state is
        recorded) is a warning naming retry-dps, not an error whose retry would meet ca-exists."""
        try:
            if self.dps.configured and self.dps_registrations is not None:
                return self._queue_registration(record.id)
            record = self.register_intermediate(record.id, inline=True)
        except CaError as error:
            return record, (
                f"intermediate {record.id} is created, but its DPS registration was not recorded ({error.code}); "
                f"run retry-dps {record.id}",
            )
        return record, _registration_warnings(record.dps)

    def _queue_registration(self, ca_id: str) -> tuple[CaRecord, tuple[str, ...]]:
        record = self.ledger.set_ca_dps(ca_id, {"mode": "azure", "state": "pending", "enrollmentGroupId": ca_id})
        try:
            self.dps_registrations.send(registration_message(ca_id))
        except CaError as error:
            failed = {**record.dps, "state": "failed", "error": error.message}
            record = self.ledger.set_ca_dps(ca_id, failed)
            return record, (f"the DPS registration could not be queued ({error.code}); run retry-dps {ca_id}",)
        note = (
            f"the enrollment group of {ca_id} is queued for DPS (state pending); "
            "list-intermediates shows when it is registered"
        )
        return record, (note,)

    def register_intermediate(self, ca_id: str, inline: bool = False) -> CaRecord:
        """Create or update intermediate `ca_id`'s enrollment group (enabled as the intermediate is) and
        record the state. DPS refusing it (the 100-group limit, say) is permanent: state `failed`, nothing
        raised. DPS unavailable: state stays `pending` with `lastError`, and the error is raised so that
        the queue delivers the message again; `inline` (no queue) records `failed` instead and returns.
        Anything unexpected is raised as it is (the queue delivers the message again)."""
        record = self.intermediate(ca_id)
        try:
            state = self.dps.put_enrollment_group(ca_id, record.certificate_pem, enabled=self._enabled_now(ca_id))
        except BackendUnavailable as error:
            if inline:
                return self._registration_failed(record, error.message)
            attempts = int(record.dps.get("attempts", 0)) + 1
            self.ledger.set_ca_dps(
                ca_id, {**record.dps, "state": "pending", "lastError": error.message, "attempts": attempts}
            )
            raise
        except CaError as error:
            return self._registration_failed(record, error.message)
        return self.ledger.set_ca_dps(ca_id, state)

    def _enabled_now(self, ca_id: str) -> Callable[[], bool]:
        """Whether intermediate `ca_id` is active, read from the ledger when asked: the DPS adapter asks after
        reading the group's etag, so a disable committed meanwhile by another process is never undone."""
        return lambda: self.intermediate(ca_id).status == CA_ACTIVE

    def dps_registration_failed(self, ca_id: str) -> CaRecord:
        """Every delivery of `ca_id`'s registration failed (its message is poisoned): state `failed` with
        the last error DPS gave. A registration that meanwhile succeeded stays as it is."""
        record = self.intermediate(ca_id)
        if record.dps.get("state") == "registered":
            return record
        return self._registration_failed(record, record.dps.get("lastError") or "every delivery of its message failed")

    def retry_dps(self, ca_id: str) -> tuple[CaRecord, tuple[str, ...]]:
        """Register intermediate `ca_id` with DPS again: queued when there is a queue, else at once."""
        record = self.intermediate(ca_id)
        if self.dps.configured and self.dps_registrations is not None:
            return self._queue_registration(record.id)
        record = self.register_intermediate(record.id, inline=True)
        return record, _registration_warnings(record.dps)

    def _registration_failed(self, record: CaRecord, message: str) -> CaRecord:
        state = {
            "mode": "azure",
            "state": "failed",
            "enrollmentGroupId": record.id,
            "error": message,
            "message": f"DPS did not register intermediate {record.id}: {message}; run retry-dps {record.id}",
        }
        return self.ledger.set_ca_dps(record.id, state)

    def handle_dps_registration(self, text: str) -> CaRecord | None:
        """The queue-triggered function's work: one message. Raises (so the host delivers it again) while
        DPS is unavailable. A message that can never succeed (not a registration, or naming no intermediate:
        an unknown ID, the root) is logged and dropped (None) instead of failing every delivery into poison."""
        try:
            ca_id = read_registration_message(text)
            self.intermediate(ca_id)
        except CaError as error:
            if error.code not in ("invalid-message", "intermediate-not-found"):
                raise
            LOG.warning("DPS registration message dropped: %s", error.message)
            return None
        return self.register_intermediate(ca_id)

    def handle_dps_registration_poisoned(self, text: str) -> CaRecord | None:
        """The poison queue's function: the intermediate is marked `failed`. A message that is not a
        registration, or names no intermediate, is dropped (None): there is nothing to mark."""
        try:
            return self.dps_registration_failed(read_registration_message(text))
        except CaError:
            return None


def _registration_warnings(state: dict[str, Any]) -> tuple[str, ...]:
    """What the caller is told of a registration made at once: offline or failed, its message."""
    if state.get("mode") in ("offline",) or state.get("state") == "failed":
        return (state["message"],) if state.get("message") else ()
    return ()
