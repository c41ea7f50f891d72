"""The ledger's contract, on both stores: SQLite, and Table Storage on Azurite. Each rule is enforced by
the store itself, durably, even against another process."""

import multiprocessing
import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from shared.errors import CaError, Conflict, Forbidden, NotFound
from shared.ledger.models import ApiKey, CaRecord, CertificateQuery, CertificateRecord, Issuance, Principal
from shared.ledger.sqlite import SqliteLedger
from shared.ledger.tables import TableLedger
from shared.parameters import CURSOR_PATTERN
from shared.tablestore import connect

from .azurite import table_prefix
from .ledgers import check_table_rules

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _ca(ca_id: str = "int-1", kind: str = "intermediate") -> CaRecord:
    return CaRecord(
        id=ca_id,
        kind=kind,
        common_name=f"CA {ca_id}",
        curve="P-256",
        key_name=f"key-{ca_id}",
        key_backend="local",
        serial=f"S{ca_id}",
        not_before=NOW,
        not_after=NOW + timedelta(days=3650),
        certificate_pem="PEM",
        issuer_id=None,
        created_at=NOW,
    )


def _cert(serial: str, device_id: str, key: str, days: int = 365, by: str = "test", at=NOW) -> CertificateRecord:
    return CertificateRecord(
        serial=serial,
        device_id=device_id,
        intermediate_id="int-1",
        requested_by=by,
        public_key_sha256=key,
        not_before=at,
        not_after=at + timedelta(days=days),
        certificate_pem=f"PEM {serial}",
        created_at=at,
    )


def open_ledger(spec: tuple):
    """A ledger from a picklable spec, so that another process opens the same store."""
    if spec[0] == "sqlite":
        return SqliteLedger(spec[1])
    return TableLedger(connect(spec[1], spec[2], retry_seconds=10))


@pytest.fixture
def ledger_spec(ledger_backend, tmp_path, request) -> tuple:
    if ledger_backend == "sqlite":
        return ("sqlite", tmp_path / "ledger.sqlite3")
    return ("tables", request.getfixturevalue("azurite").connection_string, table_prefix())


@pytest.fixture
def ledger(ledger_spec):
    ledger = open_ledger(ledger_spec)
    ledger.add_ca(_ca())
    yield ledger
    if isinstance(ledger, TableLedger):
        check_table_rules(ledger)
    ledger.close()


def _serials(ledger, **query) -> list[str]:
    return [c.serial for c in ledger.list_certificates(CertificateQuery(**query)).items]


def test_one_root_only(ledger):
    with pytest.raises(Conflict) as taken:
        ledger.add_ca(_ca("int-1", "root"))  # the first root, but with an intermediate's ID
    assert taken.value.code == "ca-exists" and ledger.get_root() is None
    ledger.add_ca(_ca("root", "root"))
    with pytest.raises(Conflict) as refused:
        ledger.add_ca(_ca("root-2", "root"))
    assert refused.value.code == "root-exists"
    assert ledger.get_root().id == "root"


def test_ca_ids_are_unique_and_listed_oldest_first(ledger):
    ledger.add_ca(_ca("int-2"))
    with pytest.raises(Conflict) as refused:
        ledger.add_ca(_ca("int-2"))
    assert refused.value.code == "ca-exists"
    assert [ca.id for ca in ledger.list_cas("intermediate")] == ["int-1", "int-2"]
    assert ledger.set_ca_status("int-2", "disabled").status == "disabled"
    assert ledger.set_ca_dps("int-2", {"mode": "offline"}).dps == {"mode": "offline"}
    for change in (lambda: ledger.set_ca_status("nope", "disabled"), lambda: ledger.set_ca_dps("nope", {})):
        with pytest.raises(NotFound) as no_ca:
            change()
        assert no_ca.value.code == "ca-not-found" and "'nope'" in no_ca.value.message
    assert ledger.get_ca("int-2") == replace(_ca("int-2"), status="disabled", dps={"mode": "offline"})
    signed = replace(_ca("int-3"), issuer_id="int-1")
    ledger.add_ca(signed)
    assert ledger.get_ca("int-3") == signed and ledger.list_cas("intermediate")[-1] == signed


