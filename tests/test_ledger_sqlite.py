"""What is SQLite's own: private files, durable pragmas, waits on other writers, checkpoints, commits on or off
the event loop, its cursors, and constraints that hold even against statements written by hand. The contract
both ledgers keep is in test_ledger.py."""

import asyncio
import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from shared.errors import BackendUnavailable, CaError
from shared.ledger.models import CertificateQuery, Issuance
from shared.ledger.sqlite import SqliteLedger

from .test_ledger import NOW, _ca, _cert


@pytest.fixture
def ledger(tmp_path) -> SqliteLedger:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    ledger.add_ca(_ca())
    yield ledger
    ledger.close()


def test_a_new_ledger_makes_its_directory_and_its_lock_file_private(tmp_path):
    ledger = SqliteLedger(tmp_path / "home" / "pki" / "ledger.sqlite3")
    try:
        assert stat.S_IMODE((tmp_path / "home" / "pki").stat().st_mode) == 0o700
        # no one else may open the lock file: flock needs no write access, so a reader could block every writer
        assert stat.S_IMODE(Path(f"{ledger.path}.lock").stat().st_mode) == 0o600
    finally:
        ledger.close()


def _open_files() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_closing_releases_every_file_the_ledger_opened(tmp_path):
    before = _open_files()
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    ledger.add_ca(_ca())
    ledger.precheck(["dev-1"], ["k1"])  # its snapshot connection too
    ledger.close()
    ledger.close()  # again: nothing left to close, and nothing else closed
    assert _open_files() == before


def test_a_lock_file_on_descriptor_0_is_closed_too(tmp_path):
    """A daemon may run with stdin closed: the ledger's lock file then gets descriptor 0, a valid one."""
    stdin = os.dup(0)
    os.close(0)
    try:
        ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
        assert ledger._lock_file == 0
        ledger.add_ca(_ca())
        other = sqlite3.connect(ledger.path)  # open elsewhere: SQLite's own last-close checkpoint does not happen
        other.execute("SELECT count(*) FROM cas").fetchone()
        ledger.close()
        assert (tmp_path / "ledger.sqlite3-wal").stat().st_size == 0  # the ledger's checkpoint on close
        other.close()
        with pytest.raises(OSError):
            os.fstat(0)  # closed
    finally:
        os.dup2(stdin, 0)
        os.close(stdin)


def _write_locked(path: Path, release_after: float) -> threading.Timer:
    """Another connection holds the write lock (not through the ledger) and lets it go after `release_after`."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(release_after, lambda: (other.execute("COMMIT"), other.close()))
    release.start()
    return release


def test_a_write_waits_for_another_writer_as_long_as_the_busy_timeout_says(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    impatient = SqliteLedger(path, busy_timeout_seconds=0.0)
    release = _write_locked(path, 0.5)
    try:
        with pytest.raises(BackendUnavailable) as busy:
            impatient.add_ca(_ca())  # no wait at all, though the lock is let go soon
        assert busy.value.code == "ledger-busy"
    finally:
        release.join()
        impatient.close()
    patient = SqliteLedger(path, busy_timeout_seconds=60.0)
    try:
        patient.checkpoint()  # which waits on no one, and then waits as long as before
        release = _write_locked(path, 0.5)
        patient.add_ca(_ca())
        release.join()
        assert patient.get_ca("int-1") is not None
    finally:
        patient.close()


def test_a_checkpoint_says_whether_it_emptied_the_wal(ledger):
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    wal = Path(f"{ledger.path}-wal")
    reader = sqlite3.connect(ledger.path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM certificates").fetchone()  # a reader that still needs the WAL
    assert ledger.checkpoint() is False
    reader.execute("COMMIT")
    assert ledger.checkpoint() is True and wal.stat().st_size == 0
    reader.execute("BEGIN IMMEDIATE")  # a writer, though the WAL is empty
    try:
        assert ledger.checkpoint() is False
    finally:
        reader.execute("COMMIT")
        reader.close()


def test_a_checkpoint_from_a_thread_that_never_used_the_ledger(ledger):
    """close() may come from another thread than the ledger's work (a server's shutdown): it checkpoints too."""
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    done: list[bool] = []
    thread = threading.Thread(target=lambda: done.append(ledger.checkpoint()))
    thread.start()
    thread.join()
    assert done == [True] and Path(f"{ledger.path}-wal").stat().st_size == 0


def test_pragmas_make_commits_durable(ledger):
    db = sqlite3.connect(ledger.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def _commit_threads(ledger: SqliteLedger, count: int) -> tuple[str, list[str]]:
    """Records `count` certificates one by one on an event loop: the loop's thread, and the thread of each COMMIT."""
    committed_on: list[str] = []
    ledger._connection().set_trace_callback(
        lambda statement: committed_on.append(threading.current_thread().name) if statement == "COMMIT" else None
    )

    async def record() -> str:
        for serial in range(1, count + 1):
            assert await ledger.record_issued_async([Issuance(_cert(f"{serial:02X}", f"dev-{serial}", f"k{serial}"))])
        return threading.current_thread().name

    loop_thread = asyncio.run(record())
    assert len(committed_on) == count
    return loop_thread, committed_on


