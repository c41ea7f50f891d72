"""The ledger's part of the expiry scan, on both stores: watches, stage claims that only one scan wins
(threads and processes), certificates marked expired, rows read; and SQLite's migration to schema 4."""

import multiprocessing
import sqlite3
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from shared.ledger.models import (
    CERT_ACTIVE,
    CERT_EXPIRED,
    KEY_VAULT_TOPIC,
    CertificateQuery,
    Issuance,
)
from shared.ledger.sqlite import SCHEMA_VERSION, SqliteLedger
from shared.ledger.tables import CAS, INDEX, TableLedger

from .azurite import table_prefix
from .ledgers import check_table_rules, table_rows
from .test_ledger import NOW, _ca, _cert, open_ledger

SCHEMA_2 = Path(__file__).parent / "data" / "ledger_schema_2.sql"


@pytest.fixture
def store_spec(ledger_backend, tmp_path, request) -> tuple:
    if ledger_backend == "sqlite":
        return ("sqlite", tmp_path / "ledger.sqlite3")
    return ("tables", request.getfixturevalue("azurite").connection_string, table_prefix())


@pytest.fixture
def store(store_spec):
    """A ledger on the backend under test with one intermediate, int-1 (as test_ledger.py's)."""
    ledger = open_ledger(store_spec)
    ledger.add_ca(_ca())
    yield ledger
    if isinstance(ledger, TableLedger):
        check_table_rules(ledger)
    ledger.close()


def _issue(ledger, *records, supersede=False):
    results = ledger.record_issued([Issuance(r, supersede=supersede) for r in records])
    assert all(result.serial == record.serial for result, record in zip(results, records, strict=True)), results
    return records


def _watched(ledger, days: float) -> dict[str, str | None]:
    return {w.serial: w.stage for w in ledger.expiry_watch(NOW + timedelta(days=days))}


def test_only_active_certificates_inside_the_window_are_watched(store):
    _issue(store, _cert("A1", "dev-a", "ka", days=20), _cert("B1", "dev-b", "kb", days=40))
    _issue(store, _cert("C1", "dev-c", "kc", days=25), _cert("D1", "dev-d", "kd", days=10))
    _issue(store, _cert("C2", "dev-c", "kc2", days=400, at=NOW + timedelta(minutes=20)), supersede=True)
    store.revoke_certificate("D1", "keyCompromise", NOW)
    assert _watched(store, 30) == {"A1": None}
    assert _watched(store, 41) == {"A1": None, "B1": None}
    (watch,) = store.expiry_watch(NOW + timedelta(days=30))
    assert (watch.kind, watch.subject, watch.record.serial) == ("device", "dev-a", "A1")
    assert watch.not_after == NOW + timedelta(days=20)
    assert _watched(store, 20) == {"A1": None}  # a window that ends at its notAfter holds it
    assert _watched(store, 20 - 1 / 86400) == {}


def test_the_watch_window_is_read_in_utc_whatever_the_hosts_time_zone(store, monkeypatch):
    _issue(store, _cert("A1", "dev-a", "ka", days=20))  # notAfter 2026-01-21T00:00Z
    monkeypatch.setenv("TZ", "Etc/GMT+12")  # UTC-12: the window's end, 06:00Z, is the day before there
    time.tzset()
    try:
        assert _watched(store, 20.25) == {"A1": None}
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_stage_is_claimed_once_and_can_be_released(store):
    _issue(store, _cert("A1", "dev-a", "ka", days=20))
    (watch,) = store.expiry_watch(NOW + timedelta(days=30))
    claimed = store.claim_expiry_stage(watch, "30d", NOW)
    assert claimed is not None and claimed.stage == "30d"
    assert store.claim_expiry_stage(watch, "30d", NOW) is None  # read before the claim: stale
    assert _watched(store, 30) == {"A1": "30d"}
    (fresh,) = store.expiry_watch(NOW + timedelta(days=30))
    seven = store.claim_expiry_stage(fresh, "7d", NOW)
    assert seven is not None and _watched(store, 30) == {"A1": "7d"}
    store.release_expiry_stage(seven, "30d")
    assert _watched(store, 30) == {"A1": "30d"}
    (again,) = store.expiry_watch(NOW + timedelta(days=30))
    first = store.claim_expiry_stage(again, "7d", NOW)
    store.release_expiry_stage(first, None)
    assert _watched(store, 30) == {"A1": None}
    store.release_expiry_stage(first, None)  # released already: nothing changes


