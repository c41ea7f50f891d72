"""In-process signing rate against `openssl x509 -req`, measured in the same run on one core.

Signs N pre-made P-256 CSRs with a local P-256 intermediate through the service (CSR policy, signing,
durable ledger commit), and the same CSRs with `openssl x509 -req` once per certificate (how the seed's
tooling and Azure's test scripts issue them). Prints both rates, the ratio, and our fraction of this
machine's ECDSA P-256 verify+sign limit from `openssl speed` (every certificate costs one CSR verify
and one signature).

    python bench/sign_throughput.py [--count 2000] [--batch 250] [--rounds 3] [--cpu 0]
"""

import argparse
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from common import device_csrs

from shared.composition import build_service
from shared.config import Settings
from shared.ledger.models import CertificateQuery
from shared.service import DeviceCA, IssuedCertificate, SignRequest

DEVICE_EXTENSIONS = """[device]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def fresh_ca(home: Path) -> DeviceCA:
    service = build_service(Settings(pki_home=home, ca_curve="P-256"))
    service.create_root()
    service.create_intermediate("bench")
    return service


def time_batches(service: DeviceCA, requests: list[SignRequest], batch: int) -> float:
    started = time.perf_counter()
    issued = 0
    for start in range(0, len(requests), batch):
        results = service.sign_csrs(requests[start : start + batch], requested_by="bench")
        issued += sum(isinstance(r, IssuedCertificate) and r.created for r in results)
    elapsed = time.perf_counter() - started
    _check_all_recorded(service, requests, issued)
    return len(requests) / elapsed


def time_one_by_one(service: DeviceCA, requests: list[SignRequest]) -> float:
    started = time.perf_counter()
    issued = sum(service.sign_csr(r.csr, r.device_id, requested_by="bench").created for r in requests)
    elapsed = time.perf_counter() - started
    _check_all_recorded(service, requests, issued)
    return len(requests) / elapsed


def _check_all_recorded(service: DeviceCA, requests: list[SignRequest], issued: int) -> None:
    stored = service.ledger.list_certificates(CertificateQuery(limit=len(requests) + 1)).items
    if issued != len(requests) or len(stored) != len(requests):
        raise SystemExit(f"bench: expected {len(requests)} certificates, issued {issued}, ledger holds {len(stored)}")


def time_openssl(service: DeviceCA, requests: list[SignRequest], work: Path) -> float:
    intermediate = service.intermediate("bench")
    ca_cert, ca_key, extensions = work / "int.pem", work / "int.key.pem", work / "device.cnf"
    ca_cert.write_text(intermediate.certificate_pem)
    ca_key.write_bytes((service.settings.pki_home / "keys" / f"{intermediate.key_name}.key.pem").read_bytes())
    extensions.write_text(DEVICE_EXTENSIONS)
    csr_dir = work / "csr"
    csr_dir.mkdir()
    files = []
    for index, request in enumerate(requests):
        path = csr_dir / f"{index}.csr"
        path.write_bytes(request.csr)
        files.append(path)
    started = time.perf_counter()
    for path in files:
        subprocess.run(
            ["openssl", "x509", "-req", "-in", str(path), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-set_serial", f"0x{secrets.token_hex(16)}", "-days", "365", "-sha256",
             "-extfile", str(extensions), "-extensions", "device", "-out", str(path.with_suffix(".pem"))],
            check=True,
            capture_output=True,
        )  # fmt: skip
    return len(files) / (time.perf_counter() - started)


def openssl_speed() -> tuple[float, float]:
    output = subprocess.run(
        ["openssl", "speed", "-seconds", "3", "ecdsap256"], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", output)
    if not match:
        raise SystemExit(f"bench: cannot read openssl speed output:\n{output}")
    return float(match.group(1)), float(match.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="CSRs to sign (default 2000)")
    parser.add_argument("--batch", type=int, default=250, help="CSRs per ledger commit (default 250)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of our signing; the best counts (default 3)")
    parser.add_argument("--cpu", type=int, default=0, help="the one CPU to run on (default 0)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})

    print(f"sign_throughput: {args.count} P-256 CSRs, local P-256 intermediate, one core (CPU {args.cpu})")
    requests = [SignRequest(csr, device_id) for device_id, csr in device_csrs(args.count, "bench-device")]
    with tempfile.TemporaryDirectory(prefix="bench-sign-") as tmp:
        work = Path(tmp)
        batch_rates, single_rates = [], []
        for round_ in range(args.rounds):
            service = fresh_ca(work / f"batch-{round_}")
            batch_rates.append(time_batches(service, requests, args.batch))
            service.close()
            service = fresh_ca(work / f"single-{round_}")
            single_rates.append(time_one_by_one(service, requests[: max(1, args.count // 4)]))
            if round_ < args.rounds - 1:
                service.close()
        openssl_rate = time_openssl(service, requests, work)
        service.close()
    sign_speed, verify_speed = openssl_speed()
    limit = 1 / (1 / sign_speed + 1 / verify_speed)
    ours = max(batch_rates)

    def rates(values: list[float]) -> str:
        return ", ".join(f"{v:.0f}" for v in values)

    print(
        f"  ours, {args.batch} per durable commit:         {ours:8.0f} certificates/s  (rounds: {rates(batch_rates)})"
    )
    print(
        f"  ours, one certificate per commit:        {max(single_rates):8.0f} certificates/s  "
        f"(rounds: {rates(single_rates)}; {max(1, args.count // 4)} CSRs)"
    )
    print(f"  openssl x509 -req, one process each:     {openssl_rate:8.0f} certificates/s")
    print(f"  ratio ours / openssl:                    {ours / openssl_rate:8.1f}x")
    print(f"  openssl speed ecdsap256: sign {sign_speed:.0f}/s, verify {verify_speed:.0f}/s")
    print(f"  verify+sign limit of this core:          {limit:8.0f} certificates/s")
    print(f"  ours as a fraction of that limit:        {ours / limit:8.2f}")
    print(f"  target 4000/s on one core: {'met' if ours >= 4000 else 'NOT met'}")


if __name__ == "__main__":
    main()
