import gc
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from shared.composition import build_service
from shared.config import Settings
from shared.ledger.tables import TableLedger
from shared.service import DeviceCA

from .azurite import PREFIXES, Azurite, delete_tables, table_prefix
from .certrules import check_ledger
from .ledgers import check_table_rules

REPO = Path(__file__).resolve().parent.parent

# CI runs the same examples every time (a clean clone has no example database); local runs explore.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


# Under `make mutation`, the test files that judge each module's mutants: the module's own tests and those
# of its direct users. A survivor runs every test that reaches its function; without this, a survivor in
# a function every request passes through would run most of the suite (DPS's, the API's) each time.
_USE_CASE_TESTS = (
    "test_service",
    "test_device_ownership",
    "test_revocation",
    "test_isolation",
    "test_admin_input",
    "test_keyvault",
    "test_batches",
    "test_field_devices",
    "test_concurrency",
    "test_api",
    "test_api_hardening",
    "test_dps",
    "test_lost_answers",
)
MUTATION_TESTS = {
    "shared.pki.": (
        "test_pki",
        "test_csr_policy",
        "test_csr_encodings",
        "test_revocation",
        "test_admin_input",
        "test_field_devices",
        "test_isolation",
        "test_service",
    ),
    "shared.api.auth": ("test_easyauth", "test_api", "test_authorization", "test_api_hardening"),
    "shared.service.access": (
        "test_easyauth",
        "test_authorization",
        "test_admin_input",
        "test_api",
        "test_device_ownership",
        "test_service",
        "test_lost_answers",
    ),
    "shared.service.devices": _USE_CASE_TESTS,
    "shared.service.ca": _USE_CASE_TESTS,
    "shared.keys.keyvault": ("test_keyvault", "test_expiry_keyvault"),
    "shared.ledger.": (
        "test_ledger",
        "test_ledger_sqlite",
        "test_ledger_tables",
        "test_ledger_batches",
        "test_expiry_ledger",
        "test_concurrency",
        "test_backup",
        "test_service",
        "test_device_ownership",
        "test_revocation",
        "test_batches",
        "test_lost_answers",
    ),
}


