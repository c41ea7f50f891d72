"""The expiry scan (shared/service/expiry.py), on both ledgers, with the clock moved by hand."""

import json
import logging
import threading
from datetime import timedelta

import pytest

from shared.ledger.models import CERT_ACTIVE, CERT_EXPIRED, CERT_REVOKED, CERT_SUPERSEDED, CertificateQuery
from shared.parameters import InvalidParameter
from shared.queues import InProcessQueue
from shared.service.expiry import ExpiryThresholds, stage_of, stages

from .csrs import device_key, make_csr
from .fakes.queues import QueueDown


def _messages(service) -> list[dict]:
    queue = service.expiry_queue
    assert isinstance(queue, InProcessQueue)
    taken = []
    while (text := queue.take()) is not None:
        taken.append(json.loads(text))
    return taken


def _device(service, device_id: str, **options):
    return service.sign_csr(make_csr(device_id), device_id, **options).record


@pytest.mark.parametrize(
    ("days_left", "threshold", "stage"),
    [
        (31, 30, None),
        (30, 30, "30d"),
        (29.5, 30, "30d"),
        (7.5, 30, "30d"),
        (7, 30, "7d"),
        (1.01, 30, "7d"),
        (1, 30, "1d"),
        (0.001, 30, "1d"),
        (0, 30, "expired"),
        (-3, 30, "expired"),
        (91, 90, None),
        (60, 90, "90d"),
        (300, 365, "365d"),
        (45, 365, "90d"),
        (20, 10, None),
        (10, 10, "10d"),
        (3, 10, "7d"),
    ],
)
def test_stages(clock, days_left, threshold, stage):
    now = clock()
    assert stage_of(now + timedelta(days=days_left), now, threshold) == stage


def test_the_ladder_of_each_default_threshold():
    assert stages(30) == (30, 7, 1)
    assert stages(90) == (90, 30, 7, 1)
    assert stages(365) == (365, 90, 30, 7, 1)


def test_nothing_is_found_in_a_young_fleet(service):
    _device(service, "dev-1")
    report = service.scan_expiring()
    assert report.findings == () and not report.expiring and _messages(service) == []


def test_a_device_certificate_is_announced_once_per_stage(service, clock, caplog):
    record = _device(service, "dev-1")
    owner = service.principals.create_factory("line-1", ["factory-a"])
    factory_record = service.sign_csr(
        make_csr("dev-2"), "dev-2", requested_by="line-1", allowed_intermediates=["factory-a"]
    ).record
    assert owner.principal.id == "line-1"

    clock.now = record.not_after - timedelta(days=20)
    with caplog.at_level(logging.WARNING, logger="device_ca.expiry"):
        first = service.scan_expiring()
    assert [(f.subject, f.stage, f.announced) for f in first.findings] == [
        ("dev-1", "30d", True),
        ("dev-2", "30d", True),
    ]
    messages = _messages(service)
    assert messages == [
        {
            "kind": "device",
            "serial": record.serial,
            "deviceId": "dev-1",
            "ownerFactory": None,  # the CLI's device: no factory owns it
            "notAfter": record.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "stage": "30d",
            "daysLeft": 20.0,
        },
        {
            "kind": "device",
            "serial": factory_record.serial,
            "deviceId": "dev-2",
            "ownerFactory": "line-1",
            "notAfter": factory_record.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "stage": "30d",
            "daysLeft": messages[1]["daysLeft"],
        },
    ]
    lines = [r for r in caplog.records if r.name == "device_ca.expiry"]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING]
    assert [r.expiry for r in lines] == messages
    assert json.loads(lines[0].getMessage().split(": ", 1)[1]) == messages[0]
    # a look reads the owners again; a repeat of an announced stage leaves them out rather than say None
    look = {f.subject: f.view() for f in service.scan_expiring(announce=False).findings}
    assert look["dev-2"]["ownerFactory"] == "line-1" and look["dev-1"]["ownerFactory"] is None
    repeat = {f.subject: f.view() for f in service.scan_expiring().findings}
    assert "ownerFactory" not in repeat["dev-2"] and not repeat["dev-2"]["announced"]

    # the same day again, and the day after: nothing new
    assert service.scan_expiring().announced == ()
    clock.advance(days=1)
    again = service.scan_expiring()
    assert again.announced == () and len(again.findings) == 2 and _messages(service) == []

    # into the next stages, one notice each
    clock.now = record.not_after - timedelta(days=6)
    service.scan_expiring()
    assert [m["stage"] for m in _messages(service)] == ["7d", "7d"]
    clock.now = record.not_after - timedelta(hours=12)
    service.scan_expiring()
    assert [m["stage"] for m in _messages(service)] == ["1d", "1d"]
    assert service.certificate(record.serial).status == CERT_ACTIVE


