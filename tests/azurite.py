"""Azurite's Table or Queue service on this machine, in memory, on a free port: the real Storage protocol.

Installed by `make test` (npm ci, pinned by tools/azurite/package-lock.json) into tools/azurite.
Telemetry is off and nothing is written to disk (`--inMemoryPersistence`).
"""

import os
import socket
import subprocess
import time
import uuid
from contextlib import suppress
from pathlib import Path

from azure.core.exceptions import AzureError
from azure.data.tables import TableServiceClient

REPO = Path(__file__).resolve().parent.parent
# AZURITE_TABLE names the binary where the tests run from a copy of the project (make mutation's mutants/)
AZURITE_TABLE = Path(
    os.environ.get("AZURITE_TABLE") or REPO / "tools" / "azurite" / "node_modules" / ".bin" / "azurite-table"
)
# Azurite's well-known development account (published in Azurite's documentation; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


BINARIES = {"table": AZURITE_TABLE, "queue": AZURITE_TABLE.with_name("azurite-queue")}


def connection_string(port: int, service: str = "table") -> str:
    endpoint = "TableEndpoint" if service == "table" else "QueueEndpoint"
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"{endpoint}=http://127.0.0.1:{port}/{ACCOUNT};"
    )


# every prefix table_prefix() handed out in this process, in order: a test's teardown deletes the tables of
# those it handed out (conftest.py, tables_deleted)
PREFIXES: list[str] = []


def table_prefix() -> str:
    """A prefix of table names no other test uses."""
    prefix = "t" + uuid.uuid4().hex[:12]
    PREFIXES.append(prefix)
    return prefix


def delete_tables(connection_string: str, prefixes: list[str]) -> int:
    """Delete every table whose name starts with one of `prefixes` (a test's own), on the Table service of
    `connection_string`; how many. Azurite's table operations slow down as tables accumulate, and `make
    mutation` runs hundreds of thousands of tests on one Azurite. Storage errors are left unraised: a table
    left behind costs time, never a verdict (under mutmut any error would count as a mutant killed)."""
    with TableServiceClient.from_connection_string(connection_string) as service:
        try:
            names = [
                table.name
                for prefix in prefixes
                for table in service.query_tables(
                    "TableName ge @low and TableName lt @high", parameters={"low": prefix, "high": prefix + "~"}
                )
            ]
        except AzureError:
            return 0

        for name in names:
            with suppress(AzureError):
                service.delete_table(name)
    return len(names)


class Azurite:
    """One Azurite service ("table" or "queue"), started in memory on a free port; stop() ends it.

    With AZURITE_TABLE_PORT set, the Table service already listening on that port is used and left
    running: `make mutation` starts one Azurite for its thousands of short pytest sessions instead of one
    per session. Every test names its own tables (table_prefix), so sessions never meet; queue tests use
    the app's fixed queue names, so the Queue service is always a session's own.
    """

    def __init__(self, service: str = "table") -> None:
        self.service = service
        self.process: subprocess.Popen | None = None
        running = os.environ.get("AZURITE_TABLE_PORT") if service == "table" else None
        if running:
            self.port = int(running)
            if not self.answers():
                raise RuntimeError(f"no Azurite answers on AZURITE_TABLE_PORT={running}")
            return
        binary = BINARIES[service]
        if not binary.exists():
            raise RuntimeError(f"Azurite is not installed at {binary}: `make test` installs it")
        self.port = 0
        for _ in range(5):  # a free port may be taken between choosing it and Azurite binding it
            self.port = _free_port()
            self.process = subprocess.Popen(
                [
                    str(binary),
                    "--inMemoryPersistence",
                    f"--{service}Host",
                    "127.0.0.1",
                    f"--{service}Port",
                    str(self.port),
                    "--skipApiVersionCheck",
                    "--disableTelemetry",
                    "--silent",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=REPO,
            )
            if self._wait_until_listening():
                return
            self.stop()
        raise RuntimeError("Azurite did not start")

    @property
    def connection_string(self) -> str:
        return connection_string(self.port, self.service)

    def answers(self) -> bool:
        """Whether something listens on the service's port now."""
        return self.listening(self.port)

    @staticmethod
    def listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return True
        except OSError:
            return False

    def _wait_until_listening(self) -> bool:
        assert self.process is not None
        while self.process.poll() is None:
            if self.answers():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