def test_a_certificate_superseded_after_it_was_read_is_not_claimed(store):
    _issue(store, _cert("A1", "dev-a", "ka", days=20))
    (watch,) = store.expiry_watch(NOW + timedelta(days=30))
    _issue(store, _cert("A2", "dev-a", "ka2", days=400, at=NOW + timedelta(minutes=20)), supersede=True)
    assert store.claim_expiry_stage(watch, "30d", NOW) is None
    assert _watched(store, 30) == {}


def test_an_expired_certificate_is_marked_and_no_longer_watched(store):
    _issue(store, _cert("A1", "dev-a", "ka", days=20), _cert("B1", "dev-b", "kb", days=25))
    later = NOW + timedelta(days=21)
    watches = {w.serial: w for w in store.expiry_watch(later + timedelta(days=30))}
    assert store.mark_expired(watches["B1"], later) is None  # not yet past its notAfter
    marked = store.mark_expired(watches["A1"], later)
    assert marked.status == CERT_EXPIRED and marked.status_reason == "expired" and marked.status_changed_at == later
    assert store.get_certificate("A1").status == CERT_EXPIRED
    assert store.active_certificates(["dev-a", "dev-b"]).keys() == {"dev-b"}
    assert set(_watched(store, 60)) == {"B1"}
    assert store.mark_expired(watches["A1"], later) is None  # again: nothing to do
    listed = store.list_certificates(CertificateQuery(status=CERT_EXPIRED))
    assert [c.serial for c in listed.items] == ["A1"]
    # the device takes a new certificate as a new one (nothing active to supersede)
    _issue(store, _cert("A2", "dev-a", "ka2", at=later))
    assert store.get_certificate("A2").status == CERT_ACTIVE


def test_a_certificate_expires_at_its_not_after_and_the_ledger_keeps_when_and_why(store):
    _issue(store, _cert("A1", "dev-a", "ka", days=20))
    (watch,) = store.expiry_watch(NOW + timedelta(days=30))
    end = NOW + timedelta(days=20)
    assert store.mark_expired(watch, end - timedelta(seconds=1)) is None  # still valid: still watched
    assert store.mark_expired(watch, end).status == CERT_EXPIRED
    kept = store.get_certificate("A1")
    assert (kept.status, kept.status_changed_at, kept.status_reason) == (CERT_EXPIRED, end, "expired")
    (listed,) = store.list_certificates(CertificateQuery(status=CERT_EXPIRED)).items
    assert (listed.serial, listed.status_changed_at, listed.status_reason) == ("A1", end, "expired")


def test_a_certificate_found_no_longer_active_when_marked_is_not_read_again(store):
    _issue(store, _cert("A1", "dev-a", "ka", days=20))
    (watch,) = store.expiry_watch(NOW + timedelta(days=30))
    _issue(store, _cert("A2", "dev-a", "ka2", days=400, at=NOW + timedelta(minutes=20)), supersede=True)
    assert store.mark_expired(watch, NOW + timedelta(days=21)) is None  # superseded: not expired
    assert store.get_certificate("A1").status == "superseded"
    before = store.expiry_rows_read
    assert store.expiry_watch(NOW + timedelta(days=30)) == []
    assert store.expiry_rows_read == before  # its expiry row was retired by mark_expired


def test_a_stage_released_after_the_certificate_expired_changes_nothing(store):
    _issue(store, _cert("A1", "dev-a", "ka", days=20))
    (watch,) = store.expiry_watch(NOW + timedelta(days=30))
    claimed = store.claim_expiry_stage(watch, "7d", NOW)
    assert store.mark_expired(claimed, NOW + timedelta(days=21)) is not None  # the row the stage was on goes
    store.release_expiry_stage(claimed, None)  # the scan gives the stage back: nothing is left to change
    assert _watched(store, 60) == {}
    assert store.get_certificate("A1").status == CERT_EXPIRED