def test_records_round_trip(ledger):
    record = _cert("01", "dev-1", "k1")
    assert ledger.record_issued([Issuance(record)]) == [record]
    assert ledger.get_certificate("01") == record
    assert ledger.get_certificate("02") is None
    assert ledger.active_certificates(["dev-1", "dev-2"]) == {"dev-1": record}
    assert ledger.key_bindings(["k1", "k2"]) == {"k1": ("dev-1", False)}
    assert ledger.device_owners(["dev-1", "dev-2"]) == {"dev-1": "test"}


def test_times_are_kept_in_utc_whatever_the_machines_time_zone(ledger, monkeypatch):
    monkeypatch.setenv("TZ", "XST+05")  # five hours west of UTC, no DST (POSIX form: needs no tz database)
    time.tzset()
    try:
        record = _cert("01", "dev-1", "k1")
        ledger.record_issued([Issuance(record)])
        assert ledger.get_certificate("01") == record
        assert _serials(ledger, expiring_before=record.not_after) == ["01"]
        assert _serials(ledger, expiring_before=record.not_after - timedelta(seconds=1)) == []
    finally:
        monkeypatch.undo()
        time.tzset()


def test_each_issuance_stands_alone_in_one_commit(ledger):
    results = ledger.record_issued(
        [
            Issuance(_cert("01", "dev-1", "k1")),
            Issuance(_cert("02", "dev-2", "k1")),
            Issuance(_cert("03", "dev-3", "k3")),
        ]
    )
    assert isinstance(results[1], Conflict) and results[1].code == "key-in-use"
    assert sorted(_serials(ledger)) == ["01", "03"]
    assert ledger.key_bindings(["k1"]) == {"k1": ("dev-1", False)}
    assert ledger.get_certificate("02") is None


def test_a_second_key_for_a_device_needs_supersede_and_the_same_key_gets_its_certificate(ledger):
    first = _cert("01", "dev-1", "k1")
    ledger.record_issued([Issuance(first)])
    (refused,) = ledger.record_issued([Issuance(_cert("02", "dev-1", "k2"))])
    assert isinstance(refused, Conflict) and refused.code == "device-has-certificate"
    assert ledger.key_bindings(["k2"]) == {}, "a refused issuance leaves no key binding"
    (same,) = ledger.record_issued([Issuance(_cert("03", "dev-1", "k1"))])
    assert same == first
    assert ledger.get_certificate("03") is None and _serials(ledger) == ["01"]


def test_a_refused_request_with_a_key_the_device_renewed_away_from_keeps_that_keys_binding(ledger):
    """The device renewed from k1 to k2; k1 stays bound to it (its superseded certificate is still valid).
    A request for the device with k1 again, not a renewal, is refused (the device has a certificate), and
    leaves k1's binding as it was: releasing it would let k1 be certified for another device."""
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    ledger.record_issued([Issuance(_cert("02", "dev-1", "k2", at=NOW + timedelta(days=1)), supersede=True)])
    (refused,) = ledger.record_issued([Issuance(_cert("03", "dev-1", "k1", at=NOW + timedelta(days=2)))])
    assert isinstance(refused, Conflict) and refused.code == "device-has-certificate"
    assert ledger.key_bindings(["k1"]) == {"k1": ("dev-1", False)}
    (taken,) = ledger.record_issued([Issuance(_cert("04", "dev-2", "k1", at=NOW + timedelta(days=2)))])
    assert isinstance(taken, Conflict) and taken.code == "key-in-use"


def test_a_retried_renewal_gets_the_certificate_its_first_attempt_made(ledger):
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    renewed_at = NOW + timedelta(days=100)
    first = _cert("02", "dev-1", "k2", at=renewed_at)
    window = renewed_at - timedelta(minutes=5)
    assert ledger.record_issued([Issuance(first, supersede=True, retry_since=window)]) == [first]
    # Its answer was lost and the device asks again: the same key, and a certificate made at or after retry_since.
    retry = _cert("03", "dev-1", "k2", at=renewed_at + timedelta(minutes=1))
    assert ledger.record_issued([Issuance(retry, supersede=True, retry_since=renewed_at)]) == [first]
    # Renewing with the same key once that certificate is older than the window is a renewal of its own.
    later = _cert("04", "dev-1", "k2", at=renewed_at + timedelta(days=200))
    window = renewed_at + timedelta(seconds=1)
    assert ledger.record_issued([Issuance(later, supersede=True, retry_since=window)]) == [later]
    # Nor is a certificate of another key a retry's answer.
    other_key = _cert("05", "dev-1", "k5", at=renewed_at + timedelta(days=201))
    assert ledger.record_issued([Issuance(other_key, supersede=True, retry_since=NOW)]) == [other_key]
    assert [c.serial for c in ledger.active_certificates(["dev-1"]).values()] == ["05"]
    assert _serials(ledger, device_id="dev-1") == ["01", "02", "04", "05"]
    new_device = _cert("06", "dev-2", "k6")  # nothing active yet: nothing to retry
    assert ledger.record_issued([Issuance(new_device, supersede=True, retry_since=NOW)]) == [new_device]


