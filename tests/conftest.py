import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from shared.config import Settings, build_service
from shared.service import DeviceCA

from .certrules import check_ledger

REPO = Path(__file__).resolve().parent.parent

# CI runs the same examples every time (a clean clone has no example database); local runs explore.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.now(UTC))


@pytest.fixture
def make_service(tmp_path, clock):
    """Build services on separate PKI homes; each is closed at the end of the test."""
    made: list[DeviceCA] = []

    def make(name: str = "pki", clock=clock, **overrides) -> DeviceCA:
        settings = replace(Settings(pki_home=tmp_path / name), **overrides)
        service = build_service(settings, clock=clock)
        made.append(service)
        return service

    yield make
    close_checked(made)


def close_checked(services: list[DeviceCA]) -> None:
    """Close test CAs after checking every certificate they issued, field by field."""
    for service in services:
        try:
            check_ledger(service.ledger)
        finally:
            service.close()


@pytest.fixture
def service(make_service) -> DeviceCA:
    """A CA with a root and one intermediate, 'factory-a', on the embedded default."""
    ca = make_service()
    ca.create_root()
    ca.create_intermediate("factory-a")
    return ca


def run_cli(*args: str, home: Path, cwd: Path | None = None, stdin: bytes | None = None, env: dict | None = None):
    environment = {**os.environ, "PKI_HOME": str(home), **(env or {})}
    if environment.get("MUTANT_UNDER_TEST") in ("stats", "fail"):
        # mutmut's bookkeeping modes need its state in this process; a mutant's name is passed on, so the
        # CLI runs the mutant too
        del environment["MUTANT_UNDER_TEST"]
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=cwd or home.parent,
        env=environment,
        input=stdin,
        capture_output=True,
        check=False,
    )