def test_ca_stages_are_kept_per_topic(store):
    (watch,) = store.ca_expiry_watch()
    assert (watch.kind, watch.subject, watch.serial, watch.stage) == ("intermediate", "int-1", "Sint-1", None)
    assert watch.record.id == "int-1" and watch.not_after == _ca().not_after
    before = store.expiry_rows_read
    store.ca_expiry_watch()
    store.ca_expiry_watch(KEY_VAULT_TOPIC)
    assert store.expiry_rows_read - before == 2  # the one CA's row, read by each scan
    assert store.claim_expiry_stage(watch, "90d", NOW).stage == "90d"
    assert store.claim_expiry_stage(watch, "90d", NOW) is None
    (vault,) = store.ca_expiry_watch(KEY_VAULT_TOPIC)
    assert vault.stage is None and vault.topic == KEY_VAULT_TOPIC
    assert store.claim_expiry_stage(vault, "key-vault-missing", NOW) is not None
    assert [w.stage for w in store.ca_expiry_watch()] == ["90d"]
    assert [w.stage for w in store.ca_expiry_watch(KEY_VAULT_TOPIC)] == ["key-vault-missing"]
    store.set_ca_status("int-1", "disabled")  # other writes to the record keep its stages
    assert [w.stage for w in store.ca_expiry_watch()] == ["90d"]


def test_ca_watches_come_oldest_first_then_in_the_order_they_were_added(store):
    store.add_ca(replace(_ca("int-0"), created_at=NOW))  # as old as int-1, added after it
    store.add_ca(replace(_ca("int-9"), created_at=NOW - timedelta(days=1)))  # added last, the oldest
    assert [w.subject for w in store.ca_expiry_watch()] == ["int-9", "int-1", "int-0"]
    assert [w.subject for w in store.ca_expiry_watch(KEY_VAULT_TOPIC)] == ["int-9", "int-1", "int-0"]


def test_table_rows_keep_each_topics_stage_in_its_own_property(azurite):
    """The names a stage is stored under are the format other versions read: `expiry_stage` on the
    certificate's expiry index row and on a CA's row, `key_vault_stage` on a CA's row."""
    ledger = open_ledger(("tables", azurite.connection_string, table_prefix()))
    try:
        ledger.add_ca(_ca())
        _issue(ledger, _cert("A1", "dev-a", "ka", days=20))
        (watch,) = ledger.expiry_watch(NOW + timedelta(days=30))
        assert ledger.claim_expiry_stage(watch, "30d", NOW) is not None
        (ca,) = ledger.ca_expiry_watch()
        assert ledger.claim_expiry_stage(ca, "90d", NOW) is not None
        (vault,) = ledger.ca_expiry_watch(KEY_VAULT_TOPIC)
        assert ledger.claim_expiry_stage(vault, "key-vault-missing", NOW) is not None
        (expiry_row,) = [r for r in table_rows(ledger, INDEX) if r["PartitionKey"].startswith("exp-")]
        assert expiry_row["expiry_stage"] == "30d"
        (ca_row,) = [r for r in table_rows(ledger, CAS) if r.get("id") == "int-1"]
        assert (ca_row["expiry_stage"], ca_row["key_vault_stage"]) == ("90d", "key-vault-missing")
    finally:
        ledger.close()


def test_a_claim_on_tables_counts_the_certificate_row_it_reads(azurite):
    """A device's claim reads its certificate's row first (is it still active?): one more row read."""
    ledger = open_ledger(("tables", azurite.connection_string, table_prefix()))
    try:
        ledger.add_ca(_ca())
        _issue(ledger, _cert("A1", "dev-a", "ka", days=20))
        (watch,) = ledger.expiry_watch(NOW + timedelta(days=30))
        before = ledger.expiry_rows_read
        assert before == 2  # the expiry index row and the certificate's
        assert ledger.claim_expiry_stage(watch, "30d", NOW) is not None
        assert ledger.expiry_rows_read == before + 1
    finally:
        ledger.close()


