"""tools/mutation.py, which decides what `make mutation` calls killed, justified and open: its rules must not
excuse a mutant that changes behaviour, nor count a run that did not judge a mutant as a kill."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import mutation

MESSAGE = 'raise NotImplementedError("a Key Vault key never leaves the vault")'


@pytest.mark.parametrize(
    "after",
    [
        'raise NotImplementedError("XXa Key Vault key never leaves the vaultXX")',
        'raise NotImplementedError("a key vault key never leaves the vault")',
        'raise NotImplementedError("A KEY VAULT KEY NEVER LEAVES THE VAULT")',
    ],
)
def test_a_reworded_message_is_wording(after):
    assert mutation.wording_only((MESSAGE,), (after,))


@pytest.mark.parametrize(
    "before, after",
    [
        (MESSAGE, "raise NotImplementedError(None)"),  # no message at all
        ('x("empty-csr", "the CSR is empty")', 'x("XXempty-csrXX", "the CSR is empty")'),  # the code
        ('if label == "NEW CERTIFICATE REQUEST":', 'if label == "new certificate request":'),  # compared
        ('if "not a key" in text:', 'if "NOT A KEY" in text:'),  # compared
        ('x = b"a b"', 'x = b"XXa bXX"'),  # bytes
        ('query = "PartitionKey eq @p and RowKey lt @marker"', 'query = "partitionkey eq @p and rowkey lt @marker"'),
        ('db.execute("ALTER TABLE certificates_v4 RENAME TO certificates")', 'db.execute("alter table c")'),
        ('where.append("status = ?")', 'where.append("STATUS = ?")'),
    ],
)
def test_what_is_not_prose_is_never_wording(before, after):
    assert not mutation.wording_only((before,), (after,))


def test_an_sql_statement_in_another_case_is_equivalent():
    before = 'db.execute("INSERT INTO devices (device_id, owner) VALUES (?, ?)")'
    assert mutation.sql_case_only(
        (before,), (before.replace("INSERT INTO", "insert into").replace("VALUES", "values"),)
    )


@pytest.mark.parametrize(
    "before, after",
    [
        # SQLite stores the name a statement gives an object as written, and lookups compare it exactly
        (
            'db.execute("ALTER TABLE certificates_v4 RENAME TO certificates")',
            'db.execute("ALTER TABLE CERTIFICATES_V4 RENAME TO CERTIFICATES")',
        ),
        ('db.execute("CREATE TABLE t (a)")', 'db.execute("create table t (a)")'),
        # a quoted value is case-sensitive
        ("q = \"SELECT a FROM t WHERE s = 'Active'\"", "q = \"select a from t where s = 'active'\""),
        ("q = \"SELECT a FROM t WHERE s = 'active'\"", "q = \"SELECT A FROM T WHERE S = 'ACTIVE'\""),
    ],
)
def test_sql_that_names_objects_or_values_is_not_equivalent(before, after):
    assert not mutation.sql_case_only((before,), (after.replace("alter table", "ALTER TABLE"),))
    assert not mutation.sql_case_only((before,), (after,))


def test_sql_whose_quoted_values_keep_their_case_is_equivalent():
    statement = "SELECT item FROM batch_items WHERE chunk = ? AND status = 'pending'"
    before, after = f'q = "{statement}"', f'q = "{statement.lower()}"'
    assert mutation.sql_case_only((before,), (after,))


def _survivor(module: str, before: str, after: str) -> mutation.Mutant:
    return mutation.Mutant(f"{module}.x_f__mutmut_1", module, f"{module}.f", "survived", (before,), (after,))


@pytest.mark.parametrize(
    "before, after",
    [
        ('chunk=row["chunk"],', 'chunk=row["CHUNK"],'),
        ('return str(rows[-1]["seq"]) if more else None', 'return str(rows[-1]["SEQ"]) if more else None'),
        ('if row is None or row["status"] != CERT_ACTIVE:', 'if row is None or row["STATUS"] != CERT_ACTIVE:'),
    ],
)
def test_a_sqlite_row_column_in_another_case_is_equivalent(before, after):
    assert mutation.rule_for(_survivor("shared.ledger.sqlite_batches", before, after)) == mutation.ROW_KEY_CASE


@pytest.mark.parametrize(
    "module, before, after",
    [
        # a Table entity is a dict: its property names are case-sensitive
        ("shared.ledger.tables", 'status = entity["Status"]', 'status = entity["STATUS"]'),
        ("shared.ledger.tables", 'status = row["Status"]', 'status = row["STATUS"]'),
        ("shared.ledger.sqlite", 'status = record["status"]', 'status = record["STATUS"]'),  # not a row
        ("shared.ledger.sqlite", 'if row["kind"] == "root":', 'if row["kind"] == "ROOT":'),  # a value, not a column
        # SQL rules hold only where strings are SQL
        ("shared.ledger.tables", 'q = "SELECT a FROM t WHERE b = ?"', 'q = "select a from t where b = ?"'),
    ],
)
def test_the_sqlite_rules_hold_only_for_sqlite_rows_and_sql(module, before, after):
    assert mutation.rule_for(_survivor(module, before, after)) is None


@pytest.mark.parametrize(
    "exit_code, status",
    [
        (1, "killed"),
        (3, "killed"),
        (-24, "timeout"),
        (-9, "timeout"),
        (0, "survived"),
        (None, "not run"),
        (255, "not run"),  # mutmut's runner crashed: it calls this a timeout
        (2, "not run"),
        (33, "untested (exit 33)"),  # no tests: never a survivor a reason can excuse
        (-11, "untested (exit -11)"),
    ],
)
def test_exit_codes(exit_code, status):
    assert mutation.status_of(exit_code) == status


def test_identical_lines_of_a_function_are_told_apart():
    original = "def f(a):\n    if a:\n        return 1\n    if a:\n        return 2\n"
    first = original.replace("    if a:\n        return 1", "    if not a:\n        return 1")
    second = original.replace("    if a:\n        return 2", "    if not a:\n        return 2")
    assert mutation.changed_lines(original, first) == (("if a:",), ("if not a:",), 0)
    assert mutation.changed_lines(original, second) == (("if a:",), ("if not a:",), 1)


def _report(tmp_path, capsys, mutants, missing=(), justified=None) -> tuple[int, str]:
    status = mutation.report(list(mutants), list(missing), justified or {}, floor=50, drafts=False)
    return status, capsys.readouterr().out


def _mutant(name: str, status: str, removed=("x = 1",), added=("x = 2",), occurrence=0) -> mutation.Mutant:
    return mutation.Mutant(name, "shared.m", "shared.m.f", status, removed, added, occurrence)


def test_the_report_passes_only_when_every_survivor_is_justified(tmp_path, capsys):
    killed = _mutant("shared.m.x_f__mutmut_1", "killed", (), ())
    survivor = _mutant("shared.m.x_f__mutmut_2", "survived")
    assert _report(tmp_path, capsys, [killed, survivor])[0] == 1
    status, out = _report(tmp_path, capsys, [killed, survivor], justified={survivor.change: "equivalent: because"})
    assert status == 0 and "equivalent: because" in out
    # an entry for the same lines at another occurrence excuses nothing
    elsewhere = ("shared.m.f", ("x = 1",), ("x = 2",), 1)
    assert _report(tmp_path, capsys, [killed, survivor], justified={elsewhere: "elsewhere"})[0] == 1


def test_only_a_survivor_can_be_justified(tmp_path, capsys):
    killed = _mutant("shared.m.x_f__mutmut_1", "killed", (), ())
    untested = _mutant("shared.m.x_f__mutmut_2", "untested (exit 33)")
    status, out = _report(tmp_path, capsys, [killed, untested], justified={untested.change: "a reason"})
    assert status == 1 and "OPEN" in out


def test_a_run_with_mutants_not_run_or_modules_not_mutated_fails(tmp_path, capsys):
    killed = _mutant("shared.m.x_f__mutmut_1", "killed", (), ())
    assert _report(tmp_path, capsys, [killed, _mutant("shared.m.x_f__mutmut_2", "not run", (), ())])[0] == 1
    status, out = _report(tmp_path, capsys, [killed], missing=["shared.other"])
    assert status == 1 and "NOT MUTATED shared.other" in out


def test_the_command_line_takes_patterns_and_a_folder(tmp_path):
    assert mutation.parse(["run"]).mutants == []
    assert mutation.parse(["run", "shared.pki*", "shared.api*"]).mutants == ["shared.pki*", "shared.api*"]
    assert mutation.parse(["run", "--children", "1", "shared.pki*"]).mutants == ["shared.pki*"]
    with pytest.raises(SystemExit):
        mutation.parse(["report", "shared.pki*"])  # report takes --module, not patterns
    args = mutation.parse(["report", "--from", str(tmp_path), "--module", "shared.pki"])
    assert (args.folder, args.module, args.mutants) == (tmp_path, ["shared.pki"], [])


def _two_line_project(tmp_path: Path):
    """A project of one two-line function and its test, with this tools/mutation.py (and no survivors files);
    a function that runs the tool there with the given arguments."""
    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "mutation.py").write_text((repo / "tools" / "mutation.py").read_text())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    (tmp_path / "tests" / "azurite.py").write_text((repo / "tests" / "azurite.py").read_text())
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text("")
    (tmp_path / "shared" / "limits.py").write_text(
        "def within(size: int, limit: int) -> bool:\n    return 0 < size <= limit\n"
    )
    (tmp_path / "tests" / "test_limits.py").write_text(
        "from shared.limits import within\n\n\ndef test_within():\n    assert within(3, 3) and not within(4, 3)\n"
    )
    (tmp_path / "pyproject.toml").write_text(
        '[tool.mutmut]\nsource_paths = ["shared/"]\nonly_mutate = ["shared/limits.py"]\n'
        'pytest_add_cli_args_test_selection = ["tests/"]\nmutate_only_covered_lines = true\n'
    )
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("COV", "MUTANT"))}
    environment.setdefault("AZURITE_TABLE", str(repo / "tools" / "azurite" / "node_modules" / ".bin" / "azurite-table"))

    def tool(*arguments: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "tools/mutation.py", *arguments]
        return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, check=False)

    return tool


def test_a_run_starts_from_no_mutants_folder_and_reports_what_it_made(tmp_path):
    """`make mutation` removes mutants/ and runs `tools/mutation.py run`: the run must make the folder, judge
    every mutant with the project's tests and report them (here, a two-line project: its mutants are either
    killed or survive, and the one survivor left unjustified fails the report)."""
    tool = _two_line_project(tmp_path)
    (tmp_path / "mutants").mkdir()  # a run still setting up: its folder holds no mutants yet
    early = tool("report")
    assert early.returncode == 2 and "has made no mutants yet" in early.stdout, early.stdout
    # not "run make mutation", which starts over
    assert "resume it with .venv/bin/python tools/mutation.py run" in early.stdout
    (tmp_path / "mutants").rmdir()
    run = tool("run", "--children", "1")
    assert (tmp_path / "mutants").is_dir(), run.stdout[-2000:] + run.stderr[-2000:]
    assert run.returncode == 1, run.stdout[-2000:]  # `0 < size` -> `1 < size` survives: no test sizes 0 or 1
    assert re.search(r"shared\.limits +\d+ +\d+ +0 +[1-9]\d* +0 ", run.stdout), run.stdout
    assert "OPEN       shared.limits.x_within__mutmut_" in run.stdout
    # a killed mutant turned into a timeout that came long before its time was up (a stray SIGXCPU meant for
    # an earlier process with its PID): not judged, and the report says how to judge it again
    meta_path = tmp_path / "mutants" / "shared" / "limits.py.meta"
    meta = json.loads(meta_path.read_text())
    killed = next(name for name, code in sorted(meta["exit_code_by_key"].items()) if code == 1)
    meta["exit_code_by_key"][killed] = -24
    meta["durations_by_key"][killed], meta["estimated_durations_by_key"][killed] = 0.5, 0.5  # allowance 22.5 s
    meta_path.write_text(json.dumps(meta))
    stray = tool("report")
    assert stray.returncode == 1 and f"CUT SHORT  {killed}: its timeout came before its time" in stray.stdout
    assert f"judge them again: .venv/bin/python tools/mutation.py run {killed}" in stray.stdout
    assert re.search(r"shared\.limits +\d+ +\d+ +0 +[1-9]\d* +1 ", stray.stdout), stray.stdout
    meta["durations_by_key"][killed] = 22.5  # the whole allowance: a timeout, so killed
    meta_path.write_text(json.dumps(meta))
    assert "CUT SHORT" not in tool("report").stdout
    # a function added far down the file, which an old test calls, then a resumed run: the judged function's
    # verdicts are kept, and the new one gets its mutants (mutmut measured coverage on the old mutated copy,
    # which has no such line) and its tests (mutmut traced again only new tests: "no tests")
    before = {name: code for name, code in meta["exit_code_by_key"].items() if "within" in name}
    (tmp_path / "shared" / "limits.py").write_text(
        "def within(size: int, limit: int) -> bool:\n    return 0 < size <= limit\n\n\n"
        + "# a line of notes\n" * 400
        + "\n\ndef above(size: int) -> bool:\n    return size > 2\n"
    )
    (tmp_path / "tests" / "test_limits.py").write_text(  # an old test reaches the new function
        "from shared.limits import above, within\n\n\ndef test_within():\n"
        "    assert within(3, 3) and not within(4, 3)\n    assert above(3) and not above(2)\n"
    )
    again = tool("run", "--children", "1")
    assert "copied afresh: shared/limits.py" in again.stderr, again.stderr[-2000:]
    codes = json.loads(meta_path.read_text())["exit_code_by_key"]
    assert {name: code for name, code in codes.items() if "within" in name} == before
    above = [name for name in codes if "above" in name]
    # a "no tests" verdict left by an earlier resumed run is judged again once the tests are traced again
    meta = json.loads(meta_path.read_text())
    meta["exit_code_by_key"][above[0]] = 33
    meta_path.write_text(json.dumps(meta))
    assert mutation.forget_verdicts(tmp_path / "mutants", mutation.NO_TESTS_CODE) == 1
    assert json.loads(meta_path.read_text())["exit_code_by_key"][above[0]] is None
    assert tool("run", "--children", "1").returncode == 1
    codes = json.loads(meta_path.read_text())["exit_code_by_key"]
    assert len(above) == 2 and all(codes[name] == 1 for name in above), codes  # > 2: >= 2 and > 3, both killed
    # the open survivors (0 < size -> 1 < size, and -> 0 <= size) are judged again when asked: the one a
    # new test kills is killed, the other stays open
    (tmp_path / "tests" / "test_one.py").write_text(
        "from shared.limits import within\n\n\ndef test_one():\n    assert within(1, 3)\n"
    )
    assert "2 open, 0 not run" in tool("report").stdout
    again = tool("run", "--children", "1", "--again-open")
    assert "2 open survivor(s) to judge again" in again.stderr, again.stderr[-2000:]
    assert "1 open, 0 not run" in again.stdout and "1 < size" not in again.stdout, again.stdout
    misspelt = tool("report", "--module", "shared.limit", "--module", "shared.nosuch")
    assert misspelt.returncode == 2 and "'shared.nosuch'" in misspelt.stdout and "limit'" not in misspelt.stdout


def test_a_justified_mutant_is_not_run_and_counts_as_a_survivor_not_a_kill(tmp_path):
    """A mutant that a survivors-file entry justifies is given mutmut's "skipped" before any mutant runs: it
    counts as a justified survivor (never killed, so the score can only be lower), `--judge-justified` runs it,
    and one whose entry is gone is reported not run, which fails the report."""
    tool = _two_line_project(tmp_path)
    # greeting's mutants (wording, which a rule justifies) are skipped; see below for when no test reaches it
    with open(tmp_path / "shared" / "limits.py", "a") as source:
        source.write('\n\ndef greeting() -> str:\n    return "hello there"\n\n\nGREETING = greeting()\n')
    survivors = tmp_path / "tools" / "mutation-survivors"
    survivors.mkdir()
    entry = survivors / "shared.limits.toml"
    entry.write_text(
        '[[survivor]]\nfunction = "shared.limits.within"\nremoved = ["return 0 < size <= limit"]\n'
        'added = ["return 1 < size <= limit"]\nreason = "no caller sizes 1"\n'
    )
    run = tool("run", "--children", "1")
    meta_path = tmp_path / "mutants" / "shared" / "limits.py.meta"
    codes = json.loads(meta_path.read_text())["exit_code_by_key"]
    untested = [name for name in codes if "greeting" in name]
    assert f"{1 + len(untested)} mutant(s) justified by an entry or a rule: not run" in run.stderr, run.stderr
    skipped = [name for name, code in codes.items() if code == mutation.SKIPPED_CODE and name not in untested]
    assert len(skipped) == 1 and None not in codes.values(), codes
    assert re.search(rf"justified  {re.escape(skipped[0])} \(not run\): return 0 < size", run.stdout), run.stdout
    assert "because no caller sizes 1" in run.stdout
    killed = sum(code == 1 for code in codes.values())
    assert f"killed ({killed} of {len(codes)};" in run.stdout  # the skipped one is not counted killed
    assert f"{1 + len(untested)} survivors justified, 1 open, 0 not run" in run.stdout  # 0 <= size is open
    assert f"{1 + len(untested)} of the justified survivors were not run" in run.stdout
    judged = tool("run", "--children", "1", "--judge-justified")
    assert f"{1 + len(untested)} mutant(s) skipped as justified to judge" in judged.stderr, judged.stderr[-2000:]
    assert json.loads(meta_path.read_text())["exit_code_by_key"][skipped[0]] == 0  # run, and it survives
    assert re.search(rf"justified  {re.escape(skipped[0])}: ", judged.stdout), judged.stdout
    meta = json.loads(meta_path.read_text())
    meta["exit_code_by_key"][skipped[0]] = mutation.SKIPPED_CODE
    meta_path.write_text(json.dumps(meta))
    entry.unlink()  # the entry is gone since the mutant was skipped: it must be run
    stale = tool("report")
    assert stale.returncode == 1, stale.stdout
    assert f"UNJUSTIFIED SKIP {skipped[0]}: skipped as justified" in stale.stdout, stale.stdout
    assert f"{len(untested)} survivors justified, 1 open, 1 not run" in stale.stdout
    # then mutmut's statistics no longer have greeting reached by a test (as when a test that reached it is
    # gone): its mutants are "no tests", which is open, however a rule would justify them; and a plain resume
    # judges the mutant whose entry is gone
    stats_path = tmp_path / "mutants" / "mutmut-stats.json"
    stats = json.loads(stats_path.read_text())
    reached = stats["tests_by_mangled_function_name"]
    stats["tests_by_mangled_function_name"] = {name: tests for name, tests in reached.items() if "greeting" not in name}
    stats_path.write_text(json.dumps(stats))
    meta = json.loads(meta_path.read_text())
    meta["exit_code_by_key"].update(dict.fromkeys(untested, mutation.SKIPPED_CODE))
    meta_path.write_text(json.dumps(meta))
    resumed = tool("run", "--children", "1")
    codes = json.loads(meta_path.read_text())["exit_code_by_key"]
    assert codes[skipped[0]] == 0, resumed.stdout[-2000:]
    assert all(codes[name] == mutation.NO_TESTS_CODE for name in untested), codes
    assert all(f"OPEN       {name} (untested (exit 33))" in resumed.stdout for name in untested), resumed.stdout
    assert f"0 survivors justified, {2 + len(untested)} open, 0 not run" in resumed.stdout


def test_every_test_file_mutmut_runs_judges_a_module_and_every_judge_is_run():
    """The test files `[tool.mutmut]` selects and those `MUTATION_TESTS` (tests/conftest.py) names for the
    mutated modules are the same set: a selected file no entry names only costs the statistics run, and a
    named file mutmut does not select never judges a mutant."""
    import tomllib

    from .conftest import MUTATION_TESTS

    config = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["tool"]["mutmut"]
    selected = {Path(name).stem for name in config["pytest_add_cli_args_test_selection"]}
    judges = {name for names in MUTATION_TESTS.values() for name in names}
    assert selected == judges, (sorted(selected - judges), sorted(judges - selected))


def test_a_test_that_hangs_under_a_mutant_fails_once_over_its_allowance(monkeypatch):
    """tests/conftest.py's per-test rule: under a mutant, a test that runs over (its statistics time + 1 s)
    x the multiplier fails with MutantHung (not an Exception, so `except Exception` cannot swallow it), and
    the timer is gone after the test; a test without a time of its own, or a session not judging a mutant,
    gets no timer. The multiplier and constant are mutmut's ([tool.mutmut] in pyproject.toml)."""
    import contextlib
    import signal
    import threading
    import tomllib
    from types import SimpleNamespace

    from . import conftest

    config = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert config["timeout_multiplier"] == conftest.HANG_MULTIPLIER
    monkeypatch.setenv("MUTANT_UNDER_TEST", "shared.pki.csr.x_f__mutmut_1")
    monkeypatch.setattr(conftest, "HANG_MULTIPLIER", 0.1)
    monkeypatch.setitem(conftest._DURATIONS, "tests/x.py::test_hangs", 1.0)
    wrapper = conftest.pytest_runtest_call(SimpleNamespace(nodeid="tests/x.py::test_hangs"))
    next(wrapper)
    hung = pytest.raises(conftest.MutantHung, match=r"ran over 0\.2 s: \(its 1\.00 s \+ 1 s\) x 0\.1")
    with hung, contextlib.suppress(Exception):  # as the code under test might catch what it meets
        threading.Event().wait()  # hangs, but for the allowance
    with pytest.raises(StopIteration):
        next(wrapper)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    for nodeid, mutant in (
        ("tests/x.py::no_time_of_its_own", "shared.pki.csr.x_f__mutmut_1"),
        ("tests/x.py::test_hangs", "stats"),
    ):
        monkeypatch.setenv("MUTANT_UNDER_TEST", mutant)
        wrapper = conftest.pytest_runtest_call(SimpleNamespace(nodeid=nodeid))
        next(wrapper)
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        with pytest.raises(StopIteration):
            next(wrapper)


def test_a_small_pid_max_is_raised_before_a_run_or_named_when_it_cannot_be(tmp_path):
    pid_max = tmp_path / "pid_max"
    pid_max.write_text("32768\n")
    said = mutation.guard_pid_reuse(pid_max)
    assert said == "kernel.pid_max raised from 32,768 to 4,194,304 (mutmut's stray timeout signals)"
    assert pid_max.read_text() == "4194304\n"
    assert mutation.guard_pid_reuse(pid_max) is None  # large enough: left alone
    (tmp_path / "folder").mkdir()
    assert mutation.guard_pid_reuse(tmp_path / "folder") is None  # cannot be read: not Linux, nothing to check
    # a setting even root cannot write (a read-only sysctl, 65,536): named, with what to do
    said = mutation.guard_pid_reuse(Path("/proc/sys/kernel/ngroups_max"))
    assert said == (
        "warning: kernel.pid_max is 65,536: mutmut's stray timeout signals may reach a reused PID "
        "(another mutant, counted killed); as root, run `sysctl kernel.pid_max=4194304` first"
    )