def test_a_certificate_recorded_again_is_answered_with_itself_and_its_serial_stays_its_own(ledger):
    """A commit whose answer was lost is sent again with the same certificate: it gets that certificate, and
    nothing is recorded twice. Another certificate with that serial is refused."""
    first = _cert("01", "dev-1", "k1")
    assert ledger.record_issued([Issuance(first)]) == [first]
    assert ledger.record_issued([Issuance(first)]) == [first]
    assert _serials(ledger) == ["01"] and ledger.get_certificate("01") == first
    (taken,) = ledger.record_issued([Issuance(_cert("01", "dev-2", "k2"))])
    assert isinstance(taken, Conflict) and taken.code == "ledger-conflict"
    assert ledger.get_certificate("01") == first and ledger.active_certificates(["dev-2"]) == {}


@pytest.mark.parametrize("supersede", [False, True])
def test_a_superseded_certificate_recorded_again_is_refused_and_changes_nothing(ledger, supersede):
    """A very late retry of a commit: the device has been renewed since, so its first certificate is no
    longer the answer to give. It is refused as a serial the ledger already holds, at once (not after
    retrying as if the device were busy), and the device keeps its renewal."""
    first = _cert("01", "dev-1", "k1")
    renewal = _cert("02", "dev-1", "k2", at=NOW + timedelta(days=100))
    ledger.record_issued([Issuance(first)])
    ledger.record_issued([Issuance(renewal, supersede=True)])
    (refused,) = ledger.record_issued([Issuance(first, supersede=supersede)])
    assert isinstance(refused, Conflict), refused
    assert refused.code == ("ledger-conflict" if supersede else "device-has-certificate")
    assert ledger.active_certificates(["dev-1"]) == {"dev-1": renewal}
    assert ledger.get_certificate("01").status == "superseded" and _serials(ledger) == ["01", "02"]


def test_a_certificate_marked_expired_recorded_again_is_refused(ledger):
    """A late retry of a commit whose certificate has since expired (the device has no active certificate):
    its serial is the ledger's already, so it is refused, and the certificate stays expired."""
    first = _cert("01", "dev-1", "k1", days=20)
    ledger.record_issued([Issuance(first)])
    (watch,) = ledger.expiry_watch(NOW + timedelta(days=30))
    assert ledger.mark_expired(watch, NOW + timedelta(days=21)) is not None
    (refused,) = ledger.record_issued([Issuance(first)])
    assert isinstance(refused, Conflict) and refused.code == "ledger-conflict", refused
    assert ledger.get_certificate("01").status == "expired" and ledger.active_certificates(["dev-1"]) == {}


@pytest.mark.parametrize("supersede", [True, False])
def test_a_renewal_recorded_again_by_an_instance_that_missed_its_commit_gets_it(ledger, ledger_spec, supersede):
    """A renewal's commit landed but its answer was lost; it is sent again (by this instance, which last saw
    the device before the renewal, or by another): it gets the renewal, and nothing changes: the renewal
    does not supersede itself, and the certificate it renewed stays superseded by it."""
    other = open_ledger(ledger_spec)
    try:
        first = _cert("01", "dev-1", "k1")
        ledger.record_issued([Issuance(first)])
        renewal = _cert("02", "dev-1", "k2", at=NOW + timedelta(days=100))
        assert other.record_issued([Issuance(renewal, supersede=True)]) == [renewal]
        assert ledger.record_issued([Issuance(renewal, supersede=supersede)]) == [renewal]
        assert other.record_issued([Issuance(renewal, supersede=supersede)]) == [renewal]
        assert ledger.active_certificates(["dev-1"]) == {"dev-1": renewal}
        assert ledger.get_certificate("02") == renewal and _serials(ledger) == ["01", "02"]
        superseded = ledger.get_certificate("01")
        assert (superseded.status, superseded.status_reason) == ("superseded", "renewed as 02")
    finally:
        other.close()


