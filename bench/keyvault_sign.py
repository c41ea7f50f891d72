"""Signing through the Key Vault backend at the vault's throttle limit.

N pre-made P-256 CSRs are signed by a P-256 intermediate whose key is in a fake Key Vault (the real
azure-keyvault clients; the fake answers at the HTTP level) that takes `--latency` per sign call and
throttles signs to `--throttle` a second (the EC-HSM limit, 2,000 per 10 s), answering 429 without
Retry-After above it. Prints certificates a second and the ratio to the throttle, first with the default
settings (signs paced to the limit, retried on 429), then with pacing off (429s and retries only).

    python bench/keyvault_sign.py [--count 2000] [--latency 0.03] [--throttle 200]
"""

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import device_csrs  # noqa: E402

from shared.config import Settings  # noqa: E402
from shared.dps.offline import OfflineDps  # noqa: E402
from shared.keys.keyvault import KeyVaultKeyStore, KeyVaultOptions  # noqa: E402
from shared.ledger.models import CertificateQuery  # noqa: E402
from shared.ledger.sqlite import SqliteLedger  # noqa: E402
from shared.service import DeviceCA, IssuedCertificate, SignRequest  # noqa: E402
from tests.fakes.keyvault import VAULT_URL, FakeCredential, FakeKeyVault  # noqa: E402


def run(requests: list[SignRequest], options: KeyVaultOptions, args: argparse.Namespace, home: Path) -> dict:
    vault = FakeKeyVault()
    keys = KeyVaultKeyStore(VAULT_URL, FakeCredential(), options, session=vault.session())
    service = DeviceCA(keys, SqliteLedger(home / "ledger.sqlite3"), OfflineDps(home), Settings(pki_home=home))
    try:
        service.create_root()
        service.create_intermediate("bench")
        vault.sign_latency = args.latency  # from here on: the conditions measured
        vault.throttle = FakeKeyVault(sign_rate=args.throttle).throttle
        time.sleep(1.0)  # let the throttle's bucket fill as after a quiet second
        before = len(vault.statuses)
        started = time.perf_counter()
        results = service.sign_csrs(requests, requested_by="bench")
        elapsed = time.perf_counter() - started
        answers = Counter(status for _, path, status in vault.statuses[before:] if path.endswith("/sign"))
        issued = sum(isinstance(result, IssuedCertificate) and result.created for result in results)
        stored = len(service.ledger.list_certificates(CertificateQuery(limit=len(requests) + 1)).items)
        return {
            "rate": len(requests) / elapsed,
            "issued": issued,
            "stored": stored,
            "failed": len(requests) - issued,
            "answers": dict(answers),
            "in_flight": vault.most_in_flight,
        }
    finally:
        service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.03, help="seconds per sign call (default 0.03)")
    parser.add_argument("--throttle", type=float, default=200.0, help="signs a second the vault allows (default 200)")
    args = parser.parse_args()
    requests = [SignRequest(csr, device_id) for device_id, csr in device_csrs(args.count, "kv-device")]
    default = Settings.from_values({"KEY_VAULT_URL": VAULT_URL}).key_vault_options()
    print(
        f"keyvault_sign: {args.count} P-256 CSRs through the Key Vault backend; fake vault with "
        f"{args.latency * 1000:.0f} ms per sign and a throttle of {args.throttle:.0f} signs/s (429 above it)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        for label, options in (
            (
                f"default settings (paced to {default.sign_rate:.0f}/s, {default.parallel_signatures} in flight)",
                default,
            ),
            ("pacing off (KEY_VAULT_SIGN_RATE=0: 429s and retries only)", replace(default, sign_rate=None)),
        ):
            result = run(requests, options, args, Path(tmp) / label.split()[0])
            ratio = result["rate"] / args.throttle
            print(f"  {label}:")
            print(
                f"    {result['rate']:6.1f} certificates/s, ratio to the throttle {ratio:.2f}; "
                f"failed {result['failed']}, in the ledger {result['stored']}; "
                f"sign answers {result['answers']}; at most {result['in_flight']} signs in flight"
            )
            if label.startswith("default"):
                met = ratio >= 0.9 and result["failed"] == 0
                print(f"    target ratio >= 0.9 with no failed certificate: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
