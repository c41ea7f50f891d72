"""Mutation testing of the security-critical modules: run mutmut, print the score and every survivor.

`make mutation` runs `python tools/mutation.py run`: one Azurite Table service for the whole run (the
ledger tests' thousands of short pytest sessions share it; see tests/azurite.py), `mutmut run` with the
mutants that a survivors-file entry or a general rule justifies not run (they count as survivors; see
skip_justified), then the report. `python tools/mutation.py report` prints the report of the last run
again (from `mutants/`).

The report gives, per module, mutants killed (a test failed; a timeout counts, since the mutant made the
suite hang, unless it came before the mutant's time was up: then it was cut short by a stray signal and is
not judged), justified, open and not run, and lists each survivor with its change. A survivor is
*justified* when a file of `tools/mutation-survivors/` holds an entry with the same function and the same
changed lines, and a reason; entries are matched by the change, not by mutmut's numbering, so they outlive
edits elsewhere in the function (`occurrence` tells identical lines apart). Exit status: 0 when at least
--floor percent of the mutants are killed, every survivor is justified, no mutant is left not run and every
configured module has its mutants; 1 otherwise; 2 when there is no run to report on (or none of its mutants
has been made yet, or --module matches no module), and for a usage error.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
JUSTIFIED = REPO / "tools" / "mutation-survivors"  # one TOML file per module: shared.<module>.toml
# mutmut's exit codes (mutmut/stats.py, 3.8), decided here rather than by mutmut's status names, which
# call a crashed runner (255) a timeout: 1 a test failed, 3 pytest's internal error (mutated code that
# breaks collection), 37 the type checker; SIGXCPU (or the SIGKILL after it) a timeout; None, 2 (stopped)
# and 255 (the runner crashed) not run. Only 0, "every test passed", is a survivor a reason can justify;
# anything else (no tests, suspicious, segfault) stays open, but for the "skipped" this tool gives below.
KILLED_CODES = {1, 3, 37}
TIMEOUT_CODES = {-24, 24, 152, -9}
NOT_RUN_CODES = {None, 2, 255}
SURVIVED_CODE = 0
# mutmut's "skipped", which mutmut itself never gives: this tool gives it, before mutmut runs any mutant, to
# each mutant that a survivors-file entry or a general rule already justifies and some test reaches
# (skip_justified)
SKIPPED_CODE = 34
SKIPPED = "justified, not run"


def status_of(exit_code: int | None) -> str:
    """killed, timeout, not run, survived, "justified, not run" (SKIPPED_CODE) or "untested (exit N)"."""
    if exit_code in KILLED_CODES:
        return "killed"
    if exit_code in TIMEOUT_CODES:
        return "timeout"
    if exit_code in NOT_RUN_CODES:
        return "not run"
    if exit_code == SKIPPED_CODE:
        return SKIPPED
    return "survived" if exit_code == SURVIVED_CODE else f"untested (exit {exit_code})"


_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""")
_PROSE = re.compile(r"[a-z].* |.* .*[a-z]")
_SQL = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|RENAME|WHERE|FROM|JOIN|SET|VALUES|TRIGGER|PRAGMA|ROLLBACK|"
    r"BEGIN|COMMIT|SAVEPOINT|RELEASE|AND|OR)\b|\?"
)
_QUOTED = re.compile(r"'[^']*'")  # an SQL string value: compared as written
_ROW_LOOKUP = re.compile(r"\brows?(\[-?\d+\])?\[$")  # row["column"], rows[0]["column"]: a sqlite3.Row lookup
SQLITE_MODULES = "shared.ledger.sqlite"  # the SQLite ledger's modules, the only ones that hold SQL
_NAMES_OBJECTS = re.compile(r"\b(CREATE|ALTER|RENAME|DROP)\b", re.IGNORECASE)  # stores the name as written
_ODATA = re.compile(r"\b(eq|ne|gt|ge|lt|le)\b|@\w")  # Table Storage filters: property names are case-sensitive
_PARSES = re.compile(r"==|!=|\bin\b|\bmatch\b|\bcase\b|startswith|endswith|split|partition|replace|find|index|strip")
SQL_CASE = "equivalent: an SQL statement in another case (SQLite keywords and names are case-insensitive)"
ROW_KEY_CASE = (
    "equivalent: a column looked up in another case (sqlite3.Row matches column names without regard to case)"
)
WORDING = (
    "message wording: only the words of a human-readable text changed (XX added, or case); the error code, "
    "status and behaviour are unchanged, and tests check that a message names what is wrong, not its letters"
)