def test_an_instance_renewing_after_another_one_did_supersedes_that_renewal(ledger, ledger_spec):
    """Two instances on one store take turns with one device. The first last saw the device before the
    other renewed it (a Table ledger keeps the head it wrote): its renewal still supersedes the other's
    certificate, and keeps the key the other revoked in between revoked."""
    other = open_ledger(ledger_spec)
    try:
        ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
        second = _cert("02", "dev-1", "k2", at=NOW + timedelta(days=1))
        assert other.record_issued([Issuance(second, supersede=True)]) == [second]
        third = _cert("03", "dev-1", "k3", at=NOW + timedelta(days=2))
        assert ledger.record_issued([Issuance(third, supersede=True)]) == [third]
        assert [(c.serial, c.status) for c in ledger.list_certificates(CertificateQuery(device_id="dev-1")).items] == [
            ("01", "superseded"),
            ("02", "superseded"),
            ("03", "active"),
        ]
        assert other.get_certificate("02").status_reason == "renewed as 03"
        assert other.active_certificates(["dev-1"]) == {"dev-1": ledger.get_certificate("03")}
        other.revoke_certificate("01", "keyCompromise", NOW + timedelta(days=3))
        fourth = _cert("04", "dev-1", "k4", at=NOW + timedelta(days=4))
        assert ledger.record_issued([Issuance(fourth, supersede=True)]) == [fourth]
        assert other.precheck(["dev-1"], ["k1"]).bindings == {"k1": ("dev-1", True)}
        assert [c.serial for c in other.active_certificates(["dev-1"]).values()] == ["04"]
    finally:
        other.close()


def test_an_instance_that_last_saw_a_certificate_another_revoked_decides_on_the_device_as_it_is(ledger, ledger_spec):
    """A decision made without a write rests on a read made for it, not on what this instance last saw (a
    Table ledger keeps the head it wrote): once another instance revoked the device's certificate, a new
    certificate for it needs no renewal; once another renewed it, a retried renewal is not answered with the
    certificate that renewal superseded."""
    other = open_ledger(ledger_spec)
    try:
        first = _cert("01", "dev-1", "k1")
        assert ledger.record_issued([Issuance(first)]) == [first]
        other.revoke_certificate("01", "keyCompromise", NOW + timedelta(days=1))
        second = _cert("02", "dev-1", "k2", at=NOW + timedelta(days=2))
        assert ledger.record_issued([Issuance(second)]) == [second]
        assert other.active_certificates(["dev-1"]) == {"dev-1": second}
        # a renewal's retry is answered with its first attempt's certificate only while that one is active
        third = _cert("03", "dev-1", "k3", at=NOW + timedelta(days=3))
        assert other.record_issued([Issuance(third, supersede=True)]) == [third]
        retry = _cert("04", "dev-1", "k2", at=NOW + timedelta(days=4))
        assert ledger.record_issued([Issuance(retry, supersede=True, retry_since=second.created_at)]) == [retry]
        assert other.active_certificates(["dev-1"]) == {"dev-1": retry}
    finally:
        other.close()


def test_device_ownership(ledger):
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1", by="factory-a"), owner="factory-a")])
    (refused,) = ledger.record_issued(
        [Issuance(_cert("02", "dev-1", "k2", by="factory-b"), supersede=True, owner="factory-b")]
    )
    assert isinstance(refused, Forbidden) and refused.code == "device-owned-by-another-factory"
    assert "'dev-1'" in refused.message and "factory-a" not in refused.message  # the device, not its owner
    (by_admin,) = ledger.record_issued([Issuance(_cert("03", "dev-1", "k3", by="admin"), supersede=True)])
    assert by_admin.serial == "03"
    assert ledger.device_owners(["dev-1"]) == {"dev-1": "factory-a"}, "an admin keeps the device's owner"
    ledger.record_issued([Issuance(_cert("04", "dev-2", "k4", by="admin"))])
    assert ledger.device_owners(["dev-2"]) == {"dev-2": "admin"}
    (key_elsewhere,) = ledger.record_issued([Issuance(_cert("05", "dev-3", "k1", by="factory-b"), owner="factory-b")])
    assert key_elsewhere.code == "key-in-use" and "dev-1" not in key_elsewhere.message
    assert "certified for another device" in key_elsewhere.message
    (named,) = ledger.record_issued([Issuance(_cert("06", "dev-3", "k1", by="admin"))])
    assert named.code == "key-in-use" and "dev-1" in named.message
    # New devices recorded together (SQLite writes such a group in one statement): each is owned by the factory
    # the issuance names, whoever its record names as the requester.
    ledger.record_issued(
        [
            Issuance(_cert("07", "dev-7", "k7", by="operator-1"), owner="factory-c"),
            Issuance(_cert("08", "dev-8", "k8", by="operator-2"), owner="factory-c"),
        ]
    )
    assert ledger.device_owners(["dev-7", "dev-8"]) == {"dev-7": "factory-c", "dev-8": "factory-c"}


