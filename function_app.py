"""The Azure Functions (Python v2) entry point: the HTTP API as one ASGI function, and the queue functions.

The auth level is anonymous because the API checks every caller itself (API keys, or App Service
authentication with PKI_AUTH=easyauth); a function key on top would be a second shared secret to hand
to every factory. host.json sets the route prefix to "" since the API's routes carry /api themselves.
"""

import logging

import azure.functions as func

from shared.api import create_app
from shared.errors import CaError
from shared.queues import BATCH_CHUNKS, CONNECTION_SETTING, poison_queue

api = create_app()
app = func.AsgiFunctionApp(app=api, http_auth_level=func.AuthLevel.ANONYMOUS)
log = logging.getLogger("device_ca.functions")


# -- batches (DESIGN "Batches") ------------------------------------------------------------------------


@app.queue_trigger(arg_name="message", queue_name=BATCH_CHUNKS, connection=CONNECTION_SETTING)
def sign_batch_chunk(message: func.QueueMessage) -> None:
    """Sign the chunk a message names. What may pass (Key Vault or Storage unavailable) raises: the host
    delivers the message again, and after maxDequeueCount (host.json) moves it to the poison queue."""
    try:
        api.state.service().sign_batch_chunk(message.get_body())
    except CaError as error:
        if error.status >= 500:
            raise
        log.warning("batch chunk message %s dropped: %s", message.id, error.message)  # never signable


@app.queue_trigger(arg_name="message", queue_name=poison_queue(BATCH_CHUNKS), connection=CONNECTION_SETTING)
def fail_batch_chunk(message: func.QueueMessage) -> None:
    """A chunk whose every delivery failed: its unfinished items fail, with the last failure's words."""
    try:
        api.state.service().fail_batch_chunk(message.get_body())
    except CaError as error:
        if error.status >= 500:
            raise
        log.warning("poison batch chunk message %s dropped: %s", message.id, error.message)