def pytest_configure(config):
    """Under `make mutation`, each mutant's session keeps its temporary files in memory (/dev/shm) when the
    machine has it: the ledgers' SQLite commits then skip the disk's fsync, which took half of a mutant's
    time. Each session has its own folder (mutants run side by side), removed when it ends."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    memory = Path("/dev/shm")
    if mutant.startswith("shared.") and config.option.basetemp is None and memory.is_dir():
        config.option.basetemp = str(memory / f"device-ca-mutant-{os.getpid()}")
        config.add_cleanup(lambda: shutil.rmtree(config.option.basetemp, ignore_errors=True))


def pytest_sessionstart(session):
    """Under `make mutation`, a shared Azurite that no longer answers ends the session at once with status 2,
    which the report counts as "not run": its connection errors must not pass for tests killing a mutant."""
    port = os.environ.get("AZURITE_TABLE_PORT")
    if port and os.environ.get("MUTANT_UNDER_TEST", "").startswith("shared.") and not Azurite.listening(int(port)):
        pytest.exit(f"no Azurite answers on AZURITE_TABLE_PORT={port}", returncode=2)


def pytest_collection_modifyitems(config, items):
    """Under `make mutation` (mutmut sets MUTANT_UNDER_TEST), a mutant's tests run quickest first, so a
    killed mutant is found by its quickest failing test; they are the test files MUTATION_TESTS names for
    its module (DPS's tests judge the use cases only where they keep DPS in step: DPS_WORDS); and the
    Table Storage runs of ledger-parametrised tests are left to the mutants of the ledger package (the Table
    ledger, and the base class and codecs it uses) and of the `..._async` functions, which hand the work to a
    thread only on a remote ledger: for any other function they repeat what the SQLite runs already decide,
    at twice the cost. Leaving tests out can only let more mutants survive, never kill one
    that the whole suite would not."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if not mutant.startswith("shared."):  # not a mutant run (mutmut's statistics run says "stats")
        return
    try:
        kept = [item for item in items if _judges(item, mutant)] or items
        durations = _mutmut_durations()
        kept.sort(key=lambda item: float(durations.get(item.nodeid) or 0.0))
        _DURATIONS.update({item.nodeid: durations[item.nodeid] for item in kept if item.nodeid in durations})
    except Exception:  # an error here would end pytest with status 3, which mutmut calls a kill
        return
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


# mutmut's rule for a mutant that made its tests hang ([tool.mutmut] in pyproject.toml: timeout_multiplier 6,
# and mutmut's timeout_constant, 1 s), which the hook below applies to each test
HANG_MULTIPLIER, HANG_CONSTANT_SECONDS = 6.0, 1.0
_DURATIONS: dict[str, float] = {}  # this mutant's session: each test's time in mutmut's statistics run


class MutantHung(BaseException):
    """A test that ran over its allowance under a mutant. Not an Exception, so that no `except Exception` in
    the code under test takes it for an error of its own and goes on."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Under `make mutation`, a test that runs over (its time in mutmut's statistics run + 1 s) x 6 fails at
    once as hung (MutantHung), and then so does the mutant's session. mutmut applies that rule to the sum of
    a mutant's tests: a mutant that makes its first test hang otherwise waits out the time all of them take
    (a group-commit mutant, 285 tests: 222 s), sleeping; mutmut would count it killed (a timeout) all the same.
    A test with no time of its own in the statistics has only mutmut's rule."""
    duration = _DURATIONS.get(item.nodeid)
    if not os.environ.get("MUTANT_UNDER_TEST", "").startswith("shared.") or duration is None:
        yield
        return
    allowance = (float(duration) + HANG_CONSTANT_SECONDS) * HANG_MULTIPLIER

    def hung(signum, frame):
        rule = f"(its {float(duration):.2f} s + {HANG_CONSTANT_SECONDS:g} s) x {HANG_MULTIPLIER:g}"
        raise MutantHung(f"{item.nodeid} ran over {allowance:.1f} s: {rule}")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, allowance, allowance)  # again, should something swallow it
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# DPS's tests (the slowest) judge the use cases' mutants only in the functions that keep DPS in step or hand
# out its registration (_issued puts DPS's endpoint, ID scope and registration ID in every device bundle).
DPS_WORDS = ("dps", "root", "intermediate", "revoke", "enrollment", "finish", "possession", "issued")


def _judges(item, mutant: str) -> bool:
    function = mutant.partition("__mutmut_")[0].rpartition(".")[2]
    if _ledger_backend(item) == "tables" and not (mutant.startswith("shared.ledger.") or function.endswith("_async")):
        return False
    if mutant.startswith("shared.service.") and item.path.stem == "test_dps":
        return any(word in function.lower() for word in DPS_WORDS)
    files = next((names for prefix, names in MUTATION_TESTS.items() if mutant.startswith(prefix)), None)
    return files is None or item.path.stem in files


def _ledger_backend(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("ledger_backend") if callspec else None


def _mutmut_durations() -> dict[str, float]:
    """Each test's duration in mutmut's statistics run (mutmut runs the tests inside mutants/)."""
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return durations if isinstance(durations, dict) else {}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def cli_logging_restored(monkeypatch):
    """cli.main sets up the service's log (and quiets azure.identity) for a command run in this process;
    the process's other tests get both back."""
    logger = logging.getLogger("device_ca")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    identity = logging.getLogger("azure.identity")
    level = identity.level
    yield
    identity.setLevel(level)  # setLevel, not an attribute, so the loggers' level cache is cleared


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.now(UTC))


@pytest.fixture(scope="session")
def azurite():
    """Azurite's Table service, started once per session (on first use) and stopped at its end."""
    server = Azurite()
    _TABLE_SERVICE.append(server.connection_string)
    yield server
    _TABLE_SERVICE.clear()
    server.stop()


