"""The expiry timer as the Functions host sees it: indexed from function_app.py with its schedule, invoked
through the registered function, its notices read back from Azurite's Queue service."""

import json
from dataclasses import replace

import pytest
from azure.functions.timer import TimerRequest
from fastapi.testclient import TestClient

from shared.composition import build_service
from shared.config import Settings
from shared.errors import Misconfigured
from shared.queues import EXPIRING_CERTIFICATES, storage_queue

from .conftest import reload_function_app, settings_environment
from .csrs import make_csr


@pytest.fixture
def timer_app(tmp_path, monkeypatch, queue_settings, ledger_settings):
    """function_app imported fresh on a CA whose intermediate ends in two days (a device signed by it too),
    with QUEUE_STORAGE naming Azurite; returns (module, queue, serials by subject)."""
    home = tmp_path / "pki"
    settings = replace(Settings(pki_home=home), **ledger_settings)
    environment = {"PKI_HOME": str(home), **queue_settings, **settings_environment(settings)}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("EXPIRY_SCAN_SCHEDULE", raising=False)
    monkeypatch.chdir(tmp_path)  # no developer's local.settings.json
    queue = storage_queue(Settings.from_values(queue_settings), EXPIRING_CERTIFICATES)
    queue._ensure_created()
    queue._client.clear_messages()  # the queue's name is the app's: other tests may have used it
    ca = build_service(settings)
    ca.create_root()
    intermediate = ca.create_intermediate("short", days=2).record
    device = ca.sign_csr(make_csr("dev-timer"), "dev-timer").record
    ca.close()
    return reload_function_app(), queue, {"short": intermediate.serial, "dev-timer": device.serial}


def _timer(module):
    (timer,) = [f for f in module.app.get_functions() if f.get_trigger().get_binding_name() == "timerTrigger"]
    return timer


def test_the_timer_is_indexed_daily_and_its_notices_reach_the_queue(timer_app):
    module, queue, serials = timer_app
    timer = _timer(module)
    assert timer.get_function_name() == "expiry_scan"
    trigger = timer.get_trigger()
    assert trigger.schedule == "0 0 6 * * *" and trigger.run_on_startup is False and trigger.use_monitor is True

    timer.get_user_function()(TimerRequest(past_due=False))
    messages = [json.loads(m.content) for m in queue.receive()]
    assert sorted((m["kind"], m["serial"], m["stage"]) for m in messages) == [
        ("device", serials["dev-timer"], "7d"),
        ("intermediate", serials["short"], "7d"),
    ]
    device = next(m for m in messages if m["kind"] == "device")
    assert device["deviceId"] == "dev-timer" and device["ownerFactory"] is None
    intermediate = next(m for m in messages if m["kind"] == "intermediate")
    assert intermediate["caId"] == "short" and "create its successor" in intermediate["action"]
    for message in queue.receive(visibility_timeout=1):
        queue.delete(message)

    # the next run (past due, say) has nothing new to say
    timer.get_user_function()(TimerRequest(past_due=True))
    assert queue.receive() == []


def test_the_schedule_comes_from_its_setting_when_given(timer_app, monkeypatch):
    monkeypatch.setenv("EXPIRY_SCAN_SCHEDULE", "0 30 2 * * 1-5")
    module = reload_function_app()
    assert _timer(module).get_trigger().schedule == "%EXPIRY_SCAN_SCHEDULE%"
    assert module.expiry_schedule({}) == module.expiry_schedule({"EXPIRY_SCAN_SCHEDULE": ""}) == "0 0 6 * * *"


def test_a_wrong_setting_leaves_the_app_indexed_and_the_api_says_it_is_misconfigured(timer_app, monkeypatch, caplog):
    """A setting the service refuses (a schedule that is not NCRONTAB, a threshold of 0 days) must not stop
    function_app from being imported: the host would then index none of its functions and answer every
    request without a word. The API's health says degraded, and the log names the setting."""
    monkeypatch.setenv("EXPIRY_SCAN_SCHEDULE", "@daily")
    module = reload_function_app()
    assert _timer(module).get_trigger().schedule == "%EXPIRY_SCAN_SCHEDULE%"  # the host reads and refuses it
    with TestClient(module.api) as client:
        health = client.get("/api/health")
        listing = client.get("/api/certificates", headers={"Authorization": "Bearer dca_x.y"})
    assert health.status_code == 503 and health.json() == {"status": "degraded"}
    assert listing.status_code == 500 and listing.json()["error"]["code"] == "invalid-setting"
    assert "@daily" not in listing.text  # the caller learns an error ID; the log has the setting
    assert "EXPIRY_SCAN_SCHEDULE='@daily' must be an NCRONTAB expression" in caplog.text
    monkeypatch.setenv("EXPIRY_SCAN_SCHEDULE", "0 0 6 * * *")
    monkeypatch.setenv("EXPIRY_DEVICE_DAYS", "0")
    module = reload_function_app()
    assert _timer(module).get_trigger().schedule == "%EXPIRY_SCAN_SCHEDULE%"


def test_a_schedule_that_is_not_ncrontab_is_refused():
    assert Settings.from_values({"EXPIRY_SCAN_SCHEDULE": "0 0 6 * * *"}).expiry_scan_schedule == "0 0 6 * * *"
    with pytest.raises(Misconfigured, match="EXPIRY_SCAN_SCHEDULE='@daily' must be an NCRONTAB expression"):
        Settings.from_values({"EXPIRY_SCAN_SCHEDULE": "@daily"})
    for wrong, problem in (
        ("0 0 25 * * *", "the hour field '25' is not within 0-23"),
        ("0 0 6 32 * *", "the day field '32' is not within 1-31"),
        ("0 0 6 * 13 *", "the month field '13' is not within 1-12"),
        ("0 0 6 * * 7", "the day-of-week field '7' is not within 0-6"),
        ("0 60 6 * * *", "the minute field '60' is not within 0-59"),
        ("0 */0 6 * * *", "the minute field's step '0' is not a number from 1 to 59"),
        ("0 0 6 * * MON-XYZ", "the day-of-week field 'MON-XYZ' is not within 0-6"),
        ("0 0 6 * *", "it has 5"),
    ):
        with pytest.raises(Misconfigured) as refused:
            Settings.from_values({"EXPIRY_SCAN_SCHEDULE": wrong})
        assert refused.value.message.endswith(f"(second minute hour day month day-of-week): {problem}"), wrong
    for right in ("0 30 2 * * 1-5", "0 */5 * * * *", "0 0 6 * * MON-FRI", "0 0 6 1 JAN,jul *", "0 0,30 6-18/2 * * *"):
        assert Settings.from_values({"EXPIRY_SCAN_SCHEDULE": right}).expiry_scan_schedule == right
    with pytest.raises(Misconfigured, match="EXPIRY_DEVICE_DAYS"):
        Settings.from_values({"EXPIRY_DEVICE_DAYS": "0"})
    thresholds = Settings.from_values({"EXPIRY_DEVICE_DAYS": "14", "EXPIRY_ROOT_DAYS": "730"})
    assert (thresholds.expiry_device_days, thresholds.expiry_intermediate_days, thresholds.expiry_root_days) == (
        14,
        90,
        730,
    )
