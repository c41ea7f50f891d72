"""The expiry scan on a large fleet: its time and the ledger rows it reads, on SQLite and on Table Storage
(Azurite), at two fleet sizes, to show that both grow with the findings and not with the fleet.

The fleets are built by inserting ledger rows directly (signing a million certificates is not the point):
on SQLite, each certificate's rows as the ledger keeps them (its device and owner, its key binding, the
certificate with a placeholder instead of its PEM); on Table Storage, each certificate's expiry index row
(what the scan's range query reads), and for the certificates inside the window also their device
partition (head and certificate row, the point read a finding costs). Certificates outside the window have
no device rows there: the scan never reads them, which is the claim being measured. notAfter is spread
evenly over days 31-730 for the fleet and over days 1-29 for the certificates expiring within 30 days.

For each store, three fleets in one growing ledger:
  a. the small fleet, 1% expiring within 30 days
  b. ten times the fleet, the same certificates expiring (so 0.1%): rows and time should stay as in a
  c. the large fleet with 1% expiring: rows and time should grow tenfold from b
and for each, two scans as the timer runs them: the first (every finding is new: claimed and announced
on an in-process queue) and the next (nothing new, the daily cost). Rows read are counted by the ledger
(rows its expiry queries return; on SQLite the query plan shows the partial index, so no other row is
visited); the two CA records (root, intermediate) are two of each scan's rows. Times are this machine's;
Azurite is a single Node process on the same cores.

    python bench/expiry_scan.py [--sqlite 1000000] [--tables 100000] [--expiring 0.01]
"""

import argparse
import logging
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.composition import build_service
from shared.config import Settings
from shared.ledger.sqlite import SqliteLedger
from shared.ledger.tables import DEVICES, INDEX, MAX_TRANSACTION_OPERATIONS, TableLedger
from shared.service import DeviceCA
from tests.azurite import Azurite, table_prefix

NOW = datetime.now(UTC).replace(microsecond=0)
WINDOW_DAYS = 30


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _not_after(index: int, count: int, expiring: bool) -> datetime:
    """Evenly over days 1-29 (expiring) or 31-730 (the rest of the fleet), to the second."""
    low, high = (1, 29) if expiring else (31, 730)
    seconds = int((low + (high - low) * index / max(count, 1)) * 86400)
    return NOW + timedelta(seconds=seconds)


def _certificates(start: int, count: int, expiring: bool, prefix: str):
    for index in range(count):
        number = start + index
        serial = f"{number:040X}"
        yield serial, f"{prefix}-{number:07d}", f"{number:064x}", _not_after(index, count, expiring)


def _fill_sqlite(path: Path, intermediate: str, start: int, count: int, expiring: bool) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")  # building a fixture: durability is not what is measured
    db.execute("BEGIN")
    created = _ts(NOW - timedelta(days=1))
    rows = list(_certificates(start, count, expiring, "dev"))
    db.executemany("INSERT INTO devices VALUES (?, 'bench', ?)", [(d, created) for _, d, _, _ in rows])
    db.executemany(
        "INSERT INTO key_bindings (public_key_sha256, device_id) VALUES (?, ?)", [(k, d) for _, d, k, _ in rows]
    )
    db.executemany(
        "INSERT INTO certificates (serial, device_id, intermediate_id, requested_by, public_key_sha256, not_before, "
        "not_after, certificate_pem, created_at, status) VALUES (?, ?, ?, 'bench', ?, ?, ?, '-', ?, 'active')",
        [(s, d, intermediate, k, created, _ts(end), created) for s, d, k, end in rows],
    )
    db.execute("COMMIT")
    db.close()


def _fill_tables(ledger: TableLedger, intermediate: str, start: int, count: int, expiring: bool) -> None:
    created = NOW - timedelta(days=1)
    stamp = created.strftime("%Y%m%d%H%M%S")
    by_day: dict[str, list[dict]] = {}
    devices = []
    for serial, device, key, end in _certificates(start, count, expiring, "dev"):
        cert_row = f"c-{stamp}-{serial}"
        pointer = {"device_id": device, "cert_row": cert_row, "serial": serial}
        row = {"PartitionKey": f"exp-{end:%Y-%m-%d}", "RowKey": f"{end:%Y%m%d%H%M%S}-{serial}", **pointer}
        by_day.setdefault(row["PartitionKey"], []).append(row)
        if expiring:
            fields = {
                "serial": serial,
                "device_id": device,
                "intermediate_id": intermediate,
                "requested_by": "bench",
                "public_key_sha256": key,
                "not_before": _ts(created),
                "not_after": _ts(end),
                "certificate_pem": "-",
                "created_at": _ts(created),
                "status": "active",
                "status_changed_at": "",
                "status_reason": "",
            }
            devices.append((device, cert_row, fields))
    index = ledger.store.table(INDEX)
    chunks = [rows[i : i + MAX_TRANSACTION_OPERATIONS] for rows in by_day.values() for i in range(0, len(rows), 100)]
    ledger._parallel(lambda chunk: index.submit_transaction([("create", row) for row in chunk]), chunks)
    table = ledger.store.table(DEVICES)

    def device_partition(item) -> None:
        import json

        device, cert_row, fields = item
        head = {
            "PartitionKey": device,
            "RowKey": "head",
            "owner": "bench",
            "created_at": _ts(created),
            "revoked_keys": "[]",
            "active": json.dumps(fields),
        }
        table.submit_transaction([("create", head), ("create", {"PartitionKey": device, "RowKey": cert_row, **fields})])

    ledger._parallel(device_partition, devices)


