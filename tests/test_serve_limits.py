"""What one connection may cost `serve` (shared/api/connections.py), measured on the real server.

Each test runs `python cli.py serve` on a free port and talks to it over raw sockets. Deadlines are the
server's: a test observes that the server answered and closed, never how long it took.
"""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .conftest import REPO
from .csrs import make_csr
from .test_serve import _free_port, _json_banner

MiB = 1024 * 1024


@contextmanager
def _serving(tmp_path: Path, *options: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, int, dict]]:
    port = _free_port()
    command = [sys.executable, str(REPO / "cli.py"), "serve", "--bootstrap", "--json", "--port", str(port)]
    with subprocess.Popen(
        [*command, "--log-level", "info", "--no-access-log", *options],
        cwd=tmp_path,
        env={**os.environ, "PKI_HOME": str(tmp_path / "pki"), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            banner = _json_banner(server)
            for line in server.stderr:  # listening: no connection of the test's own is open before its first
                if "Uvicorn running on" in line:
                    break
            yield server, port, banner
        finally:
            server.send_signal(signal.SIGINT)
            server.wait()
            server.log = server.stderr.read()  # type: ignore[attr-defined] - what it logged after it started


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def _answer(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes its side (b"" at the end: its FIN)."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def _response(connection: socket.socket) -> tuple[int, bytes]:
    """One whole response on a kept-alive connection: its status and body (by its Content-Length)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(65536)
    return int(head.split()[1]), body


def _status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]["code"]


def test_unfinished_headers_cost_little_and_are_closed(tmp_path):
    """20 connections each sending 4 MiB of one header line, never finished: each gets 431 and is closed,
    and the server's peak memory grows by far less than the 80 MiB they sent."""
    with _serving(tmp_path) as (server, port, _):
        before = _memory_kib(server.pid)
        connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        try:
            senders = [
                threading.Thread(
                    target=c.sendall, args=(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * (4 * MiB),)
                )
                for c in connections
            ]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()  # all 80 MiB are sent: the server has read them (and dropped them)
            after = _memory_kib(server.pid)
            grown_mib = (after["VmHWM"] - before["VmRSS"]) / 1024
            assert grown_mib < 64, f"the server's peak memory grew by {grown_mib:.0f} MiB"
            answers = [_answer(c) for c in connections]  # the server answered and closed each one
        finally:
            for connection in connections:
                connection.close()
        assert all(_status_and_error(answer) == (431, "headers-too-large") for answer in answers), answers[0][:300]
        with socket.create_connection(("127.0.0.1", port)) as connection:  # and it still serves
            connection.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _answer(connection).startswith(b"HTTP/1.1 200")


def test_trailers_without_end_cost_little_and_are_closed(tmp_path):
    """Unauthenticated chunked requests answered 401 at once, whose senders go on with trailer lines: the
    trailers are neither kept nor read without end, and the connections are closed."""
    with _serving(tmp_path) as (server, port, _):
        before = _memory_kib(server.pid)
        head = b"POST /api/devices/x/certificate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]

        sent_whole: list[bool] = []

        def flood(connection: socket.socket) -> None:
            try:
                connection.sendall(head + b"1\r\nA\r\n0\r\n" + b"a:b\r\n" * (10 * MiB))
                sent_whole.append(True)
            except OSError:  # the server stopped reading and closed while this was still sending
                sent_whole.append(False)

        try:
            senders = [threading.Thread(target=flood, args=(c,)) for c in connections]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
            grown_mib = (_memory_kib(server.pid)["VmHWM"] - before["VmRSS"]) / 1024
            answers = [_answer(c) for c in connections]
        finally:
            for connection in connections:
                connection.close()
        assert grown_mib < 64, f"the server's peak memory grew by {grown_mib:.0f} MiB"
        assert sent_whole == [False] * 4, "the server read 50 MiB of trailers instead of closing"
        # 401 when the app answered before the flood was read, 431 when the flood came first; closed either way
        assert all(answer.startswith((b"HTTP/1.1 401", b"HTTP/1.1 431")) for answer in answers), answers[0][:200]


def test_a_body_over_the_cap_is_413_every_time(tmp_path):
    """4 MB bodies, sent whole before the answer is read: 413 ten times out of ten, with or without
    `Connection: close` (the server drains what it will not use before it closes)."""
    with _serving(tmp_path) as (_, port, banner):
        key = banner["created"]["factory"]["apiKey"]
        for close in (True, False):
            statuses = []
            for _ in range(10):
                with socket.create_connection(("127.0.0.1", port)) as connection:
                    head = (
                        "POST /api/devices/dev-1/certificate HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: Bearer {key}\r\nContent-Type: application/pkcs10\r\n"
                        f"Content-Length: {4_000_000}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
                    )
                    connection.sendall(head.encode() + b"A" * 4_000_000)
                    statuses.append(_status_and_error(_answer(connection)))
            assert statuses == [(413, "body-too-large")] * 10, statuses


def test_a_streamed_body_over_the_cap_is_413(tmp_path):
    with _serving(tmp_path) as (_, port, banner):
        admin = banner["created"]["admin"]["apiKey"]
        chunk = b"%x\r\n" % 65536 + b"{" * 65536 + b"\r\n"
        with socket.create_connection(("127.0.0.1", port)) as connection:
            head = (
                f"POST /api/factories HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            connection.sendall(head.encode() + chunk * 64 + b"0\r\n\r\n")
            assert _status_and_error(_answer(connection)) == (413, "body-too-large")


def test_a_request_that_does_not_arrive_in_time_is_closed(tmp_path):
    with _serving(tmp_path, "--request-timeout", "0.5") as (_, port, banner):
        key = banner["created"]["factory"]["apiKey"]
        with socket.create_connection(("127.0.0.1", port)) as connection:  # half a header line, then nothing
            connection.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa")
            assert _status_and_error(_answer(connection)) == (408, "request-timeout")
        with socket.create_connection(("127.0.0.1", port)) as connection:  # headers, then half the body
            csr = make_csr("dev-slow")
            head = (
                f"POST /api/devices/dev-slow/certificate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/pkcs10\r\nContent-Length: {len(csr)}\r\n\r\n"
            )
            connection.sendall(head.encode() + csr[: len(csr) // 2])
            assert _status_and_error(_answer(connection)) == (408, "request-timeout")
        with socket.create_connection(("127.0.0.1", port)) as connection:  # nothing at all
            assert _answer(connection) == b""
        with socket.create_connection(("127.0.0.1", port)) as connection:  # kept alive, then slow
            connection.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _response(connection)[0] == 200
            connection.sendall(b"GET /api/health HTTP/1.1\r\nHo")
            assert _status_and_error(_answer(connection)) == (408, "request-timeout")


def test_connections_past_the_cap_are_refused(tmp_path):
    with _serving(tmp_path, "--max-connections", "3") as (_, port, _):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            for connection in held:  # served, and kept alive
                connection.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _response(connection)[0] == 200
            with socket.create_connection(("127.0.0.1", port)) as extra:
                extra.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = _answer(extra)
            assert _status_and_error(answer) == (503, "too-many-connections")
            assert b"\r\nretry-after: 1\r\n" in answer.lower()
            held[0].sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")  # the others are untouched
            assert _response(held[0])[0] == 200
        finally:
            for connection in held:
                connection.close()


def _post_csr(port: int, key: str, device: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/devices/{device}/certificate",
        data=make_csr(device),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/pkcs10"},
    )
    return _call(request)


def _call(request: urllib.request.Request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request) as response:  # noqa: S310 - loopback
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_wrong_passphrase_is_logged_with_the_error_id_the_caller_gets(tmp_path):
    """The CA's keys were written with one passphrase; `serve` is started with another. The factory gets
    the code and an error ID, health says 503, and serve's log has the details under that ID. Each stop
    leaves the ledger in its one file (the WAL checkpointed)."""
    wal = tmp_path / "pki" / "ledger.sqlite3-wal"
    with _serving(tmp_path, env={"PKI_KEY_PASSPHRASE": "the right one"}) as (_, port, banner):
        key = banner["created"]["factory"]["apiKey"]
        assert _post_csr(port, key, "dev-1")[0] == 201
        other = _opened(tmp_path / "pki" / "ledger.sqlite3")  # open elsewhere, as another worker's
        assert wal.stat().st_size > 0
    assert wal.stat().st_size == 0  # checkpointed by serve on its way out, though the ledger is still open
    other.close()

    with _serving(tmp_path, env={"PKI_KEY_PASSPHRASE": "a wrong one"}) as (server, port, _):
        status, body = _post_csr(port, key, "dev-2")
        health = _call(urllib.request.Request(f"http://127.0.0.1:{port}/api/health"))
    assert health == (503, {"status": "degraded"})
    assert status == 500 and body["error"]["code"] == "key-passphrase-wrong"
    assert str(tmp_path) not in json.dumps(body)
    error_id = body["error"]["message"].rsplit(" ", 1)[-1]
    logged = [line for line in server.log.splitlines() if error_id in line]
    assert len(logged) == 1 and str(tmp_path / "pki" / "keys") in logged[0]


def _opened(ledger: Path) -> sqlite3.Connection:
    """A connection that has read the ledger, so that it holds it open (sqlite3.connect alone opens nothing)."""
    connection = sqlite3.connect(ledger)
    connection.execute("SELECT count(*) FROM cas").fetchone()
    return connection