def test_supersede_and_revoke(ledger):
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    (renewed,) = ledger.record_issued([Issuance(_cert("02", "dev-1", "k2"), supersede=True)])
    assert renewed.serial == "02"
    old = ledger.get_certificate("01")
    assert old.status == "superseded" and old.status_reason == "renewed as 02"
    revocation = ledger.revoke_certificate("02", "keyCompromise", NOW)
    revoked = revocation.record
    assert revoked.status == "revoked" and revoked.status_reason == "keyCompromise"
    assert revoked.status_changed_at == NOW and revoked == ledger.get_certificate("02")  # what it now holds
    assert revocation.also_revoked == ()
    assert ledger.key_bindings(["k2"]) == {"k2": ("dev-1", True)}
    assert ledger.active_certificates(["dev-1"]) == {}
    (refused,) = ledger.record_issued([Issuance(_cert("03", "dev-1", "k2"))])
    assert isinstance(refused, CaError) and refused.code == "key-revoked"
    with pytest.raises(NotFound) as unknown:
        ledger.revoke_certificate("99", "unspecified", NOW)
    assert unknown.value.code == "certificate-not-found" and "99" in unknown.value.message


def test_revoking_an_old_certificate_revokes_the_active_one_of_its_key_and_keeps_the_first_reason(ledger):
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    ledger.record_issued([Issuance(_cert("02", "dev-1", "k1", at=NOW + timedelta(seconds=5)), supersede=True)])
    revocation = ledger.revoke_certificate("01", "keyCompromise", NOW + timedelta(minutes=1))
    assert revocation.record.status == "revoked"
    assert [(c.serial, c.status, c.status_reason) for c in revocation.also_revoked] == [
        ("02", "revoked", "keyCompromise")
    ]
    assert ledger.get_certificate("02") == revocation.also_revoked[0]
    # again (a retry whose answer was lost): the first revocation, and what it revoked with it
    assert ledger.revoke_certificate("01", "unspecified", NOW + timedelta(minutes=2)) == revocation
    again = ledger.revoke_certificate("02", "superseded", NOW + timedelta(minutes=2))
    assert again.record == revocation.also_revoked[0] and again.also_revoked == (revocation.record,)
    ledger.record_issued([Issuance(_cert("03", "dev-1", "k3", at=NOW + timedelta(minutes=3)))])
    later = ledger.revoke_certificate("03", "keyCompromise", NOW + timedelta(minutes=4))
    assert later.also_revoked == () and ledger.revoke_certificate("03", "unspecified", NOW).also_revoked == ()


def test_listing_filters_and_pages(ledger):
    for i in range(7):
        at = NOW + timedelta(seconds=i)
        by = "factory-a" if i % 2 else "factory-b"
        ledger.record_issued([Issuance(_cert(f"{i:02d}", f"dev-{i}", f"k{i}", days=10 * (i + 1), by=by, at=at))])
    page = ledger.list_certificates(CertificateQuery(limit=3))
    assert [c.serial for c in page.items] == ["00", "01", "02"] and page.next_cursor
    page = ledger.list_certificates(CertificateQuery(limit=3, cursor=page.next_cursor))
    assert [c.serial for c in page.items] == ["03", "04", "05"]
    page = ledger.list_certificates(CertificateQuery(limit=3, cursor=page.next_cursor))
    assert [c.serial for c in page.items] == ["06"] and page.next_cursor is None
    page = ledger.list_certificates(CertificateQuery(limit=7))
    assert len(page.items) == 7 and page.next_cursor is None  # all of them, and nothing after
    expiring = ledger.list_certificates(CertificateQuery(expiring_before=NOW + timedelta(days=25)))
    assert [c.serial for c in expiring.items] == ["00", "01"]
    assert _serials(ledger, device_id="dev-4") == ["04"]
    assert _serials(ledger, requested_by="factory-a") == ["01", "03", "05"]
    assert _serials(ledger, requested_by="factory-a", expiring_before=NOW + timedelta(days=45)) == ["01", "03"]
    assert _serials(ledger, intermediate_id="int-1", status="active", limit=2) == ["00", "01"]
    assert _serials(ledger, status="revoked") == []