@dataclass(frozen=True)
class Mutant:
    """One mutant: mutmut's name, its module and function, its status, its changed lines (stripped) and which
    of the function's lines reading like the first removed one it changes (0: the first)."""

    name: str
    module: str
    function: str
    status: str
    removed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    occurrence: int = 0

    @property
    def change(self) -> tuple[str, tuple[str, ...], tuple[str, ...], int]:
        return self.function, self.removed, self.added, self.occurrence


def _rewrites_one_literal(
    removed: tuple[str, ...],
    added: tuple[str, ...],
    judged: Callable[[str, str], bool],
    forms: Callable[[str], tuple],
) -> bool:
    """Whether the change turns one plain string literal that `judged` accepts (by its text, and the line
    before it) into one of `forms(text)`, and leaves the rest of its single line as it was."""
    if len(removed) != 1 or len(added) != 1:
        return False
    before, after = removed[0], added[0]
    for match in _STRING.finditer(before):
        literal, text = match.group(), match.group()[1:-1]
        if before[match.start() - 1 : match.start()].isalpha() or not judged(text, before[: match.start()]):
            continue  # a prefixed (bytes, raw) literal, or one the rule is not about
        quote = literal[0]
        for rewritten in forms(text):
            if rewritten != text and before.replace(literal, quote + rewritten + quote, 1) == after:
                return True
    return False


def wording_only(removed: tuple[str, ...], added: tuple[str, ...]) -> bool:
    """Whether a change only rewrites prose: one string literal that reads as words (a space, a lower-case
    letter; no SQL, no Table Storage filter, not bytes) wrapped in XX or put in lower or upper case (mutmut's
    string operators), the rest of the line the same, and the line compares or parses nothing."""
    if removed and _PARSES.search(_STRING.sub('""', removed[0])):
        return False
    return _rewrites_one_literal(
        removed,
        added,
        lambda text, _: bool(_PROSE.search(text)) and not _SQL.search(text) and not _ODATA.search(text),
        lambda text: (f"XX{text}XX", text.lower(), text.upper()),
    )


def sql_case_only(removed: tuple[str, ...], added: tuple[str, ...]) -> bool:
    """Whether a change only puts SQL in lower or upper case and leaves its quoted values as they were:
    SQLite's keywords and identifiers are case-insensitive (quoted values are not), so the mutant is
    equivalent. Not a statement that creates, renames or drops: SQLite stores the name as written, and
    sqlite_master lookups compare it exactly."""
    return _rewrites_one_literal(
        removed,
        added,
        lambda text, _: bool(_SQL.search(text)) and not _NAMES_OBJECTS.search(text),
        lambda text: tuple(
            form for form in (text.lower(), text.upper()) if _QUOTED.findall(form) == _QUOTED.findall(text)
        ),
    )


def row_key_case_only(removed: tuple[str, ...], added: tuple[str, ...]) -> bool:
    """Whether a change only puts the column name of a `row["name"]` lookup in lower or upper case: the SQLite
    ledger's rows are sqlite3.Row, which matches column names without regard to case."""
    return _rewrites_one_literal(
        removed,
        added,
        lambda text, line: text.isidentifier() and bool(_ROW_LOOKUP.search(line)),
        lambda text: (text.lower(), text.upper()),
    )


def rule_for(mutant: Mutant) -> str | None:
    """The reason a survivor is equivalent or wording-only by one of the general rules, or None. The SQL
    rules hold in the SQLite ledger's modules only (elsewhere a string is no SQL, and a row is a dict)."""
    if mutant.module.startswith(SQLITE_MODULES):
        if sql_case_only(mutant.removed, mutant.added):
            return SQL_CASE
        if row_key_case_only(mutant.removed, mutant.added):
            return ROW_KEY_CASE
    if wording_only(mutant.removed, mutant.added):
        return WORDING
    return None


def changed_lines(original: str, mutant: str) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """The lines the mutant removes and adds (stripped) and the occurrence of the first removed line among
    the original function's lines that read the same."""
    before, after = original.splitlines(), mutant.splitlines()
    changes = [
        op for op in difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes() if op[0] != "equal"
    ]
    if not changes:
        return (), (), 0
    first, last = changes[0], changes[-1]
    removed = tuple(line.strip() for line in before[first[1] : last[2]])
    added = tuple(line.strip() for line in after[first[3] : last[4]])
    anchor = before[first[1]].strip() if first[1] < len(before) else ""
    occurrence = sum(1 for line in before[: first[1]] if line.strip() == anchor)
    return removed, added, occurrence


