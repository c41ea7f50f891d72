"""The queue-triggered functions of batches (DESIGN "Batches"), as a Blueprint that function_app.py
registers on its app: each is a few lines that call the service's chunk handlers.

A function that raises leaves its message to the Functions host, which delivers it again after host.json's
`visibilityTimeout` and, after `maxDequeueCount` deliveries, moves it to `<queue>-poison`. So what may pass
(Key Vault or Storage unavailable, an unexpected error: status 500 and up) is raised; a message that can
never be signed (not this app's, or naming nothing in the ledger) is logged and dropped.
"""

import logging
from collections.abc import Callable

import azure.functions as func

from .errors import CaError
from .queues import BATCH_CHUNKS, CONNECTION_SETTING, poison_queue
from .service import DeviceCA

log = logging.getLogger("device_ca.functions")


def batch_functions(service: Callable[[], DeviceCA]) -> func.Blueprint:
    """The batch queue functions on the service that `service()` gives (the HTTP API's, so one per process)."""
    blueprint = func.Blueprint()

    @blueprint.queue_trigger(arg_name="message", queue_name=BATCH_CHUNKS, connection=CONNECTION_SETTING)
    def sign_batch_chunk(message: func.QueueMessage) -> None:
        """Sign the chunk a message names and record its items' results."""
        _unless_unsignable(message, lambda: service().sign_batch_chunk(message.get_body()))

    @blueprint.queue_trigger(arg_name="message", queue_name=poison_queue(BATCH_CHUNKS), connection=CONNECTION_SETTING)
    def fail_batch_chunk(message: func.QueueMessage) -> None:
        """A chunk whose every delivery failed: its unfinished items fail, with the last failure's words."""
        _unless_unsignable(message, lambda: service().fail_batch_chunk(message.get_body()))

    return blueprint


def _unless_unsignable(message: func.QueueMessage, handle: Callable[[], object]) -> None:
    try:
        handle()
    except CaError as error:
        if error.status >= 500:
            raise
        log.warning("queue message %s dropped: %s (%s)", message.id, error.message, error.code)
