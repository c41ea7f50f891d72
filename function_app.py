"""The Azure Functions (Python v2) entry point: the HTTP API as one ASGI function.

The auth level is anonymous because the API checks every caller itself (API keys, or App Service
authentication with PKI_AUTH=easyauth); a function key on top would be a second shared secret to hand
to every factory. host.json sets the route prefix to "" since the API's routes carry /api themselves.
"""

import azure.functions as func

from shared.api import create_app

app = func.AsgiFunctionApp(app=create_app(), http_auth_level=func.AuthLevel.ANONYMOUS)


# -- DPS registrations (issue 12) ----------------------------------------------------------------------
# An intermediate's enrollment group is registered from a queue message, so that a DPS outage delays it
# instead of losing it: a failed delivery raises, the host delivers it again (host.json maxDequeueCount),
# and the message that keeps failing lands on the poison queue, whose function marks the intermediate
# `failed` with DPS's last error (`retry-dps` queues it again).

import threading  # noqa: E402

from shared.composition import build_service  # noqa: E402
from shared.queues import CONNECTION_SETTING, DPS_REGISTRATIONS, poison_queue  # noqa: E402

_queue_service: list = []
_queue_service_lock = threading.Lock()


def queue_service():
    """The service the queue-triggered functions share, built from the settings at first use."""
    with _queue_service_lock:
        if not _queue_service:
            _queue_service.append(build_service())
        return _queue_service[0]


@app.queue_trigger(arg_name="message", queue_name=DPS_REGISTRATIONS, connection=CONNECTION_SETTING)
def dps_registration(message: func.QueueMessage) -> None:
    """Register one intermediate's enrollment group; raises while DPS is unavailable (delivered again)."""
    queue_service().handle_dps_registration(message.get_body().decode())


@app.queue_trigger(arg_name="message", queue_name=poison_queue(DPS_REGISTRATIONS), connection=CONNECTION_SETTING)
def dps_registration_poisoned(message: func.QueueMessage) -> None:
    """A registration whose every delivery failed: the intermediate's DPS state becomes `failed`."""
    queue_service().handle_dps_registration_poisoned(message.get_body().decode())