def test_an_expired_certificate_is_announced_and_gets_the_status_expired(service, clock):
    record = _device(service, "dev-1")
    clock.now = record.not_after + timedelta(days=2)  # no scan ran before: straight to expired
    report = service.scan_expiring()
    assert [(f.stage, f.announced, f.days_left) for f in report.findings] == [("expired", True, -2.0)]
    assert [m["stage"] for m in _messages(service)] == ["expired"]
    stored = service.certificate(record.serial)
    assert stored.status == CERT_EXPIRED and stored.status_changed_at == clock.now.replace(microsecond=0)
    assert service.ledger.active_certificates(["dev-1"]) == {}

    # no longer watched: never announced again, and the device gets a new certificate without renew
    clock.advance(days=1)
    assert service.scan_expiring().findings == () and _messages(service) == []
    renewed = service.sign_csr(make_csr("dev-1"), "dev-1").record
    assert renewed.status == CERT_ACTIVE
    assert service.certificate(record.serial).status == CERT_EXPIRED
    listed = service.certificates(CertificateQuery(status=CERT_EXPIRED))
    assert [c.serial for c in listed.items] == [record.serial]


def test_revoked_and_superseded_certificates_are_never_announced(service, clock):
    revoked = _device(service, "dev-revoked")
    service.revoke(revoked.serial)
    old = _device(service, "dev-renewed")
    clock.advance(days=300)
    renewed = service.sign_csr(make_csr("dev-renewed"), "dev-renewed", renew=True).record
    kept = _device(service, "dev-kept")  # issued now: ends a year later

    for days in (350, 360, 364.5, 366, 400):
        clock.now = revoked.not_after - timedelta(days=365 - days)
        report = service.scan_expiring()
        assert {f.serial for f in report.findings} <= {kept.serial, renewed.serial}, days
    assert all(m["serial"] not in (revoked.serial, old.serial) for m in _messages(service))
    assert service.certificate(old.serial).status == CERT_SUPERSEDED
    assert service.certificate(revoked.serial).status == CERT_REVOKED


def test_a_renewed_devices_old_certificate_is_not_announced_after_its_first_notice(service, clock):
    old = _device(service, "dev-1")
    clock.now = old.not_after - timedelta(days=20)
    service.scan_expiring()
    assert [m["serial"] for m in _messages(service)] == [old.serial]
    new = service.sign_csr(make_csr("dev-1"), "dev-1", renew=True).record
    for days_left in (6, 0.5, -1):
        clock.now = old.not_after - timedelta(days=days_left)
        assert [f.serial for f in service.scan_expiring().findings] == [], days_left
    assert _messages(service) == []
    assert service.certificate(old.serial).status == CERT_SUPERSEDED
    assert service.certificate(new.serial).status == CERT_ACTIVE


def test_two_scans_at_once_announce_each_finding_once(service, clock):
    records = [_device(service, f"dev-{i}") for i in range(12)]
    clock.now = records[-1].not_after - timedelta(days=3)
    barrier = threading.Barrier(4)
    reports = []

    def scan():
        barrier.wait()
        reports.append(service.scan_expiring())

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    messages = _messages(service)
    assert sorted(m["serial"] for m in messages) == sorted(r.serial for r in records)
    assert sum(len(r.announced) for r in reports) == 12
    assert all(not r.failures for r in reports)


