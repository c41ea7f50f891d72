"""`make run`'s server: a first start prints keys and a curl example that really works."""

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import cli
from shared.ledger.sqlite import SqliteLedger

from .certrules import check_ledger
from .conftest import REPO
from .csrs import make_csr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(port: int, server: subprocess.Popen) -> None:
    for _ in range(300):
        if server.poll() is not None:
            pytest.fail(f"the server exited: {server.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health") as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    pytest.fail("the server did not start")


def _start(home, cwd, port) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "serve", "--bootstrap", "--port", str(port), "--log-level", "warning"],
        cwd=cwd,
        env={**os.environ, "PKI_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextmanager
def _serving(home, cwd, port) -> Iterator[subprocess.Popen]:
    with _start(home, cwd, port) as server:
        try:
            yield server
        finally:
            server.terminate()


def _banner(server: subprocess.Popen) -> str:
    lines = []
    for line in server.stdout:
        lines.append(line)
        if "openssl verify" in line:
            break
    return "".join(lines)


def _try_it_block(text: str) -> list[str]:
    """The commands of a "Try it" block (the banner's or the README's), in order."""
    lines = text.split("Try it", 1)[1].split("```", 1)[0].splitlines()[1:]
    return [line.strip() for line in lines if line.startswith("  ") and line.strip()]


def _run(commands: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-ec", "\n".join(commands)], cwd=cwd, capture_output=True, text=True)


def test_first_start_prints_keys_and_a_try_it_block_that_can_be_run_again_and_again(tmp_path):
    home, port = tmp_path / "pki", _free_port()
    client = tmp_path / "client"
    client.mkdir()
    with _serving(home, tmp_path, port) as server:
        banner = _banner(server)
        _wait_until_serving(port, server)
        assert re.search(r"admin key:\s+dca_[0-9a-f]{16}_\S{43}", banner)
        factory_key = re.search(r"factory key:\s+(dca_[0-9a-f]{16}_\S{43})", banner).group(1)
        assert f"http://127.0.0.1:{port}/api/openapi.json" in banner and "/api/docs" in banner
        commands = _try_it_block(banner)
        readme = _try_it_block((REPO / "README.md").read_text().split("```text", 1)[1])
        base = f"http://127.0.0.1:{port}"
        assert commands == [
            line.replace("dca_91ab...", factory_key).replace("http://127.0.0.1:8080", base) for line in readme
        ]
        certificates = []
        for _ in range(2):  # the README's block, twice against one server: the same certificate, verified
            result = _run(commands, client)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip().endswith("my-device-1.pem: OK") and result.stderr == ""
            certificates.append((client / "my-device-1.pem").read_text())
        assert certificates[0] == certificates[1]

    with _serving(home, tmp_path, port) as again:
        banner = _banner(again)
        _wait_until_serving(port, again)
        assert "Using the existing CA" in banner and "dca_" not in banner
        result = _run(commands, client)  # after a restart, the same block still works
        assert result.returncode == 0 and result.stdout.strip().endswith("my-device-1.pem: OK"), result.stderr
    ledger = SqliteLedger(home / "ledger.sqlite3")
    assert check_ledger(ledger) == 3  # root, intermediate, my-device-1
    ledger.close()


# -- serve --workers: one SO_REUSEPORT socket per worker -------------------------------------------------


class _StderrLines:
    """Collects a server's stderr lines in a thread, so that a test can wait for some without blocking."""

    def __init__(self, server: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._drain, args=(server,), daemon=True).start()

    def _drain(self, server: subprocess.Popen) -> None:
        for line in server.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("<EOF>")
            self.changed.notify_all()

    def wait_for(self, text: str, count: int = 1) -> None:
        with self.changed:
            found = self.changed.wait_for(
                lambda: sum(text in line for line in self.lines) >= count or "<EOF>" in self.lines, timeout=60
            )
            assert found and "<EOF>" not in self.lines, "".join(self.lines)


def _workers(pid: int) -> set[int]:
    """The server's worker processes (multiprocessing also starts a resource tracker, not a worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(child) for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()}


def _tcp_sockets(port: int) -> dict[int, str]:
    """socket inode -> state ('listen' or 'established') of the IPv4 TCP sockets on a local port."""
    states = {"0A": "listen", "01": "established"}
    sockets = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] in states:
            sockets[int(fields[9])] = states[fields[3]]
    return sockets


def _sockets_of(pid: int, port: int) -> dict[int, str]:
    """inode -> state of the process's TCP sockets on the port."""
    sockets = _tcp_sockets(port)
    held = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            inode = int(target[8:-1]) if target.startswith("socket:[") else None
            if inode in sockets:
                held[inode] = sockets[inode]
    return held


def test_workers_each_listen_on_their_own_socket_and_share_the_connections(tmp_path):
    home, port = tmp_path / "pki", _free_port()
    command = [sys.executable, str(REPO / "cli.py"), "serve", "--bootstrap", "--json", "--port", str(port)]
    command += ["--workers", "2", "--log-level", "info", "--no-access-log"]
    with subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**os.environ, "PKI_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            log = _StderrLines(server)
            banner = _json_banner(server)
            log.wait_for("Uvicorn running on", count=2)
            workers = _workers(server.pid)
            assert len(workers) == 2
            listening = [[inode for inode, state in _sockets_of(w, port).items() if state == "listen"] for w in workers]
            assert sorted(map(len, listening)) == [1, 1] and listening[0] != listening[1]  # a socket each

            # A burst of keep-alive clients, all connected before any is served: shared by the workers, not
            # all accepted by the first to wake (as with one socket shared by all workers).
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
            for client in clients:
                client.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert all(client.recv(4096).startswith(b"HTTP/1.1 200") for client in clients)
            held = {worker: list(_sockets_of(worker, port).values()).count("established") for worker in workers}
            assert sum(held.values()) == 24 and all(held.values()), held
            for client in clients:
                client.close()

            # The workers build the service from PKI_HOME: the factory key printed by the parent signs.
            status, chain = _sign(port, banner["created"]["factory"]["apiKey"], "worker-device-1")
            assert status == 201 and chain.count("BEGIN CERTIFICATE") == 2
            assert not any('"POST /api/devices' in line for line in log.lines)  # --no-access-log

            # A worker that dies is replaced.
            killed = next(iter(workers))
            os.kill(killed, signal.SIGKILL)
            log.wait_for("Uvicorn running on", count=3)
            replaced = _workers(server.pid)
            assert len(replaced) == 2 and killed not in replaced
            assert _sign(port, banner["created"]["factory"]["apiKey"], "worker-device-2")[0] == 201
            other = _opened(home / "ledger.sqlite3")  # open elsewhere: SQLite's last-close checkpoint won't run
        finally:
            server.send_signal(signal.SIGINT)
            assert server.wait() == 0
    assert not any(Path(f"/proc/{worker}").exists() for worker in replaced)  # stopped and reaped
    wal = home / "ledger.sqlite3-wal"  # each worker's app closed the service it built: the WAL is checkpointed
    assert wal.stat().st_size == 0
    other.close()
    ledger = SqliteLedger(home / "ledger.sqlite3")
    assert check_ledger(ledger) == 4  # root, intermediate and the two devices
    ledger.close()


def test_a_later_start_says_how_to_get_a_key_for_the_existing_factory(tmp_path):
    home, client, port = tmp_path / "pki", tmp_path / "client", _free_port()
    client.mkdir()
    with _serving(home, tmp_path, port) as server:
        assert "factory key:" in _banner(server)
    with _serving(home, tmp_path, port) as again:
        banner = _banner(again)
        _wait_until_serving(port, again)
        assert "Using the existing CA" in banner and "dca_" not in banner
        python = Path(os.path.abspath(sys.executable))  # relative when under the project (.venv/bin/python)
        with contextlib.suppress(ValueError):
            python = python.relative_to(Path(__file__).resolve().parent.parent)
        python = shlex.quote(str(python))
        advice = f"A new key for factory local-factory: {python} cli.py create-api-key local-factory"
        assert advice in banner.splitlines()
        assert (
            f"An admin key: {python} cli.py create-admin-key (list-keys lists the keys; revoke-key revokes one)"
            in banner
        )
        assert (
            "First: export FACTORY_KEY=KEY, with a key of factory local-factory (the first start printed one; "
            f"{python} cli.py create-api-key local-factory makes another)."
        ) in banner.splitlines()
        commands = _try_it_block(banner)
        assert not any("export" in command for command in commands)

        # the advice works as printed from the project folder, with no virtual environment activated
        bare = {"PATH": "/usr/bin:/bin", "PKI_HOME": str(home)}
        made = subprocess.run(
            ["bash", "-c", advice.split(": ", 1)[1]], cwd=REPO, env=bare, capture_output=True, text=True
        )
        assert made.returncode == 0, made.stderr
        key = re.search(r"dca_[0-9a-f]{16}_\S{43}", made.stdout).group(0)

        unset = _run(commands, client)  # FACTORY_KEY not set: the 401 says the key is empty
        assert unset.returncode == 22
        assert json.loads((client / "device-ca-chain.pem").read_text())["error"] == {
            "code": "unsupported-credentials",
            "message": "the Authorization header is not usable: its Bearer key is empty; "
            "send 'Authorization: Bearer <key>'",
        }
        result = _run([f"export FACTORY_KEY={key}", *commands], client)
        assert result.returncode == 0 and result.stdout.strip().endswith("my-device-1.pem: OK"), result.stderr


def test_the_cli_command_printed_is_the_running_interpreter_relative_to_the_project(monkeypatch):
    monkeypatch.setattr(sys, "executable", str(REPO / ".venv" / "bin" / "python"))
    assert cli.cli_command() == ".venv/bin/python cli.py"
    monkeypatch.setattr(sys, "executable", "/opt/my python/bin/python3")
    assert cli.cli_command() == "'/opt/my python/bin/python3' cli.py"


def test_serve_refuses_a_port_in_use_before_setting_anything_up(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            command = [sys.executable, str(REPO / "cli.py"), "serve", "--bootstrap", "--port", str(port)]
            result = subprocess.run(
                [*command, "--workers", workers],
                cwd=tmp_path,
                env={**os.environ, "PKI_HOME": str(tmp_path / "pki")},
                capture_output=True,
                text=True,
            )
            assert result.returncode == 1
            assert result.stderr.strip() == (
                f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another with --port N "
                "(make run: PORT=N make run), or stop what listens there"
            )
            assert result.stdout == "" and not list((tmp_path / "pki").rglob("*.pem"))  # no CA was set up


def _json_banner(server: subprocess.Popen) -> dict:
    text = ""
    for line in server.stdout:
        text += line
        if line.startswith("}"):
            break
    return json.loads(text)


def _sign(port: int, key: str, device_id: str) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/devices/{device_id}/certificate",
        data=make_csr(device_id),
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/pkcs10",
            "Accept": "application/x-pem-file",
        },
    )
    with urllib.request.urlopen(request) as response:  # noqa: S310 - loopback
        return response.status, response.read().decode()


def _opened(ledger: Path) -> sqlite3.Connection:
    """A connection that has read the ledger, so that it holds it open (sqlite3.connect alone opens nothing)."""
    connection = sqlite3.connect(ledger)
    connection.execute("SELECT count(*) FROM cas").fetchone()
    return connection


def test_serve_writes_the_root_file_only_into_a_pki_home_it_can_write(make_service, tmp_path):
    """The root is written to PKI_HOME/root.pem for tools that want a file; with the keys in Key Vault and the
    ledger in Table Storage PKI_HOME need not exist, and the banner names GET /api/ca/root instead of
    failing the start."""
    import argparse
    from dataclasses import replace

    service = make_service()
    assert cli._write_root_file(service) is None  # no root yet: nothing to write
    service.create_root()
    written = cli._write_root_file(service)
    assert written == (service.settings.pki_home / "root.pem").resolve()
    assert written.read_text() == service.root().certificate_pem
    args = argparse.Namespace(host="127.0.0.1", port=8080, bootstrap=False)
    assert f"Root certificate: {written}" in cli._serve_banner(service, args, None, written)[1]

    for home in (tmp_path / "missing", written):  # no such folder; a file, not a folder
        service.settings = replace(service.settings, pki_home=home)
        assert cli._write_root_file(service) is None
        document, text = cli._serve_banner(service, args, None, None)
        assert document["rootCertificateFile"] is None
        assert f"Root certificate: http://127.0.0.1:8080/api/ca/root (PKI_HOME {home} is not" in text
    assert not (tmp_path / "missing").exists()