def test_on_tables_a_device_whose_certificate_expired_takes_its_next_one_without_a_retry(azurite):
    """Marking a certificate expired remembers the device's head as written (its new etag), as a
    revocation does: the device's next certificate costs what it costs after a revocation, with no
    commit refused as stale (Storage bills every request)."""
    ledger = open_ledger(("tables", azurite.connection_string, table_prefix()))
    try:
        ledger.add_ca(_ca())
        _issue(ledger, _cert("A1", "dev-a", "ka", days=20), _cert("B1", "dev-b", "kb", days=20))
        later = NOW + timedelta(days=21)
        watches = {w.serial: w for w in ledger.expiry_watch(NOW + timedelta(days=30))}
        assert ledger.mark_expired(watches["A1"], later) is not None
        ledger.revoke_certificate("B1", "keyCompromise", later)
        costs = []
        for serial, device, key in (("A2", "dev-a", "ka2"), ("B2", "dev-b", "kb2")):
            start = ledger.store.counter.requests
            _issue(ledger, _cert(serial, device, key, at=later))
            costs.append(ledger.store.counter.requests - start)
        assert costs[0] == costs[1], costs
        assert ledger.active_certificates(["dev-a", "dev-b"]).keys() == {"dev-a", "dev-b"}
    finally:
        ledger.close()


def _claim_all(spec: tuple, stage: str, start, results) -> None:
    ledger = open_ledger(spec)
    try:
        watches = ledger.expiry_watch(NOW + timedelta(days=30))
        start.wait()
        results.put(sorted(w.serial for w in watches if ledger.claim_expiry_stage(w, stage, NOW)))
    finally:
        ledger.close()


@pytest.mark.child_process
def test_processes_racing_claim_each_stage_once(store, store_spec):
    serials = [f"{i:02X}" for i in range(20)]
    _issue(store, *(_cert(s, f"dev-{s}", f"k{s}", days=5) for s in serials))
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(3), context.Queue()
    processes = [context.Process(target=_claim_all, args=(store_spec, "7d", start, results)) for _ in range(3)]
    for process in processes:
        process.start()
    won = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join()
    assert sorted(s for claims in won for s in claims) == serials


def test_the_scan_reads_about_one_row_per_finding_however_large_the_history(store):
    """Superseded and revoked certificates in the window are read once (Tables retires their index rows;
    SQLite's index holds only active ones); certificates outside the window are never read."""
    _issue(store, *(_cert(f"F{i:02X}", f"far-{i}", f"kf{i}", days=300) for i in range(30)))
    _issue(store, *(_cert(f"N{i:02X}", f"near-{i}", f"kn{i}", days=10) for i in range(5)))
    _issue(store, *(_cert(f"R{i:02X}", f"old-{i}", f"kr{i}", days=12) for i in range(4)))
    renewed = NOW + timedelta(minutes=30)
    _issue(store, *(_cert(f"S{i:02X}", f"old-{i}", f"ks{i}", days=300, at=renewed) for i in range(4)), supersede=True)
    per_finding = 2 if isinstance(store, TableLedger) else 1

    assert store.expiry_rows_read == 0  # nothing read yet
    before = store.expiry_rows_read
    assert len(store.expiry_watch(NOW + timedelta(days=30))) == 5
    first = store.expiry_rows_read - before
    before = store.expiry_rows_read
    assert len(store.expiry_watch(NOW + timedelta(days=30))) == 5
    second = store.expiry_rows_read - before
    assert second == 5 * per_finding
    if isinstance(store, TableLedger):
        assert first == 9 * per_finding  # the four superseded ones once, then their rows are retired
        expiry_rows = [r for r in table_rows(store, INDEX) if r["PartitionKey"].startswith("exp-")]
        assert len(expiry_rows) == 30 + 5 + 4
        # the listing of superseded certificates ending soon still finds them (by a scan of the devices)
        listed = store.list_certificates(
            CertificateQuery(status="superseded", expiring_before=NOW + timedelta(days=30))
        )
        assert sorted(c.serial for c in listed.items) == [f"R{i:02X}" for i in range(4)]
    else:
        assert first == 5