def test_event_loop_commits_go_to_a_thread_while_commits_are_slow_and_come_back_when_quick(tmp_path):
    # Commits count as quick here under a second, whatever this machine's disk; they start out slow.
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", inline_commit_seconds=1.0)
    ledger.add_ca(_ca())
    ledger._commit_seconds = 10.0
    loop_thread, committed_on = _commit_threads(ledger, 59)
    assert loop_thread not in committed_on[:5]  # in a thread while the average is slow: one quick commit is not enough
    assert committed_on[-1] == loop_thread  # these commits are quick: back on the loop
    assert len(ledger.list_certificates(CertificateQuery(limit=100)).items) == 59
    ledger.close()


def test_a_new_ledger_commits_on_the_event_loop_until_commits_prove_slow(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")  # the default threshold, whatever this machine's disk
    ledger.add_ca(_ca())
    loop_thread, committed_on = _commit_threads(ledger, 1)
    assert committed_on == [loop_thread]
    ledger.close()


def test_a_threshold_of_zero_keeps_every_event_loop_commit_in_a_thread(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", inline_commit_seconds=0.0)
    ledger.add_ca(_ca())
    loop_thread, committed_on = _commit_threads(ledger, 5)
    assert loop_thread not in committed_on  # the first commit too, before any was timed
    ledger.close()


def test_store_itself_refuses_a_second_active_certificate(ledger):
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    db = sqlite3.connect(ledger.path)
    db.execute("INSERT INTO key_bindings (public_key_sha256, device_id) VALUES ('k2', 'dev-1')")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        db.execute(
            "INSERT INTO certificates (serial, device_id, intermediate_id, requested_by, public_key_sha256, "
            "not_before, not_after, certificate_pem, created_at, status) "
            "VALUES ('02', 'dev-1', 'int-1', 't', 'k2', 'a', 'b', 'p', 'c', 'active')"
        )


def test_store_itself_refuses_a_key_bound_to_another_device(ledger):
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    db = sqlite3.connect(ledger.path)
    db.execute("INSERT INTO devices (device_id, owner, created_at) VALUES ('dev-2', 't', 'c')")
    with pytest.raises(sqlite3.IntegrityError, match="not bound to this device"):
        db.execute(
            "INSERT INTO certificates (serial, device_id, intermediate_id, requested_by, public_key_sha256, "
            "not_before, not_after, certificate_pem, created_at, status) "
            "VALUES ('02', 'dev-2', 'int-1', 't', 'k1', 'a', 'b', 'p', 'c', 'active')"
        )
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO key_bindings (public_key_sha256, device_id) VALUES ('k1', 'dev-2')")


def test_store_itself_refuses_a_revoked_key(ledger):
    """Even written around the ledger's checks, a certificate for a revoked key is refused by the store."""
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    ledger.revoke_certificate("01", "keyCompromise", NOW)
    db = sqlite3.connect(ledger.path)
    with pytest.raises(sqlite3.IntegrityError, match="not bound to this device"):
        db.execute(
            "INSERT INTO certificates (serial, device_id, intermediate_id, requested_by, public_key_sha256, "
            "not_before, not_after, certificate_pem, created_at, status) "
            "VALUES ('02', 'dev-1', 'int-1', 't', 'k1', 'a', 'b', 'p', 'c', 'active')"
        )


def test_store_itself_refuses_a_certificate_for_a_device_without_owner(ledger):
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    db = sqlite3.connect(ledger.path)
    db.execute("INSERT INTO key_bindings (public_key_sha256, device_id) VALUES ('k9', 'dev-9')")
    with pytest.raises(sqlite3.IntegrityError, match="device has no owner"):
        db.execute(
            "INSERT INTO certificates (serial, device_id, intermediate_id, requested_by, public_key_sha256, "
            "not_before, not_after, certificate_pem, created_at, status) "
            "VALUES ('02', 'dev-9', 'int-1', 't', 'k9', 'a', 'b', 'p', 'c', 'active')"
        )


def test_schema_1_ledgers_get_owners_from_their_first_certificates(ledger, tmp_path):
    """A ledger from before device ownership: each device is owned by whoever asked for its first one."""
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1", by="factory-x"))])
    ledger.record_issued([Issuance(_cert("02", "dev-1", "k2", by="admin"), supersede=True)])
    db = sqlite3.connect(ledger.path, isolation_level=None)
    db.executescript("DELETE FROM devices; PRAGMA user_version = 1;")
    db.close()
    ledger.close()
    reopened = SqliteLedger(ledger.path)
    try:
        assert reopened.device_owners(["dev-1"]) == {"dev-1": "factory-x"}
    finally:
        reopened.close()


def test_the_precheck_reads_one_moment(ledger):
    """Another process commits between the owners' read and the active certificates' read: the answer
    must not mix the two moments (no owner, yet the new owner's certificate)."""
    rival = SqliteLedger(ledger.path)
    reads: list[str] = []

    def between_reads(statement: str) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            reads.append(statement)
            if len(reads) == 2:  # after the owners were read, before the active certificates are
                rival.record_issued([Issuance(_cert("01", "dev-1", "k1", by="factory-x"), owner="factory-x")])

    probe = ledger._snapshot_connection()
    probe.set_trace_callback(between_reads)
    try:
        states = ledger.precheck(["dev-1"], ["k1"])
    finally:
        probe.set_trace_callback(None)
        rival.close()
    assert len(reads) >= 2
    assert (states.owners, states.actives, states.bindings) == ({}, {}, {})
    assert ledger.device_owners(["dev-1"]) == {"dev-1": "factory-x"}  # committed: seen by the next read


@pytest.mark.parametrize("commit_at", [1, 2, 3])
def test_the_precheck_reads_one_moment_whenever_another_process_commits(ledger, commit_at):
    """Another process commits as the precheck starts its first, second or third read, on whichever of the
    ledger's connections that read runs: the three answers are all from before, or all from after."""
    rival = SqliteLedger(ledger.path)
    reads: list[str] = []

    def before_read(statement: str) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            reads.append(statement)
            if len(reads) == commit_at:
                rival.record_issued([Issuance(_cert("01", "dev-1", "k1", by="factory-x"), owner="factory-x")])

    connections = (ledger._snapshot_connection(), ledger._connection())
    for connection in connections:
        connection.set_trace_callback(before_read)
    try:
        states = ledger.precheck(["dev-1"], ["k1"])
    finally:
        for connection in connections:
            connection.set_trace_callback(None)
        rival.close()
    assert len(reads) == 3
    answers = (states.owners, states.bindings, {d: c.serial for d, c in states.actives.items()})
    after = ({"dev-1": "factory-x"}, {"k1": ("dev-1", False)}, {"dev-1": "01"})
    assert answers in (({}, {}, {}), after)


def test_a_cursor_is_a_sequence_number_of_at_most_18_digits(ledger):
    """SQLite's integers stop at 19 digits: a longer cursor is refused as one this listing never gave."""
    ledger.record_issued([Issuance(_cert("01", "dev-1", "k1"))])
    assert ledger.list_certificates(CertificateQuery(cursor="9" * 18)).items == []
    for cursor in ("9" * 19, "1" + "0" * 18):
        with pytest.raises(CaError) as refused:
            ledger.list_certificates(CertificateQuery(cursor=cursor))
        assert refused.value.code == "invalid-cursor"


def test_long_lists_of_devices_and_keys_are_read_whole(ledger):
    """Lists longer than one query's IN (...) (500 names) are read in chunks, every name of them."""
    count = 1234
    records = [_cert(f"S{n:04d}", f"dev-{n:04d}", f"k{n:04d}") for n in range(count)]
    ledger.record_issued([Issuance(record) for record in records])
    devices, keys = [r.device_id for r in records], [r.public_key_sha256 for r in records]
    assert len(ledger.device_owners(devices)) == count
    assert len(ledger.active_certificates(devices)) == count
    assert len(ledger.key_bindings(keys)) == count
    ledger.revoke_certificate("S1233", "keyCompromise", NOW)
    assert ledger.devices_with_revocations(devices) == {"dev-1233"}
    precheck = ledger.precheck(devices, keys)
    assert (len(precheck.owners), len(precheck.bindings), len(precheck.actives)) == (count, count, count - 1)


def test_the_ledger_names_its_backend_and_file_for_the_operator(tmp_path):
    """`backends()` (the CLI's status, the health answer's backend names) says which file holds the ledger."""
    path = tmp_path / "pki" / "ledger.sqlite3"
    ledger = SqliteLedger(path)
    try:
        assert ledger.describe() == {"backend": "sqlite", "path": str(path)}
    finally:
        ledger.close()