@pytest.mark.parametrize(
    "query",
    [
        CertificateQuery(),
        CertificateQuery(requested_by="factory-a"),
        CertificateQuery(expiring_before=NOW + timedelta(days=400)),
        CertificateQuery(status="active"),
        CertificateQuery(device_id="dev-0"),
    ],
    ids=["whole fleet", "requester", "expiry window", "status", "device"],
)
def test_paging_visits_every_match_once(ledger, query):
    records = [
        _cert(f"{i:02X}", f"dev-{i % 5}", f"k{i}", by="factory-a", at=NOW + timedelta(seconds=i)) for i in range(23)
    ]
    for record in records:  # renewals: one device holds several certificates
        ledger.record_issued([Issuance(record, supersede=True)])
    expected = {r.serial for r in records if r.device_id == query.device_id or query.device_id is None}
    if query.status == "active":
        expected = set(ledger.active_certificates([f"dev-{i}" for i in range(5)]).values())
        expected = {r.serial for r in expected}
    seen, cursor = [], None
    while True:
        page = ledger.list_certificates(replace(query, limit=4, cursor=cursor))
        assert len(page.items) <= 4
        seen += [c.serial for c in page.items]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
        assert re.fullmatch(CURSOR_PATTERN, cursor), cursor  # a cursor the API takes back (no base64 padding)
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))


def test_a_cursor_from_elsewhere_is_refused(ledger):
    for cursor in ("not-a-cursor", "eyJmIjoxfQ"):
        with pytest.raises(CaError) as refused:
            ledger.list_certificates(CertificateQuery(cursor=cursor))
        assert refused.value.code == "invalid-cursor"


def test_principals_and_api_keys(ledger):
    admin = Principal("admin", "admin", (), NOW)
    factory = Principal("factory-a", "factory", ("int-1",), NOW + timedelta(seconds=1), app_id="0000-a")
    ledger.add_principal(admin)
    ledger.add_principal(factory)
    assert ledger.get_principal("admin") == admin and ledger.get_principal("factory-a") == factory
    with pytest.raises(Conflict) as taken:
        ledger.add_principal(Principal("factory-a", "factory", ("int-1",), NOW))
    assert taken.value.code == "principal-exists"
    with pytest.raises(Conflict) as app_taken:
        ledger.add_principal(Principal("factory-b", "factory", ("int-1",), NOW, app_id="0000-a"))
    assert app_taken.value.code == "app-id-taken"
    assert ledger.list_principals() == [admin, factory]
    assert ledger.principal_for_app("0000-a") == factory
    assert ledger.principal_for_app("0000-b") is None  # no factory bound to this application: no caller
    assert ledger.set_principal_intermediates("factory-a", ["int-1", "int-2"]).intermediates == ("int-1", "int-2")
    with pytest.raises(NotFound) as unknown:
        ledger.set_principal_intermediates("nobody", ["int-1"])
    assert unknown.value.code == "principal-not-found" and "'nobody'" in unknown.value.message
    assert ledger.get_principal("nobody") is None
    key = ApiKey("0123456789abcdef", "factory-a", "ab" * 32, NOW)
    ledger.add_api_key(key)
    with pytest.raises(Conflict) as key_taken:  # an ID recorded again (a retry whose answer was lost)
        ledger.add_api_key(replace(key, secret_sha256="cd" * 32))
    assert key_taken.value.code == "key-exists"
    assert ledger.api_key_with_principal(key.id) == (key, ledger.get_principal("factory-a"))
    assert ledger.api_key_with_principal("fedcba9876543210") is None  # no such key: no caller, not an error
    assert ledger.revoke_api_key(key.id, NOW).revoked_at == NOW
    assert ledger.revoke_api_key(key.id, NOW + timedelta(days=1)).revoked_at == NOW
    assert ledger.list_api_keys() == [replace(key, revoked_at=NOW)]
    with pytest.raises(NotFound) as no_key:
        ledger.revoke_api_key("ffffffffffffffff", NOW)
    assert no_key.value.code == "key-not-found" and "'ffffffffffffffff'" in no_key.value.message


