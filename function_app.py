"""The Azure Functions (Python v2) entry point: the HTTP API as one ASGI function, and on the same app and
the same service the batch queue's functions (shared/batch_functions.py), the DPS registration queue's
functions and the expiry timer.

The auth level is anonymous because the API checks every caller itself (API keys, or App Service
authentication with PKI_AUTH=easyauth); a function key on top would be a second shared secret to hand
to every factory. host.json sets the route prefix to "" since the API's routes carry /api themselves.
"""

import logging
import os
from collections.abc import Mapping

import azure.functions as func

from shared.api import create_app
from shared.batch_functions import batch_functions
from shared.composition import build_service
from shared.queues import CONNECTION_SETTING, DPS_REGISTRATIONS, poison_queue

api = create_app()
app = func.AsgiFunctionApp(app=api, http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(batch_functions(api.state.service))


# -- DPS registrations (issue 12) ----------------------------------------------------------------------
# An intermediate's enrollment group is registered from a queue message, so that a DPS outage delays it
# instead of losing it: a failed delivery raises, the host delivers it again (host.json maxDequeueCount),
# and the message that keeps failing lands on the poison queue, whose function marks the intermediate
# `failed` with DPS's last error (`retry-dps` queues it again).


def queue_service():
    """The service the queue-triggered functions share with the HTTP API, built at first use."""
    return api.state.service()


@app.queue_trigger(arg_name="message", queue_name=DPS_REGISTRATIONS, connection=CONNECTION_SETTING)
def dps_registration(message: func.QueueMessage) -> None:
    """Register one intermediate's enrollment group; raises while DPS is unavailable (delivered again)."""
    queue_service().handle_dps_registration(message.get_body().decode())


@app.queue_trigger(arg_name="message", queue_name=poison_queue(DPS_REGISTRATIONS), connection=CONNECTION_SETTING)
def dps_registration_poisoned(message: func.QueueMessage) -> None:
    """A registration whose every delivery failed: the intermediate's DPS state becomes `failed`."""
    queue_service().handle_dps_registration_poisoned(message.get_body().decode())


# -- the expiry scan ---------------------------------------------------------------------------------------

EXPIRY_SCHEDULE_SETTING = "EXPIRY_SCAN_SCHEDULE"
EXPIRY_DAILY = "0 0 6 * * *"  # NCRONTAB (second minute hour day month weekday): every day at 06:00 UTC


def expiry_schedule(environ: Mapping[str, str] | None = None) -> str:
    """%EXPIRY_SCAN_SCHEDULE% when that app setting is given (the host reads the expression from it), else
    daily at 06:00: the host refuses a %SETTING% that is missing, so the default is written out here.

    Only that one setting is read, from the environment (`environ` stands in for it), and never checked:
    a wrong setting must not stop this module from being imported, or the host would index none of the
    app's functions. The service checks every setting when it is built (the API's 500 `invalid-setting`,
    /api/health's 503, the log naming the setting), and the host refuses a schedule it cannot read for
    the timer alone."""
    return (
        f"%{EXPIRY_SCHEDULE_SETTING}%"
        if (os.environ if environ is None else environ).get(EXPIRY_SCHEDULE_SETTING)
        else EXPIRY_DAILY
    )


@app.timer_trigger(schedule=expiry_schedule(), arg_name="timer", run_on_startup=False, use_monitor=True)
def expiry_scan(timer: func.TimerRequest) -> None:
    """Scan for certificates nearing their end and announce each new stage once (shared/service/expiry.py).
    A run whose notices could not all be sent fails (the host records it); their stages wait for the next."""
    service = build_service()
    try:
        report = service.scan_expiring()
    finally:
        service.close()
    logging.getLogger("device_ca.expiry").info(
        "expiry scan%s: %d finding(s), %d announced, %d failed",
        " (past due)" if timer.past_due else "",
        len(report.findings),
        len(report.announced),
        len(report.failures),
    )
    if report.failures:
        raise RuntimeError(f"{len(report.failures)} expiry notice(s) not sent: {'; '.join(report.failures)}")