def test_sqlite_reads_the_window_through_the_index_of_active_certificates(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    try:
        plan = ledger._read(
            "EXPLAIN QUERY PLAN SELECT c.serial FROM certificates c INDEXED BY active_certificates_by_not_after "
            "WHERE c.status = 'active' AND c.not_after <= ?",
            ("2030-01-01T00:00:00Z",),
        )
        assert "USING INDEX active_certificates_by_not_after (not_after<?)" in " ".join(row["detail"] for row in plan)
    finally:
        ledger.close()


def test_a_schema_2_ledger_is_migrated_to_schema_4_with_the_expired_status(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SCHEMA_2.read_text())
    db.executescript(
        """
        INSERT INTO cas VALUES ('int-1', 'intermediate', 'CA', 'P-256', 'k', 'local', 'S1', '2026-01-01T00:00:00Z',
          '2036-01-01T00:00:00Z', 'PEM', NULL, '2026-01-01T00:00:00Z', 'active', '{}');
        INSERT INTO devices VALUES ('dev-1', 'factory-x', '2026-01-01T00:00:00Z');
        INSERT INTO key_bindings (public_key_sha256, device_id) VALUES ('k1', 'dev-1'), ('k2', 'dev-1');
        INSERT INTO certificates (serial, device_id, intermediate_id, requested_by, public_key_sha256, not_before,
          not_after, certificate_pem, created_at, status, status_changed_at, status_reason)
        VALUES ('01', 'dev-1', 'int-1', 'factory-x', 'k1', '2026-01-01T00:00:00Z', '2026-02-01T00:00:00Z', 'PEM 01',
          '2026-01-01T00:00:00Z', 'superseded', '2026-01-02T00:00:00Z', 'renewed as 02'),
          ('02', 'dev-1', 'int-1', 'factory-x', 'k2', '2026-01-02T00:00:00Z', '2026-01-20T00:00:00Z', 'PEM 02',
          '2026-01-02T00:00:00Z', 'active', NULL, NULL);
        """
    )
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        db.execute("UPDATE certificates SET status = 'expired' WHERE serial = '02'")
    db.close()

    ledger = SqliteLedger(path)
    try:
        db = ledger._connection()
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        old = ledger.get_certificate("01")
        assert (old.status, old.status_reason) == ("superseded", "renewed as 02")
        (watch,) = ledger.expiry_watch(NOW + timedelta(days=30))
        assert watch.serial == "02"
        assert ledger.mark_expired(watch, NOW + timedelta(days=20)).status == CERT_EXPIRED
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger')")}
        assert {
            "one_active_certificate_per_device",
            "certificates_by_not_after",
            "active_certificates_by_not_after",
            "certificate_key_bound_to_device",
            "certificate_device_owned",
        } <= names
        # the rules still hold on the rebuilt table, and its sequence goes on
        with pytest.raises(sqlite3.IntegrityError, match="not bound"):
            db.execute(
                "INSERT INTO certificates (serial, device_id, intermediate_id, requested_by, public_key_sha256, "
                "not_before, not_after, certificate_pem, created_at, status) VALUES "
                "('03', 'dev-1', 'int-1', 'x', 'k9', 'a', 'b', 'c', 'd', 'active')"
            )
        _issue(ledger, _cert("04", "dev-1", "k4", by="factory-x"))
        assert db.execute("SELECT seq FROM certificates WHERE serial = '04'").fetchone()[0] == 3
        tables = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        migrated = [row[0] for row in db.execute(tables)]
        schema_version = db.execute("PRAGMA schema_version").fetchone()[0]
    finally:
        ledger.close()
    fresh = SqliteLedger(tmp_path / "fresh.sqlite3")
    try:  # the same tables, by the names as written (a later migration finds them in sqlite_master)
        assert migrated == [row[0] for row in fresh._connection().execute(tables)]
    finally:
        fresh.close()
    reopened = SqliteLedger(path)  # a second start finds nothing to migrate: the schema is left as it is
    try:
        assert [c.serial for c in reopened.list_certificates(CertificateQuery()).items] == ["01", "02", "04"]
        assert reopened._connection().execute("PRAGMA schema_version").fetchone()[0] == schema_version
    finally:
        reopened.close()


def test_a_certificates_table_this_version_does_not_know_is_refused_not_rewritten(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    table = "CREATE TABLE certificates (serial TEXT PRIMARY KEY, status TEXT CHECK (status IN ('active', 'gone')))"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(table)
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="not one this version can migrate"):
        SqliteLedger(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT sql FROM sqlite_master WHERE name = 'certificates'").fetchone()[0] == table
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