def test_api_keys_are_listed_oldest_first_then_by_id(ledger):
    ledger.add_principal(Principal("factory-a", "factory", ("int-1",), NOW))
    made = {
        "1111111111111111": NOW,
        "0000000000000000": NOW,
        "ffffffffffffffff": NOW - timedelta(days=1),
    }
    for key_id, at in made.items():
        ledger.add_api_key(ApiKey(key_id, "factory-a", "ab" * 32, at))
    listed = ledger.list_api_keys()
    assert [k.id for k in listed] == ["ffffffffffffffff", "0000000000000000", "1111111111111111"]
    assert [k.created_at for k in listed] == [NOW - timedelta(days=1), NOW, NOW]


# -- processes racing --------------------------------------------------------------------------------------


def _contender(spec: tuple, tasks, barrier, results) -> None:
    """A process that records what it is given, each round at the same moment as its rival."""
    ledger = open_ledger(spec)
    try:
        while (task := tasks.get()) is not None:
            serial, device_id, key = task
            ledger.precheck([device_id], [key])  # as the service reads before it signs
            barrier.wait()
            (outcome,) = ledger.record_issued([Issuance(_cert(serial, device_id, key))])
            results.put((serial, outcome.code if isinstance(outcome, CaError) else outcome.serial))
    finally:
        ledger.close()


ROUNDS = 25


def _race(spec: tuple, rounds: list[list[tuple[str, str, str]]]) -> list[list[tuple[str, str]]]:
    """Two processes; in each round both record at once. The outcomes of each round, sorted."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    queues = [context.Queue(), context.Queue()]
    processes = [context.Process(target=_contender, args=(spec, queue, barrier, results)) for queue in queues]
    for process in processes:
        process.start()
    outcomes = []
    try:
        for contenders in rounds:
            for queue, task in zip(queues, contenders, strict=True):
                queue.put(task)
            outcomes.append(sorted(results.get(timeout=120) for _ in contenders))
    finally:
        for queue in queues:
            queue.put(None)
        for process in processes:
            process.join()
    return outcomes


@pytest.mark.child_process
def test_two_processes_racing_for_one_device_with_different_keys_cannot_both_win(ledger, ledger_spec):
    rounds = [[(f"A{n:02d}", f"dev-{n}", f"ka{n}"), (f"B{n:02d}", f"dev-{n}", f"kb{n}")] for n in range(ROUNDS)]
    for n, outcomes in enumerate(_race(ledger_spec, rounds)):
        winners = [serial for serial, result in outcomes if result == serial]
        assert len(winners) == 1, outcomes
        assert [result for serial, result in outcomes if result != serial] == ["device-has-certificate"]
        device = f"dev-{n}"
        assert _serials(ledger, device_id=device) == winners
        assert [c.serial for c in ledger.active_certificates([device]).values()] == winners
        loser_key = f"kb{n}" if winners[0].startswith("A") else f"ka{n}"
        assert ledger.key_bindings([loser_key]) == {}, "the loser's key binding is gone"


@pytest.mark.child_process
def test_two_processes_racing_with_one_key_for_two_devices_cannot_both_win(ledger, ledger_spec):
    rounds = [[(f"A{n:02d}", f"dev-a{n}", f"k{n}"), (f"B{n:02d}", f"dev-b{n}", f"k{n}")] for n in range(ROUNDS)]
    for n, outcomes in enumerate(_race(ledger_spec, rounds)):
        winners = [serial for serial, result in outcomes if result == serial]
        assert len(winners) == 1, outcomes
        assert [result for serial, result in outcomes if result != serial] == ["key-in-use"]
        winner_device = f"dev-a{n}" if winners[0].startswith("A") else f"dev-b{n}"
        assert ledger.key_bindings([f"k{n}"]) == {f"k{n}": (winner_device, False)}
        assert ledger.active_certificates([f"dev-a{n}", f"dev-b{n}"]).keys() == {winner_device}
    assert len(ledger.list_certificates(CertificateQuery(limit=1000)).items) == ROUNDS
