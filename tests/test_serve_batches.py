"""`make run` takes batches: `serve` on the embedded default signs them in its own process (the in-process
queue's worker runs the same chunk handler as the queue-triggered function)."""

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.ledger.sqlite import SqliteLedger

from .certrules import check_ledger
from .conftest import REPO
from .csrs import make_csr
from .test_serve import (
    _banner,
    _free_port,
    _json_banner,
    _serving,
    _sockets_of,
    _StderrLines,
    _wait_until_serving,
    _workers,
)


def _request(port: int, method: str, path: str, key: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:  # noqa: S310 - loopback
        return response.status, json.loads(response.read())


def test_serve_signs_a_batch_in_its_own_process(tmp_path):
    port = _free_port()
    with _serving(tmp_path / "pki", tmp_path, port) as server:
        key = re.search(r"factory key:\s+(dca_[0-9a-f]{16}_\S{43})", _banner(server)).group(1)
        _wait_until_serving(port, server)
        items = [{"deviceId": f"served-{n}", "csr": make_csr(f"served-{n}").decode()} for n in range(3)]
        status, batch = _request(port, "POST", "/api/batches", key, {"items": items})
        assert status == 202
        for _ in range(600):  # the worker signs it in the background
            status, progress = _request(port, "GET", f"/api/batches/{batch['id']}", key)
            if progress["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the batch is still {progress['status']}")
    assert progress["status"] == "done" and progress["counts"]["issued"] == 3
    assert [r["bundle"]["deviceId"] for r in progress["results"]] == ["served-0", "served-1", "served-2"]


# -- serve --workers: a batch outlives the worker that queued it -------------------------------------------

BIG_BATCH = 5000  # 51 chunks: far more than a worker signs between its 202 and the SIGKILL that follows it
DEADLINE = 600  # seconds: only a guard against waiting forever (a lost batch never finishes, a stuck server)


def _serve_workers(home, cwd, port, *options: str) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "cli.py"), "serve", "--bootstrap", "--port", str(port), "--workers", "2"]
    return subprocess.Popen(
        [*command, "--log-level", "info", "--no-access-log", *options],
        cwd=cwd,
        env={**os.environ, "PKI_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so that a test can kill it with its workers
    )


def _submit_and_kill_its_worker(server: subprocess.Popen, port: int, key: str, items: list) -> tuple[str, int]:
    """Submit `items` on a connection kept open, then SIGKILL the worker that holds that connection (the
    one that queued the chunks in its memory) at once: (the batch's ID, the killed worker's PID)."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"items": items})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connection.request("POST", "/api/batches", body=body, headers=headers)
    response = connection.getresponse()
    batch = json.loads(response.read())
    assert response.status == 202, batch
    (taker,) = [w for w in _workers(server.pid) if "established" in _sockets_of(w, port).values()]
    os.kill(taker, signal.SIGKILL)
    connection.close()
    return batch["id"], taker


def _finished(port: int, key: str, batch_id: str) -> dict:
    """The batch once no item is pending (failing after DEADLINE seconds)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        _, progress = _request(port, "GET", f"/api/batches/{batch_id}?limit=1", key)
        if progress["status"] not in ("queued", "running"):
            return progress
        time.sleep(0.2)
    pytest.fail(f"batch {batch_id} is still {progress['status']}: {progress['counts']}")


@pytest.mark.child_process
def test_a_batch_is_finished_when_the_worker_that_queued_it_is_killed(tmp_path):
    home, port = tmp_path / "pki", _free_port()
    items = [{"deviceId": f"big-{n}", "csr": make_csr(f"big-{n}").decode()} for n in range(BIG_BATCH)]
    with _serve_workers(home, tmp_path, port, "--json") as server:
        try:
            log = _StderrLines(server)
            key = _json_banner(server)["created"]["factory"]["apiKey"]
            log.wait_for("Uvicorn running on", count=2)
            batch_id, killed = _submit_and_kill_its_worker(server, port, key, items)
            log.wait_for(f"worker {killed} exited with code -9; starting another")
            log.wait_for("unfinished chunk(s) queued again after a worker was replaced")
            line = next(line for line in log.lines if "queued again after a worker" in line)
            assert int(re.search(r"Batches: (\d+) unfinished", line).group(1)) > 0  # the worker died with work
            progress = _finished(port, key, batch_id)
        finally:
            assert _stopped(server) == 0
    assert progress["status"] == "done" and progress["counts"]["issued"] == BIG_BATCH
    ledger = SqliteLedger(home / "ledger.sqlite3")
    assert check_ledger(ledger) == 2 + BIG_BATCH  # root, intermediate and each device once
    ledger.close()


@pytest.mark.child_process
def test_a_batch_is_finished_by_the_next_start_when_serve_itself_is_killed(tmp_path):
    home, port = tmp_path / "pki", _free_port()
    items = [{"deviceId": f"big-{n}", "csr": make_csr(f"big-{n}").decode()} for n in range(BIG_BATCH)]
    with _serve_workers(home, tmp_path, port, "--json") as server:
        log = _StderrLines(server)
        key = _json_banner(server)["created"]["factory"]["apiKey"]
        log.wait_for("Uvicorn running on", count=2)
        batch_id, _ = _submit_and_kill_its_worker(server, port, key, items)
        log.wait_for("Uvicorn running on", count=3)  # the killed worker's replacement
        workers = _workers(server.pid)
        os.kill(server.pid, signal.SIGKILL)  # the parent, whatever it was signing
        server.wait()
        _wait_until_gone(workers)  # an orphan would hold the port: the workers stop with their parent
    with _serve_workers(home, tmp_path, port) as server:
        try:
            _StderrLines(server)  # drained
            printed = _StderrLines(SimpleNamespace(stderr=server.stdout))  # what it prints, as it comes
            printed.wait_for("unfinished chunk(s) queued again; this process signs them")
            line = next(line for line in printed.lines if "queued again" in line)
            assert int(re.search(r"Batches: (\d+) unfinished", line).group(1)) > 0
            _wait_until_serving(port, server)
            progress = _finished(port, key, batch_id)
        finally:
            assert _stopped(server) == 0
    assert progress["status"] == "done" and progress["counts"]["issued"] == BIG_BATCH
    ledger = SqliteLedger(home / "ledger.sqlite3")
    assert check_ledger(ledger) == 2 + BIG_BATCH
    ledger.close()


_RECOVERING_SERVER = """
import sys
from shared.api.workers import serve_workers
from shared.errors import BackendUnavailable

calls = []

def replaced():
    calls.append(None)
    print(f"on_replaced call {len(calls)}", flush=True)
    if len(calls) == 1:
        raise BackendUnavailable("the ledger is away")

serve_workers("127.0.0.1", int(sys.argv[1]), 1, "info", False, on_replaced=replaced)
"""


@pytest.mark.child_process
def test_what_a_replaced_worker_left_is_recovered_even_when_the_first_try_fails(tmp_path):
    # A ledger away at that moment must not leave the dead worker's chunks for the next restart, nor stop
    # the server: the parent logs it and tries again.
    port = _free_port()
    with subprocess.Popen(
        [sys.executable, "-c", _RECOVERING_SERVER, str(port)],
        cwd=REPO,
        env={**os.environ, "PKI_HOME": str(tmp_path / "pki")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as server:
        try:
            log, printed = _StderrLines(server), _StderrLines(SimpleNamespace(stderr=server.stdout))
            log.wait_for("Uvicorn running on")
            (worker,) = _workers(server.pid)
            os.kill(worker, signal.SIGKILL)
            printed.wait_for("on_replaced call 2")
            assert any("BackendUnavailable: the ledger is away; trying again in" in line for line in log.lines)
            _wait_until_serving(port, server)  # the replacement serves
        finally:
            assert _stopped(server) == 0
    assert printed.lines.count("on_replaced call 2\n") == 1 and not any("call 3" in line for line in printed.lines)


def _stopped(server: subprocess.Popen) -> int:
    """Its exit code after SIGINT. One whose parent failed waits for its workers forever (multiprocessing
    joins them at exit): after DEADLINE seconds, its process group is killed and the test fails."""
    server.send_signal(signal.SIGINT)
    try:
        return server.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        pytest.fail("the server did not stop on SIGINT")


def _wait_until_gone(pids: set[int]) -> None:
    """Until none of `pids` runs (a zombie no longer does); failing after DEADLINE seconds."""

    def running(pid: int) -> bool:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return False

    deadline = time.monotonic() + DEADLINE
    while any(map(running, pids)):
        if time.monotonic() > deadline:
            for pid in filter(running, pids):
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"workers {sorted(pids)} outlived their parent")
        time.sleep(0.1)
