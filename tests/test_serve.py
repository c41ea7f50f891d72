"""`make run`'s server: a first start prints keys and a curl example that really works."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from shared.ledger.sqlite import SqliteLedger

from .certrules import check_ledger
from .conftest import REPO


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
        if "openssl verify" in line or "Using the existing CA" in line:
            break
    return "".join(lines)


def test_first_start_prints_keys_and_a_curl_example_that_works(tmp_path):
    home, port = tmp_path / "pki", _free_port()
    with _serving(home, tmp_path, port) as server:
        banner = _banner(server)
        _wait_until_serving(port, server)
        assert re.search(r"admin key:\s+dca_[0-9a-f]{16}_\S{43}", banner)
        assert re.search(r"factory key:\s+dca_[0-9a-f]{16}_\S{43}", banner)
        assert f"http://127.0.0.1:{port}/api/openapi.json" in banner and "/api/docs" in banner
        commands = [line.strip() for line in banner.splitlines() if line.startswith(("  openssl", "  curl"))]
        assert [c.split()[0] for c in commands] == ["openssl", "openssl", "curl", "openssl"]
        client = tmp_path / "client"
        client.mkdir()
        result = subprocess.run(["bash", "-ec", "\n".join(commands)], cwd=client, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("my-device-1.pem: OK")

    with _serving(home, tmp_path, port) as again:
        banner = _banner(again)
    assert "Using the existing CA" in banner and "dca_" not in banner
    ledger = SqliteLedger(home / "ledger.sqlite3")
    assert check_ledger(ledger) == 3  # root, intermediate, my-device-1
    ledger.close()