_TABLE_SERVICE: list[str] = []  # the connection string of the session's Table service, once it is started


@pytest.fixture(autouse=True)
def tables_deleted():
    """The tables a test made on the session's Table service (under the prefixes it took from table_prefix)
    are deleted when it ends, after its other fixtures' teardown (which may still check them): one Azurite
    serves all of `make mutation`, and its table operations slow down as tables accumulate."""
    first = len(PREFIXES)
    yield
    made = PREFIXES[first:]
    del PREFIXES[first:]
    if made and _TABLE_SERVICE:
        delete_tables(_TABLE_SERVICE[0], made)


@pytest.fixture(scope="session")
def azurite_queues():
    """Azurite's Queue service, started once per session (on first use) and stopped at its end."""
    server = Azurite("queue")
    yield server
    server.stop()


@pytest.fixture
def queue_settings(azurite_queues) -> dict[str, str]:
    """Settings naming the Azurite Queue service (QUEUE_STORAGE), for a Settings or the environment."""
    return {"QUEUE_STORAGE": azurite_queues.connection_string}


LEDGER_BACKENDS = ("sqlite", "tables")


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request) -> str:
    """Each test that builds a service runs on both ledgers: SQLite, and Table Storage on Azurite."""
    return request.param


@pytest.fixture
def ledger_settings(ledger_backend, request) -> dict:
    """Settings that put a service's ledger on the backend under test (its own tables on Azurite)."""
    if ledger_backend == "sqlite":
        return {}
    server = request.getfixturevalue("azurite")
    return {"ledger_tables": server.connection_string, "ledger_table_prefix": table_prefix()}


def settings_environment(settings: Settings) -> dict[str, str]:
    """The environment a CLI process needs to use the same ledger as `settings`."""
    if not settings.ledger_tables:
        return {}
    return {"LEDGER_TABLES": settings.ledger_tables, "LEDGER_TABLE_PREFIX": settings.ledger_table_prefix}


@pytest.fixture
def make_service(tmp_path, clock, ledger_settings):
    """Build services on separate PKI homes (and separate tables); each is closed at the end of the test."""
    made: list[DeviceCA] = []

    def make(name: str = "pki", clock=clock, **overrides) -> DeviceCA:
        ledger = {**ledger_settings, "ledger_table_prefix": table_prefix()} if ledger_settings else {}
        settings = replace(Settings(pki_home=tmp_path / name), **{**ledger, **overrides})
        service = build_service(settings, clock=clock)
        made.append(service)
        return service

    yield make
    close_checked(made)


def close_checked(services: list[DeviceCA]) -> None:
    """Close test CAs after checking every certificate they issued, field by field (and, on Table
    Storage, the ledger's rules on the raw tables)."""
    for service in services:
        try:
            check_ledger(service.ledger)
            if isinstance(service.ledger, TableLedger):
                check_table_rules(service.ledger)
        finally:
            service.close()


@pytest.fixture
def service(make_service) -> DeviceCA:
    """A CA with a root and one intermediate, 'factory-a', on the embedded default."""
    ca = make_service()
    ca.create_root()
    ca.create_intermediate("factory-a")
    return ca


@pytest.fixture
def embedded_service(tmp_path, clock) -> DeviceCA:
    """The `service` CA on the embedded default only (for tests of SQLite itself)."""
    ca = build_service(Settings(pki_home=tmp_path / "embedded"), clock=clock)
    ca.create_root()
    ca.create_intermediate("factory-a")
    yield ca
    close_checked([ca])


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


def reload_function_app():
    """function_app.py imported afresh (its settings are read at import). The app object it replaces is
    collected here, outside any event loop: AsgiFunctionApp.__del__ calls asyncio.run(), which fails when
    the garbage collector happens to run inside a running loop (a TestClient's), in whatever test is on."""
    import function_app

    module = importlib.reload(function_app)
    gc.collect()
    return module
