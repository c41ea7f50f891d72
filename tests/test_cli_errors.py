"""Every command with bad options: one line on stderr, no traceback, nothing done, the documented status.

The table runs through `cli.main`, the function `python cli.py` runs, in this process (a subprocess per
row would take a minute); the rows that need a real process (a closed pipe, the interpreter's own exit)
run `python cli.py`.
"""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import cli

from .conftest import REPO
from .csrs import make_csr


@pytest.fixture
def ledger_backend() -> str:
    """SQLite only: the CLI checks options before it touches any backend, and this table compares SQLite state."""
    return "sqlite"


USAGE, ERROR = 2, 1  # README "The commands"
MISSING = "/no/such/folder/x.pem"
# the shape of an API key (dca_ID_SECRET) whose ID no key has: no message may repeat its secret
UNKNOWN_KEY = "dca_0123456789abcdef_" + "S3cr3t" * 7 + "x"


def _bad_options(tmp: Path) -> dict[str, list[tuple[list[str], int]]]:
    """command -> [(arguments after the command, exit status)]. Paths are made by `_scene`."""
    folder, a_file, csr = str(tmp / "a-folder"), str(tmp / "a-file"), str(tmp / "dev-1.csr")
    batch = str(tmp / "batch.jsonl")
    return {
        "create-ca-root": [
            (["--days", "nan"], USAGE),
            (["--days", "1e12"], USAGE),
            (["--days", "-1"], USAGE),
            (["--days", "0"], USAGE),
            (["--days", "soon"], USAGE),
            (["--curve", "P-521"], USAGE),
            (["--out", folder], ERROR),
            (["--out", MISSING], ERROR),
            (["--common-name", "Device CA Root"], ERROR),  # there is a root already
        ],
        "show-ca-root": [(["--out", folder], ERROR), (["--out", MISSING], ERROR), (["extra"], USAGE)],
        "proof-ca-root-possession": [
            ([], ERROR),  # DPS offline: the code must be given
            (["--verification-code", "../../x"], USAGE),
            (["--verification-code", "ABC", "--out", folder], ERROR),
            (["--verification-code", "ABC", "--out", MISSING], ERROR),
        ],
        "create-ca-intermediate": [
            (["--id", "Bad ID"], USAGE),
            (["--id", "Bad_Id"], USAGE),
            (["--id", "x" * 49], USAGE),
            (["--id", "factory-a"], ERROR),  # taken
            (["--days", "inf"], USAGE),
            (["--days", "36501"], USAGE),
            (["--curve", "x"], USAGE),
            (["--common-name", "bell\a"], USAGE),
            (["--common-name", "not UTF-8: \udcff"], USAGE),  # how Python hands over bytes that are not UTF-8
            (["--organization", " padded"], USAGE),
            (["--id", "new-one", "--out", MISSING], ERROR),
        ],
        "list-intermediates": [(["extra"], USAGE), (["--bogus"], USAGE)],
        "disable-intermediate": [([], USAGE), (["nope"], ERROR), (["Bad_Id"], USAGE)],
        "enable-intermediate": [([], USAGE), (["nope"], ERROR), (["Bad_Id"], USAGE)],
        "retry-dps": [([], USAGE), (["nope"], ERROR), (["Bad_Id"], USAGE)],
        "create-device-cert": [
            (["--device-id", "Bad Device"], USAGE),
            (["--device-id", "dev-\udcff"], USAGE),
            (["--device-id", "dev-9", "--intermediate", "Bad_Id"], USAGE),
            (["--device-id", "dev-9", "--factory", "Line_2"], USAGE),
            (["--device-id", "dev-9", "--curve", "P-521"], USAGE),
            (["--device-id", "dev-9", "--out-dir", a_file], ERROR),
            (["--device-id", "dev-9", "--out-dir", "/no/such/folder/dev-9"], ERROR),
            (["--device-id", "dev-9", "--intermediate", "nope"], ERROR),
        ],
        "sign-csr": [
            ([], USAGE),
            ([csr], USAGE),  # no --device-id
            ([str(tmp / "no-such.csr"), "--device-id", "dev-1"], ERROR),
            ([folder, "--device-id", "dev-1"], ERROR),
            ([a_file, "--device-id", "dev-1"], ERROR),  # not a CSR
            ([csr, "--device-id", "dev-1", "--out", folder], ERROR),
            ([csr, "--device-id", "dev-1", "--out", MISSING], ERROR),
            ([csr, "--device-id", "dev-2"], ERROR),  # CN differs
            ([csr, "--device-id", "dev-1", "--intermediate", "nope"], ERROR),
            ([csr, "--device-id", "Dev-UP"], USAGE),
            ([str(tmp / "no-such.csr"), "--device-id", "Dev-UP"], USAGE),  # the value first, then the file
            ([csr, "--device-id", "dev-1", "--factory", "Line_2"], USAGE),
        ],
        "sign-batch": [
            ([], USAGE),
            ([str(tmp / "no-such.jsonl")], ERROR),
            ([folder], ERROR),  # no CSR files in it
            ([a_file], ERROR),  # not JSON Lines
            ([csr], ERROR),  # a CSR, not JSON Lines
            ([batch, "--intermediate", "nope"], ERROR),
            ([batch, "--intermediate", "Bad_Id"], USAGE),
            ([batch, "--factory", "Line_2"], USAGE),
            ([batch, "--results", folder], ERROR),
            ([batch, "--results", MISSING], ERROR),
            ([batch, "--pem-dir", a_file], ERROR),
            ([batch, "--pem-dir", "/no/such/folder/pems"], ERROR),
        ],
        "list-certificates": [
            (["--cursor", "abc"], ERROR),  # the form of a cursor, but not one this listing gave
            (["--cursor", "a b"], USAGE),
            (["--cursor", "-1"], ERROR),
            (["--limit", "0"], USAGE),
            (["--limit", "1001"], USAGE),
            (["--limit", "ten"], USAGE),
            (["--expiring-within-days", "-5"], USAGE),
            (["--expiring-within-days", "nan"], USAGE),
            (["--expiring-within-days", "inf"], USAGE),
            (["--expiring-within-days", "1e12"], USAGE),
            (["--status", "lost"], USAGE),
            (["--days", "nan"], USAGE),
            (["--device-id", "Dev-UP"], USAGE),
            (["--intermediate", "Bad_Id"], USAGE),
        ],
        "check-expiring": [
            (["--within", "0"], USAGE),
            (["--within", "nan"], USAGE),
            (["--within", "5", "--announce"], USAGE),
            (["extra"], USAGE),
        ],
        "revoke": [
            ([], USAGE),
            (["nothex"], USAGE),
            (["xyz"], USAGE),
            (["0A0B"], ERROR),  # no such certificate
            (["0A0B", "--reason", "stolen"], USAGE),  # the reason is checked before the serial is looked up
            (["0A0B", "--reason", "hold"], USAGE),
            (["0A0B", "--reason", "certificateHold"], USAGE),
        ],
        "create-factory": [
            (["plant-1"], USAGE),
            (["Plant 1", "--intermediate", "factory-a"], USAGE),
            (["Line_2", "--intermediate", "factory-a"], USAGE),
            (["plant-1", "--intermediate", "Bad_Id"], USAGE),
            (["plant-1", "--intermediate", "nope"], ERROR),
            (["plant-1", "--intermediate", "factory-a", "--app-id", "not-a-guid"], USAGE),
        ],
        "bind-factory": [
            (["nobody", "--intermediate", "factory-a"], ERROR),
            (["nobody"], USAGE),
            (["Line_2", "--intermediate", "factory-a"], USAGE),
            (["nobody", "--intermediate", "Bad_Id"], USAGE),
        ],
        "list-factories": [(["extra"], USAGE)],
        "create-admin-key": [(["--name", "Bad Name"], USAGE), (["--name"], USAGE), (["--name", UNKNOWN_KEY], USAGE)],
        "create-api-key": [(["nobody"], ERROR), ([], USAGE), (["Line_2"], USAGE), ([UNKNOWN_KEY], USAGE)],
        "revoke-key": [
            (["0000000000000000"], ERROR),
            ([], USAGE),
            ([UNKNOWN_KEY], ERROR),  # a whole key: its ID is looked up, and there is no key with it
            (["nope"], USAGE),
            ([UNKNOWN_KEY[:-1]], USAGE),  # part of a key
            (["S3cr3t" * 7 + "x"], USAGE),  # a key's secret alone
        ],
        "list-keys": [(["--limit", "5"], USAGE)],
        "backup": [([], USAGE), ([folder], ERROR), ([str(tmp / "no" / "such" / "backup")], ERROR)],
        "serve": [
            (["--port", "70000"], USAGE),
            (["--port", "http"], USAGE),
            (["--workers", "0"], USAGE),
            (["--workers", "65"], USAGE),
            (["--log-level", "loud"], USAGE),
            (["--max-connections", "0"], USAGE),
            (["--max-header-bytes", "100"], USAGE),
            (["--request-timeout", "nan"], USAGE),
            (["--host", "no such host!"], ERROR),
            (["--log-level", UNKNOWN_KEY], USAGE),
        ],
    }


