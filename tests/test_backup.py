"""`backup DEST`: one consistent copy of a CA in use, restored by pointing PKI_HOME at it; a checkpoint on close."""

import json
import sqlite3
import stat
from pathlib import Path

import pytest

from shared.errors import CaError
from shared.ledger.models import CertificateQuery

from .conftest import run_cli
from .csrs import make_csr


@pytest.fixture
def ledger_backend() -> str:
    """SQLite only: `backup` copies a SQLite ledger; on Table Storage it is refused (tests/test_ledger_tables.py)."""
    return "sqlite"


def _serials(home: Path, cwd: Path) -> list[str]:
    done = run_cli("list-certificates", "--limit", "1000", "--json", home=home, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return [item["serialNumber"] for item in json.loads(done.stdout)["items"]]


def test_a_backup_of_a_ca_in_use_restores_every_certificate(service, tmp_path):
    home = service.settings.pki_home
    issued = [service.sign_csr(make_csr(f"dev-{n}"), f"dev-{n}").record.serial for n in range(12)]
    service.revoke(issued[0], "keyCompromise")
    wal = home / "ledger.sqlite3-wal"
    assert wal.exists() and wal.stat().st_size > 0  # the service is open: recent rows are in the WAL only

    done = run_cli("backup", str(tmp_path / "copy"), "--json", home=home, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["cas"], report["certificates"]) == (2, 12)
    copy = tmp_path / "copy"
    assert sorted(p.name for p in copy.iterdir()) == ["dps-offline", "keys", "ledger.sqlite3"]  # one ledger file
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(key.stat().st_mode) == 0o600 for key in (copy / "keys").glob("*.key.pem"))

    # Restored: PKI_HOME pointed at the copy lists every certificate, with its status, and signs.
    assert _serials(copy, tmp_path) == issued
    revoked = run_cli("list-certificates", "--status", "revoked", "--json", home=copy, cwd=tmp_path)
    assert [c["serialNumber"] for c in json.loads(revoked.stdout)["items"]] == [issued[0]]
    (tmp_path / "dev-new.csr").write_bytes(make_csr("dev-new"))
    signed = run_cli("sign-csr", "dev-new.csr", "--device-id", "dev-new", home=copy, cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    assert len(service.ledger.list_certificates(CertificateQuery(limit=1000)).items) == 12  # the original is as it was


def test_a_backup_never_mixes_with_other_files(service, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("mine")
    for destination in (tmp_path / "full", tmp_path / "full" / "something", tmp_path / "no" / "such"):
        with pytest.raises(CaError) as refused:
            service.backup(destination)
        assert refused.value.code == "backup-destination"
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["something"]
    (tmp_path / "empty").mkdir()
    assert service.backup(tmp_path / "empty").certificates == 0
    assert stat.S_IMODE((tmp_path / "empty" / "ledger.sqlite3").stat().st_mode) == 0o600  # the CA's records: ours only


def test_closing_the_ledger_leaves_it_in_one_file(service, tmp_path):
    """On close (the end of `serve` and of every command) the WAL is checkpointed: the file alone is the ledger."""
    home = service.settings.pki_home
    serial = service.sign_csr(make_csr("dev-1"), "dev-1").record.serial
    wal = home / "ledger.sqlite3-wal"
    other = _opened(home / "ledger.sqlite3")  # another process's connection: SQLite's own last-close
    try:  # checkpoint does not happen while it is open
        assert wal.stat().st_size > 0
        service.ledger.close()
        assert wal.stat().st_size == 0
    finally:
        other.close()
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "ledger.sqlite3").write_bytes((home / "ledger.sqlite3").read_bytes())  # the file, copied alone
    assert _serials(alone, tmp_path) == [serial]


def _opened(ledger: Path) -> sqlite3.Connection:
    """A connection that has read the ledger, so that it holds it open (sqlite3.connect alone opens nothing)."""
    connection = sqlite3.connect(ledger)
    connection.execute("SELECT count(*) FROM cas").fetchone()
    return connection


def test_a_backup_inside_pki_home_is_refused(service):
    inside = service.settings.pki_home / "backups" / "today"
    (service.settings.pki_home / "backups").mkdir()
    with pytest.raises(CaError) as refused:
        service.backup(inside)
    assert refused.value.code == "backup-destination" and "inside PKI_HOME" in refused.value.message
    assert not inside.exists()