def function_sources(name: str, path: Path) -> tuple[str, str]:
    """The original function and the mutant, as mutmut wrote them into mutants/ (mutmut's own readers)."""
    import libcst as cst
    from mutmut.mutation.diff_apply import (
        read_functions_from_index,
        read_mutant_function,
        read_mutants_module,
        read_original_function,
    )

    functions = read_functions_from_index(name, path)
    if functions is None:
        module = read_mutants_module(path)
        functions = (read_original_function(module, name), read_mutant_function(module, name))
    original, mutant = (cst.Module([function]).code for function in functions)
    return original, mutant


def function_of(name: str) -> str:
    """`shared.pki.csr._public_key` or `shared.service.access.Principals.factory_for_app` from a mutant name."""
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    module = name.partition("__mutmut_")[0].rpartition(".")[0]
    function, class_name = orig_function_and_class_names_from_key(name)
    return f"{module}.{class_name}.{function}" if class_name else f"{module}.{function}"


def load_mutants() -> tuple[list[Mutant], list[str]]:
    """Every mutant of the last run, read from `mutants/` (run in the project), and the configured modules
    that have no mutants there (not generated: the run is incomplete)."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.utils.file_utils import walk_mutatable_files

    mutants, missing = [], []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        module = ".".join(Path(path).with_suffix("").parts)
        if not data.meta_path.exists():
            missing.append(module)
            continue
        data.load()
        for name, exit_code in sorted(data.exit_code_by_key.items()):
            status = status_of(exit_code)
            if status == "timeout" and cut_short(data, name):
                status = "cut short"
            judged = status in ("killed", "timeout", "not run", "cut short")  # no change to read for these
            change = () if judged else changed_lines(*function_sources(name, path))
            mutants.append(Mutant(name, module, function_of(name), status, *change))
    return mutants, missing


def cut_short(data: Any, name: str) -> bool:
    """Whether mutant `name`'s timeout came before its allowance was up: mutmut's wall-clock limit is
    (estimated time of its tests + timeout_constant) x timeout_multiplier (mutmut/workers/isolation.py),
    and a signal that ends a mutant sooner is a stray one meant for an earlier process with its PID
    (guard_pid_reuse), so the mutant is not judged."""
    from mutmut.configuration import config

    duration = data.durations_by_key.get(name)
    estimate = data.estimated_time_of_tests_by_mutant.get(name)
    if duration is None or estimate is None:
        return False
    allowance = (estimate + config().timeout_constant) * config().timeout_multiplier
    return duration < 0.9 * allowance


def load_justified(folder: Path = JUSTIFIED) -> dict[tuple, str]:
    """{(function, removed lines, added lines, occurrence): reason} from the survivors files (`occurrence`,
    0 when left out, tells apart identical lines of one function); ValueError when malformed."""
    justified = {}
    for path in sorted(folder.glob("*.toml")):
        with open(path, "rb") as handle:
            entries = tomllib.load(handle).get("survivor", [])
        for number, entry in enumerate(entries, 1):
            missing = {"function", "removed", "added", "reason"} - entry.keys()
            if missing or not str(entry.get("reason", "")).strip():
                raise ValueError(f"{path.name}: survivor {number} needs function, removed, added and a reason")
            key = (entry["function"], tuple(entry["removed"]), tuple(entry["added"]), entry.get("occurrence", 0))
            justified[key] = entry["reason"]
    return justified


def toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def draft(mutant: Mutant) -> str:
    """A survivors-file entry for `mutant`, its reason left for a person to write."""
    return "\n".join(
        [
            "[[survivor]]",
            f"# {mutant.name}",
            f"function = {toml_string(mutant.function)}",
            f"removed = [{', '.join(toml_string(line) for line in mutant.removed)}]",
            f"added = [{', '.join(toml_string(line) for line in mutant.added)}]",
            *([f"occurrence = {mutant.occurrence}"] if mutant.occurrence else []),
            'reason = ""',
            "",
        ]
    )


def report(mutants: list[Mutant], missing: list[str], justified: dict[tuple, str], floor: float, drafts: bool) -> int:
    """Print the per-module table and the survivors; 0 when the score and the survivors pass and every
    configured module (`missing` lists those without mutants in mutants/) was mutated."""
    by_module: dict[str, Counter] = defaultdict(Counter)
    open_survivors, justified_survivors, used = [], [], set()
    cut_short_ones: list[str] = []
    unjudged: list[str] = []  # skipped as justified, no longer justified
    for mutant in mutants:
        counts = by_module[mutant.module]
        counts["mutants"] += 1
        if mutant.status in ("killed", "timeout"):
            counts["killed"] += 1
            counts["timeout"] += mutant.status == "timeout"
        elif mutant.status in ("not run", "cut short"):
            counts["not run"] += 1
            cut_short_ones += [mutant.name] if mutant.status == "cut short" else []
        elif mutant.status in ("survived", SKIPPED) and (mutant.change in justified or rule_for(mutant)):
            counts["justified"] += 1
            justified_survivors.append(mutant)
            used.add(mutant.change)
        elif mutant.status == SKIPPED:  # its entry is gone since: it must be run
            counts["not run"] += 1
            unjudged.append(mutant.name)
        else:
            counts["open"] += 1
            open_survivors.append(mutant)
    total = Counter()
    print(f"{'module':40} {'mutants':>8} {'killed':>7} {'justified':>9} {'open':>5} {'not run':>8} {'score':>6}")
    for module, counts in sorted(by_module.items()):
        total.update(counts)
        print(row(module, counts))
    print(row("all", total))
    for mutant in justified_survivors:
        not_run = " (not run)" if mutant.status == SKIPPED else ""
        print(f"justified  {mutant.name}{not_run}: {' / '.join(mutant.removed)} -> {' / '.join(mutant.added)}")
        print(f"           because {justified.get(mutant.change) or rule_for(mutant)}")
    for mutant in open_survivors:
        print(f"OPEN       {mutant.name} ({mutant.status}): {' / '.join(mutant.removed)} -> {' / '.join(mutant.added)}")
        if drafts:
            print(draft(mutant))
    for module in missing:
        print(f"NOT MUTATED {module}: mutants/ holds none of its mutants (the run stopped while making them: {RESUME})")
    for name in cut_short_ones:
        print(f"CUT SHORT  {name}: its timeout came before its time was up (a stray signal), so it is not judged")
    if cut_short_ones:
        print(f"judge them again: {TOOL} run {' '.join(cut_short_ones)}")
    for name in unjudged:
        print(f"UNJUSTIFIED SKIP {name}: skipped as justified, no entry justifies it now: resume ({TOOL} run)")
    if total["timeout"]:
        print(f"{total['timeout']} of the killed mutants made their tests run out of time (counted as killed)")
    skipped = sum(mutant.status == SKIPPED for mutant in justified_survivors)
    if skipped:
        print(f"{skipped} of the justified survivors were not run (justified before the run: never counted as killed)")
    stale = [key for key in justified if key not in used and _module_of(key[0]) & set(by_module)]
    if stale and not total["not run"]:
        print(f"{len(stale)} survivors-file entries of these modules match no survivor (killed now, or code changed):")
        for function, removed, added, _ in stale:
            print(f"  {function}: {' / '.join(removed)} -> {' / '.join(added)}")
    score = 100 * total["killed"] / max(total["mutants"], 1)
    passed = score >= floor and not open_survivors and not total["not run"] and not missing
    print(
        f"mutation score {score:.1f}% killed ({total['killed']} of {total['mutants']}; floor {floor:g}%), "
        f"{total['justified']} survivors justified, {total['open']} open, {total['not run']} not run: "
        + ("passed" if passed else "FAILED")
    )
    return 0 if passed else 1


TOOL = ".venv/bin/python tools/mutation.py"  # as the README runs it, in the project's virtual environment
RESUME = f"resume it with {TOOL} run; make mutation would start over"


def _module_of(function: str) -> set[str]:
    """The modules a function's dotted name can belong to: it is a function or a class's method."""
    owner = function.rpartition(".")[0]
    return {owner, owner.rpartition(".")[0]}


def row(module: str, counts: Counter) -> str:
    score = 100 * counts["killed"] / max(counts["mutants"], 1)
    return (
        f"{module:40} {counts['mutants']:8} {counts['killed']:7} {counts['justified']:9} {counts['open']:5} "
        f"{counts['not run']:8} {score:5.1f}%"
    )


PID_MAX = Path("/proc/sys/kernel/pid_max")
SAFE_PID_MAX = 4_194_304  # Linux's largest (PID_MAX_LIMIT on 64-bit)


def guard_pid_reuse(pid_max: Path = PID_MAX) -> str | None:
    """Raise the kernel's `pid_max` to SAFE_PID_MAX when it is lower and can be written (as root); what
    was done or what to do, or None when nothing was needed. mutmut 3.8.1 never cancels a mutant's timeout
    (mutmut/workers/timeout.py): when the time is up, SIGXCPU goes to the mutant's PID even if the mutant
    ended long before, to whatever process has that PID by then; with the default 32,768 PIDs come round
    within minutes on a busy machine, and a mutant ended so would count as a timeout, so killed."""
    try:
        current = int(pid_max.read_text())
    except (OSError, ValueError):
        return None  # not Linux, or no /proc: nothing to check
    if current >= SAFE_PID_MAX:
        return None
    try:
        pid_max.write_text(f"{SAFE_PID_MAX}\n")
    except OSError:
        return (
            f"warning: kernel.pid_max is {current:,}: mutmut's stray timeout signals may reach a reused PID "
            f"(another mutant, counted killed); as root, run `sysctl kernel.pid_max={SAFE_PID_MAX}` first"
        )
    return f"kernel.pid_max raised from {current:,} to {SAFE_PID_MAX:,} (mutmut's stray timeout signals)"


def refresh_changed_sources(root: Path = REPO) -> list[str]:
    """Remove the mutants/ copy of each source file changed since it was mutated (the source newer than
    its copy), so that mutmut copies it afresh before it measures coverage; the paths removed.

    mutmut 3.8.1 measures the lines the tests cover (mutate_only_covered_lines) on the files in mutants/,
    which for a changed file is still the old mutated copy (`copy_src_dir` skips files already there):
    its line numbers are another file's, so the file's new mutants are made for the wrong lines, and the
    verdicts of its unchanged functions are dropped with the mutants not made. On 2026-11-30 the Table
    ledger's mutants fell from about 1,900 to 330 so. Measured on a fresh copy, the file's mutants are
    made as in a whole run, and mutmut keeps each unchanged function's verdicts by their names."""
    removed = []
    mutants = root / "mutants"
    for source in sorted((root / "shared").rglob("*.py")):
        copy = mutants / source.relative_to(root)
        if copy.exists() and source.stat().st_mtime > copy.stat().st_mtime:
            copy.unlink()
            removed.append(str(source.relative_to(root)))
    return removed


