"""The Table Storage ledger against SQLite, measured in the same run: certificates a second, and Storage
transactions per certificate as counted by the pipeline policy (`TransactionCounter`, one per HTTP
request, each retry included), with what a million certificates would cost at list price.

Issues N pre-made P-256 CSRs through the service (CSR policy, signing with a local key, ledger commit),
in batches as a factory's batch or the API's coalesced requests arrive, and then one at a time; then
sends the same CSRs again (the same-CSR retry answers with the certificate on record). Table Storage is
Azurite here (in memory, on this machine): its rate says nothing of Azure's latency, but the
transaction counts are those Azure would bill.

    python bench/ledger_tables.py [--count 1000] [--batch 100] [--single 100] [--price-per-10k 0.00036]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import device_csrs

from shared.composition import build_service
from shared.config import Settings
from shared.service import DeviceCA, IssuedCertificate, SignRequest
from tests.azurite import Azurite, table_prefix

# Azure Table Storage, Standard general-purpose v2, LRS: USD per 10,000 transactions as published on
# Azure's pricing page when this was written (not checked from this machine, which has no internet:
# pass --price-per-10k for your region and redundancy).
PRICE_PER_10K = 0.00036
TARGET_NEW, TARGET_RETRY = 4.0, 1.0
LONE_CERTIFICATE = (
    "A certificate issued alone costs 7: the device head read (owner, active certificate: refusals sign\n"
    "nothing), the signing intermediate's record (read fresh so a disable takes effect on every instance),\n"
    "the serial, requester and expiry index rows (three partitions, three transactions), the key binding,\n"
    "and the device partition's transaction. Every rule sits in its own partition, so only grouping shares\n"
    "these: a batch, or the API's coalescing of concurrent requests, brings it under 4 (first rows)."
)


def fresh_ca(home: Path, **ledger: str) -> DeviceCA:
    service = build_service(Settings(pki_home=home, ca_curve="P-256", **ledger))
    service.create_root()
    service.create_intermediate("bench")
    return service


def transactions(service: DeviceCA) -> int:
    store = getattr(service.ledger, "store", None)
    return store.counter.count if store is not None else 0


def run(service: DeviceCA, requests: list[SignRequest], batch: int) -> tuple[float, int, bool]:
    """Certificates a second, Storage transactions used, and whether every one was newly created."""
    before = transactions(service)
    started = time.perf_counter()
    created = True
    for start in range(0, len(requests), batch):
        results = service.sign_csrs(requests[start : start + batch], requested_by="bench")
        for result in results:
            if not isinstance(result, IssuedCertificate):
                raise SystemExit(f"refused: {result}")
            created = created and result.created
    elapsed = time.perf_counter() - started
    return len(requests) / elapsed, transactions(service) - before, created


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="certificates issued in batches (default 1000)")
    parser.add_argument("--batch", type=int, default=100, help="CSRs per service call (default 100)")
    parser.add_argument("--single", type=int, default=100, help="certificates issued one at a time (default 100)")
    parser.add_argument("--price-per-10k", type=float, default=PRICE_PER_10K, help="USD per 10,000 transactions")
    args = parser.parse_args()

    batched = [SignRequest(csr, device) for device, csr in device_csrs(args.count, "batch")]
    single = [SignRequest(csr, device) for device, csr in device_csrs(args.single, "single")]
    azurite = Azurite()
    rows: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as work:
            ledgers = {
                "sqlite": {},
                "tables": {"ledger_tables": azurite.connection_string, "ledger_table_prefix": table_prefix()},
            }
            for name, ledger in ledgers.items():
                service = fresh_ca(Path(work) / name, **ledger)
                try:
                    new_rate, new_tx, created = run(service, batched, args.batch)
                    assert created, "a new certificate was not created"
                    retry_rate, retry_tx, created = run(service, batched, args.batch)
                    assert not created, "a same-CSR retry issued a new certificate"
                    one_rate, one_tx, _ = run(service, single, 1)
                    one_retry_rate, one_retry_tx, _ = run(service, single, 1)
                finally:
                    service.close()
                rows[name] = {
                    "new": new_rate,
                    "retry": retry_rate,
                    "one": one_rate,
                    "one retry": one_retry_rate,
                    "tx new": new_tx / args.count,
                    "tx retry": retry_tx / args.count,
                    "tx one": one_tx / args.single,
                    "tx one retry": one_retry_tx / args.single,
                }
    finally:
        azurite.stop()

    tables, sqlite = rows["tables"], rows["sqlite"]
    print(f"{args.count} certificates in batches of {args.batch}, then {args.single} one at a time (P-256, local key)")
    print()
    print("| | SQLite | Table Storage (Azurite) | Tables / SQLite |")
    print("| --- | --- | --- | --- |")
    for key, label in (
        ("new", f"new certificates/s, batches of {args.batch}"),
        ("retry", "same-CSR retries/s, batches"),
        ("one", "new certificates/s, one at a time"),
        ("one retry", "same-CSR retries/s, one at a time"),
    ):
        print(f"| {label} | {sqlite[key]:,.0f} | {tables[key]:,.0f} | {tables[key] / sqlite[key]:.2f} |")
    print()
    print("Storage transactions per certificate (counted by the pipeline policy):")
    print()
    print("| | per certificate | target | one million certificates at list price |")
    print("| --- | --- | --- | --- |")
    for key, label, target in (
        ("tx new", f"new, batches of {args.batch}", TARGET_NEW),
        ("tx retry", "same-CSR retry, batches", TARGET_RETRY),
        ("tx one", "new, one at a time", None),
        ("tx one retry", "same-CSR retry, one at a time", TARGET_RETRY),
    ):
        cost = tables[key] * 1_000_000 / 10_000 * args.price_per_10k
        if target is None:
            goal = "none (see below)"
        else:
            goal = f"at most {target:g} ({'met' if tables[key] <= target else 'missed'})"
        print(f"| {label} | {tables[key]:.2f} | {goal} | ${cost:,.2f} |")
    print()
    print(LONE_CERTIFICATE)
    print()
    print(f"Price: USD {args.price_per_10k} per 10,000 transactions (--price-per-10k).")


if __name__ == "__main__":
    main()