COMMANDS = sorted(_bad_options(Path("/")))


pytestmark = pytest.mark.usefixtures("cli_logging_restored")


@pytest.fixture
def scene(service, tmp_path, monkeypatch):
    """A CA with a root, an intermediate and a certificate; the CLI runs in tmp_path on its PKI home."""
    service.sign_csr(make_csr("dev-0"), "dev-0")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-folder" / "inside.txt").write_text("something")  # a backup refuses a folder with files
    (tmp_path / "a-file").write_text("not a CSR\n")
    (tmp_path / "dev-1.csr").write_bytes(make_csr("dev-1"))
    (tmp_path / "batch.jsonl").write_text(json.dumps({"deviceId": "dev-2", "csr": make_csr("dev-2").decode()}) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PKI_HOME", str(service.settings.pki_home))
    monkeypatch.delenv("PKI_DEBUG", raising=False)
    return tmp_path


def _state(root: Path) -> tuple:
    """Every file under `root` with its content's hash, and what the ledger holds, row by row (the ledger's
    own files change when it is merely opened)."""
    files = {}
    ledger = None
    for path in sorted(root.rglob("*")):
        if path.name.startswith("ledger.sqlite3"):
            ledger = ledger or path.with_name("ledger.sqlite3")
            continue
        if path.is_file():
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            files[str(path.relative_to(root))] = "folder"
    rows = []
    if ledger:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
        rows = list(db.iterdump())
        db.close()
    return files, rows


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_options_are_one_line_and_change_nothing(scene, command, capsys):
    for arguments, status in _bad_options(scene)[command]:
        for machine in (False, True):
            argv = [command, *arguments, *(["--json"] if machine else [])]
            before = _state(scene)
            code = cli.main(argv)
            out, err = capsys.readouterr()
            assert code == status, (argv, out, err)
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
            assert "S3cr3t" not in err + out, f"{argv}: a secret was repeated"
            assert "Traceback" not in err + out
            if machine:
                error = json.loads(out)["error"]
                assert set(error) == {"code", "message"} and error["message"] == lines[0].removeprefix("error: ")
                # a usage error is "usage", or the code of the rule a value broke (as the service says it)
                assert error["code"] != "usage" or status == USAGE, (argv, error)
                assert error["code"].startswith(("usage", "invalid-")) or status != USAGE, (argv, error)
            else:
                assert out == "", argv
            assert _state(scene) == before, f"{argv} changed something"


def test_the_table_covers_every_command():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(COMMANDS)


def test_no_command_is_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == USAGE
    assert capsys.readouterr().err.splitlines() == ["error: name a command ('python cli.py --help' lists them)"]
    assert cli.main(["bogus"]) == USAGE
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def _closed_pipe() -> int:
    """A pipe's write end whose reader has gone: every write to it fails (EPIPE), as with `| head -1`."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize(
    "argv",
    [["sign-csr", "dev-1.csr", "--device-id", "dev-1"], ["list-certificates", "--json"], ["--help"]],
    ids=["sign-csr", "list-certificates", "help"],
)
def test_a_closed_pipe_ends_quietly(scene, argv):
    write = _closed_pipe()
    try:
        done = subprocess.run(
            [sys.executable, str(REPO / "cli.py"), *argv],
            cwd=scene,
            env={**os.environ, "PKI_HOME": os.environ["PKI_HOME"]},
            stdout=write,
            stderr=subprocess.PIPE,
            check=False,
        )
        buffered = subprocess.run(  # the same with Python's own output buffering (no PYTHONUNBUFFERED)
            [sys.executable, str(REPO / "cli.py"), *argv],
            cwd=scene,
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
            stdout=write,
            stderr=subprocess.PIPE,
            check=False,
        )
    finally:
        os.close(write)
    assert done.stderr == buffered.stderr == b""
    assert done.returncode == buffered.returncode == ERROR
    if argv[0] == "sign-csr":  # the certificate was issued and recorded before its output was lost
        listed = cli_json(scene, "list-certificates", "--device-id", "dev-1")
        assert len(listed["items"]) == 1


def cli_json(cwd: Path, *argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *argv, "--json"], cwd=cwd, capture_output=True, check=True
    )
    return json.loads(done.stdout)


def test_usage_errors_in_a_real_process(scene):
    """The interpreter's own view: status 2, one line, and the same rule as HTTP's 400."""
    done = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "list-certificates", "--expiring-within-days", "-5"],
        cwd=scene,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == USAGE and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: argument --expiring-within-days: must be more than 0 and at most 36500, not '-5' "
        "(see 'python cli.py list-certificates --help')"
    ]


def test_a_command_that_finds_no_ca_says_which_ca_it_read(tmp_path, capsys, monkeypatch):
    """PKI_HOME is relative to the current folder: a command run elsewhere reads an empty CA, and says where."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PKI_HOME", raising=False)
    monkeypatch.delenv("LEDGER_TABLES", raising=False)
    (tmp_path / "d-1.csr").write_bytes(make_csr("d-1"))
    assert cli.main(["sign-csr", "d-1.csr", "--device-id", "d-1"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no active intermediate" in error
    assert f"(the CA under PKI_HOME={tmp_path.resolve() / '.pki'})" in error
    assert cli.main(["show-ca-root"]) == 1
    assert f"PKI_HOME={tmp_path.resolve() / '.pki'}" in capsys.readouterr().err
    monkeypatch.setenv("LEDGER_TABLES", "UseDevelopmentStorage=true")
    assert cli._which_ca("root-not-found") == " (the CA in Table Storage, tables deviceca*)"
    assert cli._which_ca("invalid-csr") == ""