def forget_open_survivors(justified: dict[tuple, str]) -> int:
    """Make every survivor of the run in `mutants/` (run in the project) that no rule or entry justifies not
    run, so that the run judges it again with today's tests (those written to kill it); how many."""
    open_names = {
        mutant.name
        for mutant in load_mutants()[0]
        if mutant.status == "survived" and mutant.change not in justified and not rule_for(mutant)
    }
    forgotten = 0
    for meta_path in Path("mutants").rglob("*.py.meta"):
        meta = json.loads(meta_path.read_text())
        names = [name for name in meta["exit_code_by_key"] if name in open_names]
        for name in names:
            meta["exit_code_by_key"][name] = None
        if names:
            meta_path.write_text(json.dumps(meta))
            forgotten += len(names)
    return forgotten


def skip_justified(justified: dict[tuple, str], has_tests: Callable[[str], bool]) -> int:
    """Give each mutant of `mutants/` (run in the project) that has no verdict yet, that some test reaches
    (`has_tests(name)`), and whose change an entry of `justified` or a general rule justifies, the verdict
    SKIPPED_CODE, so that mutmut does not run it; and take that verdict back from each mutant it no longer
    fits (its entry gone, or no test reaching it now), so that mutmut runs it. How many are skipped.

    Such a mutant would only be run to learn whether a test kills it after all. Left unrun, it counts as a
    survivor (justified, not killed), so skipping can only lower the score, never raise it, and it saves the
    dearest part of a run: a survivor runs every test that reaches its function. A mutant no test reaches is
    never skipped: mutmut calls it "no tests", which stays open. `--judge-justified` runs them all (to find
    entries a test has made unnecessary)."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.utils.file_utils import walk_mutatable_files

    skipped = 0
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        if not data.meta_path.exists():
            continue
        data.load()
        module = ".".join(Path(path).with_suffix("").parts)
        undecided = [name for name, code in data.exit_code_by_key.items() if code in (None, SKIPPED_CODE)]
        for name in undecided:
            mutant = Mutant(name, module, function_of(name), SKIPPED, *changed_lines(*function_sources(name, path)))
            fits = has_tests(name) and (mutant.change in justified or rule_for(mutant) is not None)
            data.exit_code_by_key[name] = SKIPPED_CODE if fits else None
            skipped += fits
        if undecided:
            data.save()
    return skipped


def mutmut_skipping_justified(arguments: list[str], justified: dict[tuple, str]) -> None:
    """`mutmut ARGUMENTS`, in this process, with every justified mutant skipped (skip_justified) once mutmut
    has made the mutants and traced the tests, just before it runs them.

    mutmut 3.8.1 has no hook there: its `run` makes the mutants, traces the tests, then reads the verdicts
    with `collect_source_file_mutation_data` and runs only mutants without one; so that function is wrapped
    (by then mutmut's state holds the tests it traced for each function).
    requirements-dev.txt pins mutmut, and test_mutation_tool.py runs this path."""
    import mutmut.__main__ as mutmut_main
    from mutmut.state import state
    from mutmut.utils.format_utils import mangled_name_from_mutant_name

    collect = mutmut_main.collect_source_file_mutation_data

    def has_tests(name: str) -> bool:  # as mutmut's _run finds a mutant's tests (its "no tests" otherwise)
        function = mangled_name_from_mutant_name(name.replace("__init__.", ""))
        return bool(state().tests_by_mangled_function_name.get(function))

    def collect_skipping_justified(**kwargs: Any) -> Any:
        skipped = skip_justified(justified, has_tests)
        print(f"{skipped} mutant(s) justified by an entry or a rule: not run", file=sys.stderr)
        return collect(**kwargs)

    mutmut_main.collect_source_file_mutation_data = collect_skipping_justified
    mutmut_main.cli.main(args=arguments, prog_name="mutmut")


NO_TESTS_CODE = 33  # mutmut: no test reaches the mutant's function (by its last tracing of the tests)


def forget_verdicts(mutants: Path, code: int) -> int:
    """Make every mutant in `mutants` whose verdict is `code` not run, so that the run judges it (mutmut runs
    only mutants without a verdict): NO_TESTS_CODE once the tests are traced again, SKIPPED_CODE to judge
    the justified ones too; how many."""
    forgotten = 0
    for meta_path in mutants.rglob("*.py.meta"):
        meta = json.loads(meta_path.read_text())
        codes = meta["exit_code_by_key"]
        names = [name for name, verdict in codes.items() if verdict == code]
        for name in names:
            codes[name] = None
        if names:
            meta_path.write_text(json.dumps(meta))
            forgotten += len(names)
    return forgotten


# the child that runs mutmut skipping the justified mutants: argv[1] the survivors folder, then mutmut's arguments
_SKIPPING_CHILD = (
    "import sys; from pathlib import Path; sys.path.insert(0, {tools!r}); import mutation; "
    "mutation.mutmut_skipping_justified(sys.argv[2:], mutation.load_justified(Path(sys.argv[1])))"
)


def run(children: int, names: list[str], survivors: Path | None) -> int:
    """`mutmut run` with one Azurite Table service shared by every test session, skipping the mutants that the
    entries in `survivors` (or a general rule) justify, or none when it is None; mutmut's exit status."""
    said = guard_pid_reuse()
    if said:
        print(said, file=sys.stderr)
    changed = refresh_changed_sources()
    if changed:
        print(f"changed since mutants/ was made, copied afresh: {', '.join(changed)}", file=sys.stderr)
        # mutmut traces again only the tests that are new: an old test that now reaches a new or renamed
        # function would leave that function's mutants with "no tests"; every test is traced again
        # (every verdict is kept)
        (REPO / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
        forget_verdicts(REPO / "mutants", NO_TESTS_CODE)
    sys.path.insert(0, str(REPO))
    from tests.azurite import AZURITE_TABLE, Azurite

    azurite = Azurite()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop Azurite when the run is stopped
    try:
        # the tests run inside mutants/, where the project's own Azurite path does not lead to it; and CI's
        # Hypothesis profile (fixed examples, no deadline), so a slow mutant is not "killed" by a deadline
        environment = {
            "AZURITE_TABLE": str(AZURITE_TABLE),
            "CI": "1",
            **os.environ,
            "AZURITE_TABLE_PORT": str(azurite.port),
        }
        arguments = ["run", "--max-children", str(children), *names]
        command = [sys.executable, "-m", "mutmut", *arguments]
        if survivors is not None:
            child = _SKIPPING_CHILD.format(tools=str(Path(__file__).resolve().parent))
            command = [sys.executable, "-c", child, str(survivors), *arguments]
        status = subprocess.run(command, cwd=REPO, env=environment, check=False).returncode
        if not azurite.answers():
            print("Azurite stopped answering during the run: rerun the Table ledger's mutants", file=sys.stderr)
            return 1
        return status
    finally:
        azurite.stop()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: `run [PATTERN ...]` or `report`, with the options below."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 passed, 1 failed (or the run did not finish), 2 no run to report on, no mutant "
        "made yet, no module matching --module, or a usage error. "
        "`run` starts Azurite from AZURITE_TABLE, or from the project's tools/azurite (make azurite installs it).",
    )
    parser.add_argument("command", choices=["run", "report"], help="run mutmut then report, or report the last run")
    parser.add_argument("mutants", nargs="*", help="run: mutmut name patterns to run (all configured when none)")
    parser.add_argument("--floor", type=float, default=90.0, help="least percentage of mutants killed (90)")
    parser.add_argument(
        "--again-open",
        action="store_true",
        help="run: judge again every open survivor of the run so far (after writing the tests that kill them)",
    )
    parser.add_argument(
        "--judge-justified",
        action="store_true",
        help="run: run the mutants that a survivors-file entry or a general rule justifies too (by default they "
        "are not run and count as survivors, which can only lower the score), to find entries a test now makes "
        "unnecessary",
    )
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="run: mutants run at once (CPUs)")
    parser.add_argument("--draft", action="store_true", help="report: a survivors-file entry for each open survivor")
    parser.add_argument("--module", action="append", help="report: only modules whose name starts so (repeatable)")
    parser.add_argument(
        "--survivors",
        type=Path,
        default=JUSTIFIED,
        help="folder of justified survivors' files (default: this project's tools/mutation-survivors, also with "
        "--from: a run made elsewhere is judged by these files)",
    )
    parser.add_argument(
        "--from",
        dest="folder",
        type=Path,
        default=REPO,
        help="report: the folder holding the run's mutants/ (this project)",
    )
    args = parser.parse_intermixed_args(argv)
    if args.command == "report" and args.mutants:
        parser.error("report takes no mutant patterns: use --module to report some modules")
    return args