def test_two_services_on_one_ledger_announce_each_finding_once(make_service, clock):
    first = make_service()
    first.create_root()
    first.create_intermediate("factory-a")
    records = [_device(first, f"dev-{i}") for i in range(8)]
    clock.now = records[-1].not_after - timedelta(days=3)
    other = _same_ledger(make_service, first)
    barrier = threading.Barrier(2)
    reports = {}

    def scan(name, ca):
        barrier.wait()
        reports[name] = ca.scan_expiring()

    threads = [threading.Thread(target=scan, args=(n, ca)) for n, ca in (("a", first), ("b", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    serials = [m["serial"] for m in _messages(first) + _messages(other)]
    assert sorted(serials) == sorted(r.serial for r in records)


def _same_ledger(make_service, service):
    """A second service (its own connections and clients) on the same ledger as `service`."""
    settings = service.settings
    if settings.ledger_tables:
        return make_service("pki", ledger_table_prefix=settings.ledger_table_prefix)
    return make_service("pki")


def test_a_notice_that_cannot_be_sent_is_sent_by_the_next_scan(service, clock):
    record = _device(service, "dev-1")
    clock.now = record.not_after - timedelta(days=5)

    working, service.expiry_queue = service.expiry_queue, QueueDown("expiring-certificates")
    report = service.scan_expiring()
    assert report.announced == ()
    assert report.failures == (
        f"device dev-1 ({record.serial}) at 7d: Queue Storage is unreachable: ServiceRequestError",
    )
    service.expiry_queue = working
    assert [f.stage for f in service.scan_expiring().announced] == ["7d"]
    assert [m["serial"] for m in _messages(service)] == [record.serial]


def test_intermediates_and_the_root_against_their_own_thresholds(make_service, clock):
    service = make_service()
    service.create_root(days=300)  # inside the root's 365 days
    service.create_intermediate("short", days=60)  # inside the intermediate's 90
    service.create_intermediate("long", days=200)
    service.principals.create_factory("line-1", ["short"])
    service.principals.create_factory("line-2", ["short", "long"])
    device = _device(service, "dev-1", intermediate_id="short")  # cut to the intermediate's end

    report = service.scan_expiring()
    found = {(f.kind, f.subject): f for f in report.findings}
    assert set(found) == {("root", "root"), ("intermediate", "short")}
    assert found["root", "root"].stage == "365d"
    short = found["intermediate", "short"]
    assert short.stage == "90d" and short.factories == ("line-1", "line-2")
    assert "create its successor" in short.action and "line-1, line-2" in short.action
    assert "never outlives its issuer" in short.action
    messages = {m["caId"]: m for m in _messages(service)}
    assert messages["short"]["factories"] == ["line-1", "line-2"] and messages["short"]["kind"] == "intermediate"
    assert messages["root"]["action"].startswith("the root ends")
    looked = {f.subject: f.view() for f in service.scan_expiring(announce=False).findings}
    assert looked["short"]["factories"] == ["line-1", "line-2"] and looked["root"]["factories"] == []

    clock.now = device.not_after - timedelta(days=10)
    later = service.scan_expiring()
    assert {(f.kind, f.stage, f.announced) for f in later.findings} == {
        ("root", "365d", False),
        ("intermediate", "30d", True),
        ("device", "30d", True),
    }
    # a disabled intermediate is not announced
    service.set_intermediate_enabled("short", False)
    clock.now = device.not_after - timedelta(days=5)
    assert {f.kind for f in service.scan_expiring().findings} == {"root", "device"}


def test_within_overrides_the_thresholds_without_announcing(service, clock):
    record = _device(service, "dev-1")
    clock.now = record.not_after - timedelta(days=100)
    assert service.scan_expiring(announce=False).findings == ()
    look = service.scan_expiring(within_days=120, announce=False)
    assert [(f.subject, f.stage, f.announced) for f in look.findings] == [("dev-1", "120d", False)]
    assert look.thresholds == ExpiryThresholds(120, 120, 120)
    assert _messages(service) == []
    with pytest.raises(InvalidParameter, match="within"):
        service.scan_expiring(within_days=120)
    with pytest.raises(InvalidParameter, match="within must be more than 0"):
        service.scan_expiring(within_days=0, announce=False)


def test_the_inventory_lists_only_active_expiring_certificates_unless_a_status_is_asked(service, clock):
    revoked = _device(service, "dev-revoked")
    service.revoke(revoked.serial)
    active = _device(service, "dev-active")
    old = _device(service, "dev-renewed")
    clock.advance(minutes=11)
    service.sign_csr(make_csr("dev-renewed", device_key()), "dev-renewed", renew=True)
    before = service.expiring_before(366)
    listed = service.certificates(CertificateQuery(expiring_before=before))
    assert {c.serial for c in listed.items} == {
        active.serial,
        service.ledger.active_certificates(["dev-renewed"])["dev-renewed"].serial,
    }
    revoked_listed = service.certificates(CertificateQuery(expiring_before=before, status=CERT_REVOKED))
    assert [c.serial for c in revoked_listed.items] == [revoked.serial]
    superseded = service.certificates(CertificateQuery(expiring_before=before, status=CERT_SUPERSEDED))
    assert [c.serial for c in superseded.items] == [old.serial]


def test_ten_years_on_everything_has_expired_and_is_announced_once(service, clock):
    """STYLE: expiry logic deserves a run with the clock far ahead."""
    records = [_device(service, f"dev-{i}") for i in range(3)]
    clock.advance(days=3653)
    report = service.scan_expiring()
    found = {(f.kind, f.subject): f.stage for f in report.findings}
    assert found == {
        ("intermediate", "factory-a"): "expired",  # 3650 days by default; the root's 7300 leave ten years
        **{("device", r.device_id): "expired" for r in records},
    }
    assert len(_messages(service)) == 4
    assert {service.certificate(r.serial).status for r in records} == {CERT_EXPIRED}
    clock.advance(days=1)
    again = service.scan_expiring()
    assert again.announced == () and _messages(service) == []
    assert {(f.kind, f.stage) for f in again.findings} == {("intermediate", "expired")}
    clock.advance(days=3650 - 365)  # the root's last year
    assert [(f.kind, f.stage) for f in service.scan_expiring().announced] == [("root", "365d")]


@pytest.mark.parametrize("ledger_backend", ["sqlite"], indirect=True)
def test_a_finding_whose_owner_cannot_be_read_fails_alone_and_is_announced_once_repaired(service, clock):
    """After the claim, the owner is read for the notice: a read that fails (here a damaged principal row)
    must not stop the scan, and must release the claim so that the next scan announces the stage."""
    import sqlite3

    service.principals.create_factory("line-1", ["factory-a"])
    owned = service.sign_csr(make_csr("owned"), "owned", requested_by="line-1", allowed_intermediates=["factory-a"])
    record = _device(service, "other")
    clock.now = record.not_after - timedelta(days=5)
    with sqlite3.connect(service.ledger.path) as db:
        db.execute("UPDATE principals SET intermediates = 'not json' WHERE id = 'line-1'")
    report = service.scan_expiring()
    assert [f.subject for f in report.announced] == ["other"]
    (failure,) = report.failures
    assert failure.startswith(f"device owned ({owned.record.serial}) at 7d: the service failed unexpectedly")
    assert [m["deviceId"] for m in _messages(service)] == ["other"]
    with sqlite3.connect(service.ledger.path) as db:
        db.execute("""UPDATE principals SET intermediates = '["factory-a"]' WHERE id = 'line-1'""")
    again = service.scan_expiring()
    assert [(f.subject, f.owner_factory) for f in again.announced] == [("owned", "line-1")] and again.failures == ()
    assert [m["deviceId"] for m in _messages(service)] == ["owned"]
