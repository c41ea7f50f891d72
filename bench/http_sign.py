"""HTTP signing rate: our server (embedded default) against `cfssl serve`, in the same run.

N pre-made P-256 CSRs are posted one per request by C concurrent keep-alive clients, first to
`python cli.py serve` (API key auth, CSR policy, durable ledger commit per certificate), then to
`cfssl serve` with a P-256 CA (`/api/v1/cfssl/sign`, nothing recorded). Every request must succeed.
A third run gives cfssl its SQLite certificate database, so that it records every certificate as we do
(under many clients it refuses some with "database is locked"; those are reported, not counted).
A fourth measures the floor of our stack: bench/floor_app.py on uvicorn with as many workers, doing
only the CSR parse, its signature check and the certificate signature with `cryptography` (no auth,
no policy, no ledger). Prints the rates and the ratios; --profile also prints where our server spends
its time.

    python bench/http_sign.py [--count 2000] [--concurrency 16] [--workers 2] [--rounds 3] [--profile]
    python bench/http_sign.py --bounds [--count 2000] [--concurrency 16] [--workers 2] [--rounds 3]

--bounds measures only what serve's connection bounds cost (shared/api/connections.py: header bytes,
request deadline, connection cap, draining close): our server with them, as `serve` runs, against the
same server on uvicorn's own httptools protocol, in alternating rounds.

cfssl comes from the Debian package golang-cfssl (installed here when missing and running as root).
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import device_csrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parent.parent

CFSSL_CONFIG = {"signing": {"default": {"usages": ["digital signature", "client auth"], "expiry": "8760h"}}}


# -- a light HTTP/1.1 keep-alive client ---------------------------------------------------------------


async def _client(port: int, requests: list[bytes], next_index: Callable[[], int | None], statuses: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (index := next_index()) is not None:
            writer.write(requests[index])
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            statuses[index] = (int(status_line.split()[1]), body)
    finally:
        writer.close()


async def _post_all(port: int, requests: list[bytes], concurrency: int) -> tuple[float, list]:
    statuses: list = [None] * len(requests)
    counter = iter(range(len(requests)))

    def next_index() -> int | None:
        return next(counter, None)

    started = time.perf_counter()
    await asyncio.gather(*(_client(port, requests, next_index, statuses) for _ in range(concurrency)))
    return time.perf_counter() - started, statuses


def post_all(port: int, requests: list[bytes], concurrency: int) -> tuple[float, list]:
    try:
        import uvloop

        return uvloop.run(_post_all(port, requests, concurrency))
    except ImportError:
        return asyncio.run(_post_all(port, requests, concurrency))


def _request(path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- servers -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen) -> None:
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"bench: server exited:\n{process.stderr.read() if process.stderr else ''}")
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - loopback
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: {url} never answered")


class ServerLog(threading.Thread):
    """Drains a server's stderr and waits for uvicorn's "Uvicorn running on" of every worker: the first
    worker to answer is not enough, since the clients that connect earlier all land on it."""

    def __init__(self, process: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.process, self.lines, self.changed = process, [], threading.Condition()
        self.start()

    def run(self) -> None:
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for_workers(self, workers: int) -> None:
        def started() -> bool:
            return sum("Uvicorn running on" in line for line in self.lines) >= workers

        with self.changed:
            if not self.changed.wait_for(lambda: started() or self.process.poll() is not None, timeout=120):
                raise SystemExit(f"bench: the server did not start {workers} worker(s):\n{self.text()}")
        if not started():
            raise SystemExit(f"bench: the server exited:\n{self.text()}")

    def text(self) -> str:
        with self.changed:
            return "".join(self.lines[-30:])


def run_ours(
    csrs: list[tuple[str, bytes]], work: Path, args: argparse.Namespace, profile: Path | None = None
) -> tuple[float, list]:
    """Our server on a fresh PKI home; with `profile`, one worker under cProfile during the load only."""
    home, port = work / "pki", _free_port()
    serve = ["serve", "--bootstrap", "--json", "--port", str(port), "--log-level", "info", "--no-access-log"]
    if profile:
        command = [sys.executable, str(REPO / "bench" / "profiled_serve.py"), str(profile), *serve]
    else:
        command = [sys.executable, str(REPO / "cli.py"), *serve, "--workers", str(args.workers)]
    environment = {**os.environ, "PKI_HOME": str(home)}
    server = subprocess.Popen(
        command, cwd=work, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = ServerLog(server)
    try:
        banner = _read_json(server, log)
        key = banner["created"]["factory"]["apiKey"]
        log.wait_for_workers(1 if profile else args.workers)
        requests = [
            _request(
                f"/api/devices/{device_id}/certificate",
                {"Authorization": f"Bearer {key}", "Content-Type": "application/pkcs10"},
                csr,
            )
            for device_id, csr in csrs
        ]
        if profile:
            server.send_signal(signal.SIGUSR1)
        elapsed, statuses = post_all(port, requests, args.concurrency)
        if profile:
            server.send_signal(signal.SIGUSR2)
            time.sleep(1)  # the profile is written by the signal handler
    finally:
        server.send_signal(signal.SIGINT)
        server.wait()
        server.stdout.close()
    failed = [s for s in statuses if s is None or s[0] != 201]
    if failed:
        raise SystemExit(f"bench: {len(failed)} of our requests failed, e.g. {failed[0]}")
    return len(csrs) / elapsed, statuses


def _read_json(process: subprocess.Popen, log: ServerLog) -> dict:
    text = ""
    for line in process.stdout:
        text += line
        if line.startswith("}"):
            return json.loads(text)
    process.wait()
    raise SystemExit(f"bench: no banner from the server:\n{log.text()}")


def ensure_cfssl() -> str:
    path = shutil.which("cfssl")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "golang-cfssl"], check=True, capture_output=True)
        return shutil.which("cfssl") or "cfssl"
    raise SystemExit("bench: cfssl is missing; install the Debian package golang-cfssl")


# cfssl's certificate database (certdb/sqlite/migrations in its sources), so that it records every certificate
# it signs as we do; it runs on SQLite's defaults (rollback journal, synchronous=FULL).
CFSSL_CERTDB = """
CREATE TABLE certificates (
  serial_number blob NOT NULL, authority_key_identifier blob NOT NULL, ca_label blob, status blob NOT NULL,
  reason int, created_at timestamp, expiry timestamp, revoked_at timestamp, pem blob NOT NULL,
  issued_at timestamp, not_before timestamp, originating_host text, sans text, tags text, common_name text,
  filename text, application_name text,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
CREATE INDEX certificates_created_at ON certificates (created_at);
CREATE INDEX certificates_revoked_at ON certificates (revoked_at);
CREATE TABLE ocsp_responses (
  serial_number blob NOT NULL, authority_key_identifier blob NOT NULL, body blob NOT NULL, expiry timestamp,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
"""


def run_cfssl(csrs: list[tuple[str, bytes]], work: Path, args: argparse.Namespace, record: bool = False) -> float:
    """cfssl serve with a P-256 CA; with `record`, its SQLite certdb keeps every certificate it signs."""
    cfssl = ensure_cfssl()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "cfssl bench P-256 CA")])
    now = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (work / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (work / "ca-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (work / "cfssl.json").write_text(json.dumps(CFSSL_CONFIG))
    port = _free_port()
    command = [cfssl, "serve", "-ca", "ca.pem", "-ca-key", "ca-key.pem", "-config", "cfssl.json"]
    command += ["-address", "127.0.0.1", "-port", str(port), "-loglevel", "2"]
    if record:
        database = sqlite3.connect(work / "certdb.sqlite3")
        database.executescript(CFSSL_CERTDB)
        database.close()
        (work / "certdb.json").write_text(
            json.dumps({"driver": "sqlite3", "data_source": str(work / "certdb.sqlite3")})
        )
        command += ["-db-config", "certdb.json"]
    server = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(f"http://127.0.0.1:{port}/api/v1/cfssl/info", server)
        requests = [
            _request(
                "/api/v1/cfssl/sign",
                {"Content-Type": "application/json"},
                json.dumps({"certificate_request": csr.decode()}).encode(),
            )
            for _, csr in csrs
        ]
        elapsed, statuses = post_all(port, requests, args.concurrency)
    finally:
        server.terminate()
        server.wait()
    failed = [s for s in statuses if s is None or s[0] != 200 or not json.loads(s[1])["success"]]
    if failed and not record:
        raise SystemExit(f"bench: {len(failed)} cfssl requests failed, e.g. {failed[0]}")
    signed = len(csrs) - len(failed)
    if record:
        # Under many clients cfssl's certdb refuses some requests ("database is locked"): its rate counts
        # what it signed and recorded, and the refusals are reported.
        if failed:
            example = failed[0][1][:120] if failed[0] else "no answer"
            print(f"  (cfssl with its certdb refused {len(failed)} of {len(csrs)} requests, e.g. {example!r})")
        database = sqlite3.connect(work / "certdb.sqlite3")
        (recorded,) = database.execute("SELECT count(*) FROM certificates").fetchone()
        database.close()
        if recorded != signed:
            raise SystemExit(f"bench: cfssl signed {signed} certificates and recorded {recorded}")
    return signed / elapsed


def run_ours_protocol(csrs: list[tuple[str, bytes]], work: Path, args: argparse.Namespace, bounded: bool) -> float:
    """Our app on `serve_workers`, with serve's connection bounds or on uvicorn's own protocol (the only
    difference), on a PKI home set up with the CLI."""
    environment = {**os.environ, "PKI_HOME": str(work / "pki")}

    def cli(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, str(REPO / "cli.py"), *argv], cwd=work, env=environment, capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"bench: cli.py {argv[0]} failed: {done.stderr}")
        return done.stdout

    cli("create-ca-root")
    cli("create-ca-intermediate", "--id", "bench-ca")
    key = json.loads(cli("create-factory", "bench-factory", "--intermediate", "bench-ca", "--json"))["apiKey"]
    port = _free_port()
    limits = "ConnectionLimits()" if bounded else "None"
    serve = f"serve_workers('127.0.0.1', {port}, {args.workers}, 'info', False, limits={limits})"
    code = f"from shared.api.workers import serve_workers; from shared.serve_limits import ConnectionLimits; {serve}"
    environment["PYTHONPATH"] = str(REPO)
    server = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=work,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = ServerLog(server)
    try:
        log.wait_for_workers(args.workers)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/pkcs10"}
        requests = [_request(f"/api/devices/{device_id}/certificate", headers, csr) for device_id, csr in csrs]
        elapsed, statuses = post_all(port, requests, args.concurrency)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait()
    failed = [s for s in statuses if s is None or s[0] != 201]
    if failed:
        raise SystemExit(f"bench: {len(failed)} requests failed, e.g. {failed[0]}")
    return len(csrs) / elapsed


def measure_bounds(csrs: list[tuple[str, bytes]], args: argparse.Namespace) -> None:
    bounded_rates, plain_rates = [], []
    with tempfile.TemporaryDirectory(prefix="bench-bounds-") as tmp:
        for round_ in range(args.rounds):
            for bounded, rates in ((True, bounded_rates), (False, plain_rates)):
                work = Path(tmp) / f"round-{round_}-{'bounded' if bounded else 'plain'}"
                work.mkdir()
                rates.append(run_ours_protocol(csrs, work, args, bounded))
    bounded, plain = max(bounded_rates), max(plain_rates)
    print(f"  ours with serve's connection bounds: {bounded:7.0f} certificates/s  (rounds: {_list(bounded_rates)})")
    print(f"  ours on uvicorn's own protocol:      {plain:7.0f} certificates/s  (rounds: {_list(plain_rates)})")
    print(f"  ratio bounded / unbounded:           {bounded / plain:5.2f}  (what the bounds cost)")


def run_floor(csrs: list[tuple[str, bytes]], args: argparse.Namespace) -> float:
    """bench/floor_app.py on uvicorn, with as many workers as ours started the same way (one socket each)."""
    port = _free_port()
    serve = f"serve_workers('127.0.0.1', {port}, {args.workers}, 'info', False, 'floor_app:app', factory=False)"
    command = [sys.executable, "-c", f"from shared.api.workers import serve_workers; {serve}"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])}
    server = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = ServerLog(server)
    try:
        log.wait_for_workers(args.workers)
        requests = [_request("/sign", {"Content-Type": "application/pkcs10"}, csr) for _, csr in csrs]
        elapsed, statuses = post_all(port, requests, args.concurrency)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait()
    failed = [s for s in statuses if s is None or s[0] != 201]
    if failed:
        raise SystemExit(f"bench: {len(failed)} requests to the floor app failed, e.g. {failed[0]}")
    return len(csrs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument("--workers", type=int, default=2, help="our server's worker processes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each counts")
    parser.add_argument("--profile", action="store_true", help="profile our server and print the top functions")
    parser.add_argument("--bounds", action="store_true", help="measure only what serve's connection bounds cost")
    args = parser.parse_args()

    csrs = device_csrs(args.count, "http-device")
    print(
        f"http_sign: {args.count} P-256 CSRs, one per request, {args.concurrency} concurrent clients, "
        f"{os.cpu_count()} CPUs; ours with {args.workers} worker(s)"
    )
    if args.bounds:
        measure_bounds(csrs, args)
        return
    ours_rates, cfssl_rates, recording_rates, floor_rates = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        for round_ in range(args.rounds):
            work = Path(tmp) / f"round-{round_}"
            (work / "ours").mkdir(parents=True)
            (work / "cfssl").mkdir()
            ours_rates.append(run_ours(csrs, work / "ours", args)[0])
            cfssl_rates.append(run_cfssl(csrs, work / "cfssl", args))
            (work / "cfssl-certdb").mkdir()
            recording_rates.append(run_cfssl(csrs, work / "cfssl-certdb", args, record=True))
            floor_rates.append(run_floor(csrs, args))
        if args.profile:
            (Path(tmp) / "profiled").mkdir()
            profile = Path(tmp) / "server.prof"
            run_ours(csrs, Path(tmp) / "profiled", args, profile)
            print_profile(profile)
    ours, cfssl, recording, floor = max(ours_rates), max(cfssl_rates), max(recording_rates), max(floor_rates)
    print(f"  ours  (POST /api/devices/ID/certificate):    {ours:7.0f} certificates/s  (rounds: {_list(ours_rates)})")
    print(f"  cfssl (/api/v1/cfssl/sign, records nothing): {cfssl:7.0f} certificates/s  (rounds: {_list(cfssl_rates)})")
    print(
        f"  cfssl with its SQLite certdb (records each): {recording:7.0f} certificates/s  "
        f"(rounds: {_list(recording_rates)})"
    )
    print(f"  floor (uvicorn + cryptography, no CA logic): {floor:7.0f} certificates/s  (rounds: {_list(floor_rates)})")
    verdict = "met" if ours >= cfssl else "NOT met"
    print(f"  ratio ours / cfssl:              {ours / cfssl:5.2f}  (target >= 1.0: {verdict})")
    print(f"  ratio ours / cfssl with certdb:  {ours / recording:5.2f}  (like for like: every certificate recorded)")
    print(f"  ratio ours / floor:              {ours / floor:5.2f}  (what our CA logic costs on this stack)")
    print(f"  ratio floor / cfssl:             {floor / cfssl:5.2f}  (the best any server on this stack could reach)")


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def print_profile(profile: Path) -> None:
    """Where one worker's time goes during the load: the main subtrees, then the top functions."""
    import pstats

    stats = pstats.Stats(str(profile))
    total = stats.total_tt
    parts = {
        "authentication (API key lookup)": ("shared/api/auth.py", "authenticate"),
        "signing runs (CSR checks, ledger reads, signing)": ("shared/service.py", "_sign_run"),
        "ledger commits (statements and fsync)": ("shared/ledger/sqlite.py", "_record_group_async"),
        "response (bundle to JSON)": ("shared/api/app.py", "_bundle_response"),
    }
    details = {
        "  of which CSR policy and signature check": ("shared/pki/csr.py", "check_device_csr"),
        "  of which building and signing certificates": ("shared/pki/profiles.py", "issue_device"),
    }

    def seconds(path: str, function: str) -> float:
        return sum(v[3] for (file, _, name), v in stats.stats.items() if file.endswith(path) and name == function)

    print(f"\n  one worker under cProfile (slower than unprofiled), {total:.2f} s of calls during the load:")
    ours = 0.0
    for label, (path, function) in {**parts, **details}.items():
        spent = seconds(path, function)
        ours += spent if label in parts else 0.0
        print(f"    {label:58s} {spent:6.2f} s  {spent / total:5.1%}")
    rest = total - ours
    print(f"    {'the rest: uvicorn, Starlette/FastAPI, asyncio, body reading':58s} {rest:6.2f} s  {rest / total:5.1%}")
    print("\n  top functions by own time:")
    stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