def main() -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `report | head` ends quietly
    args = parse()
    survivors = args.survivors.resolve()
    if args.command == "run":
        args.folder = REPO
        os.chdir(REPO)
        if args.again_open and (REPO / "mutants").is_dir():
            print(
                f"{forget_open_survivors(load_justified(survivors))} open survivor(s) to judge again", file=sys.stderr
            )
        if args.judge_justified and (REPO / "mutants").is_dir():
            print(
                f"{forget_verdicts(REPO / 'mutants', SKIPPED_CODE)} mutant(s) skipped as justified to judge",
                file=sys.stderr,
            )
        if run(args.children, args.mutants, None if args.judge_justified else survivors) != 0:
            print("mutmut run did not finish; the report below covers what it did", file=sys.stderr)
    if not (args.folder / "mutants").is_dir():
        print(f"no mutation run to report on in {args.folder}: make mutation, or --from a folder holding mutants/")
        return 2
    os.chdir(args.folder)
    wanted = tuple(args.module or ("",))
    mutants, missing = load_mutants()
    if not mutants:
        print(f"the run in {args.folder} has made no mutants yet (mutmut is still setting up, or stopped): {RESUME}")
        return 2
    known = {mutant.module for mutant in mutants} | set(missing)
    unmatched = [prefix for prefix in wanted if not any(module.startswith(prefix) for module in known)]
    if unmatched:
        print(f"no mutated module's name starts with {', '.join(map(repr, unmatched))}: see a whole report's table")
        return 2
    mutants = [mutant for mutant in mutants if mutant.module.startswith(wanted)]
    missing = [module for module in missing if module.startswith(wanted)]
    return report(mutants, missing, load_justified(survivors), args.floor, args.draft)


if __name__ == "__main__":
    sys.exit(main())