def _scan(service: DeviceCA) -> tuple[float, int, int, int]:
    """One timer run: seconds, findings, announced, rows read."""
    started = time.perf_counter()
    report = service.scan_expiring()
    elapsed = time.perf_counter() - started
    assert not report.failures, report.failures
    while service.expiry_queue.take() is not None:
        pass
    return elapsed, len(report.findings), len(report.announced), report.rows_read


def _measure(name: str, fleet_size: int, expiring: float, work: Path, azurite: Azurite | None) -> list[tuple]:
    settings = Settings(pki_home=work / name)
    if azurite is not None:
        settings = Settings(
            pki_home=work / name, ledger_tables=azurite.connection_string, ledger_table_prefix=table_prefix()
        )
    service = build_service(settings, clock=lambda: NOW)
    service.create_root()
    intermediate = service.create_intermediate("bench").record.id
    small = fleet_size // 10
    steps = [  # (label, fleet certificates to add, expiring ones to add)
        (f"a. {small:,} certificates, 1% expiring", small - int(small * expiring), int(small * expiring)),
        (f"b. {fleet_size:,} certificates, the same expiring", fleet_size - small, 0),
        (
            f"c. {fleet_size:,} certificates, 1% expiring",
            0,
            int(fleet_size * expiring) - int(small * expiring),
        ),
    ]
    results = []
    total = 0
    try:
        for label, fleet, soon in steps:
            started = time.perf_counter()
            for count, is_expiring in ((fleet, False), (soon, True)):
                if not count:
                    continue
                if isinstance(service.ledger, SqliteLedger):
                    _fill_sqlite(service.ledger.path, intermediate, total, count, is_expiring)
                else:
                    _fill_tables(service.ledger, intermediate, total, count, is_expiring)
                total += count
            built = time.perf_counter() - started
            first = _scan(service)
            steady = _scan(service)
            results.append((label, total, built, first, steady))
            print(
                f"  {name} {label}: built in {built:.1f} s; first run {first[0]:.2f} s "
                f"({first[2]:,} announced, {first[3]:,} rows); next run {steady[0]:.3f} s ({steady[3]:,} rows)",
                flush=True,
            )
        if isinstance(service.ledger, SqliteLedger):
            plan = service.ledger._read(
                "EXPLAIN QUERY PLAN SELECT c.serial FROM certificates c INDEXED BY active_certificates_by_not_after "
                "WHERE c.status = 'active' AND c.not_after <= ?",
                (_ts(NOW + timedelta(days=WINDOW_DAYS)),),
            )
            print(f"  sqlite query plan: {' / '.join(row['detail'] for row in plan)}", flush=True)
    finally:
        service.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sqlite", type=int, default=1_000_000, help="the large SQLite fleet (default 1,000,000)")
    parser.add_argument("--tables", type=int, default=100_000, help="the large Azurite fleet (default 100,000)")
    parser.add_argument("--expiring", type=float, default=0.01, help="share expiring within 30 days (default 0.01)")
    args = parser.parse_args()
    # one warning line per notice is the service's way; thousands of them would bury the results here
    logging.getLogger("device_ca.expiry").setLevel(logging.ERROR)

    azurite = Azurite()
    try:
        with tempfile.TemporaryDirectory() as work:
            print("building and scanning (this takes a few minutes)", flush=True)
            measured = {
                "SQLite": _measure("sqlite", args.sqlite, args.expiring, Path(work), None),
                "Table Storage (Azurite)": _measure("tables", args.tables, args.expiring, Path(work), azurite),
            }
    finally:
        azurite.stop()

    print()
    print(
        "| ledger | fleet | findings | first run (announces all) | rows read | next run | rows read | rows / finding |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for store, rows in measured.items():
        for label, total, _, first, steady in rows:
            findings = steady[1]
            print(
                f"| {store} | {label} ({total:,}) | {findings:,} | {first[0]:.2f} s | {first[3]:,} | "
                f"{steady[0]:.3f} s | {steady[3]:,} | {steady[3] / max(findings, 1):.2f} |"
            )
    print()
    for store, rows in measured.items():
        (_, _, _, _, a), (_, _, _, _, b), (_, _, _, _, c) = rows
        print(
            f"{store}: ten times the fleet, the same findings: next run x{b[0] / a[0]:.2f} time, "
            f"x{b[3] / max(a[3], 1):.2f} rows; ten times the findings: x{c[0] / b[0]:.2f} time, "
            f"x{c[3] / max(b[3], 1):.2f} rows"
        )


if __name__ == "__main__":
    main()
