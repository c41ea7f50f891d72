"""Mutation testing of the security-critical modules: run mutmut, print the score and every survivor.

`make mutation` runs `python tools/mutation.py run`: one Azurite Table service for the whole run (the
ledger tests' thousands of short pytest sessions share it; see tests/azurite.py), `mutmut run`, then the
report. `python tools/mutation.py report` prints the report of the last run again (from `mutants/`).

The report gives, per module, mutants killed (a test failed; a timeout counts, since the mutant made the
suite hang), survived and not run, and lists each survivor with its change. A survivor is *justified*
when a file of `tools/mutation-survivors/` holds an entry with the same function and the same changed lines,
and a reason; entries are matched by the change, not by mutmut's numbering, so they outlive edits
elsewhere in the function. Exit status: 0 when at least --floor percent of the mutants are killed and
every survivor is justified, 1 otherwise, 2 when there is no run to report on.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JUSTIFIED = REPO / "tools" / "mutation-survivors"  # one TOML file per module: shared.<module>.toml
# mutmut's exit codes as it classifies them (mutmut.stats.status_by_exit_code, mutmut 3.8)
KILLED_STATUSES = {"killed", "timeout", "segfault", "caught by type check"}
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""")
_PROSE = re.compile(r"[a-z].* |.* .*[a-z]")
_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|WHERE|FROM|VALUES|TRIGGER|PRAGMA|ROLLBACK|BEGIN|COMMIT)\b")
_PARSES = re.compile(r"==|!=|\bin\b|\bmatch\b|\bcase\b|startswith|endswith|split|partition|replace|find|index|strip")
SQL_CASE = "equivalent: an SQL statement in another case (SQLite keywords and names are case-insensitive)"
WORDING = (
    "message wording: only the words of a human-readable text changed (XX added, or case); the error code, "
    "status and behaviour are unchanged, and tests check that a message names what is wrong, not its letters"
)


@dataclass(frozen=True)
class Mutant:
    """One mutant: mutmut's name, the module and function it changes, its status and its changed lines."""

    name: str
    module: str
    function: str
    status: str
    removed: tuple[str, ...]
    added: tuple[str, ...]

    @property
    def change(self) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        return self.function, self.removed, self.added


def wording_only(removed: tuple[str, ...], added: tuple[str, ...]) -> bool:
    """Whether a change only rewrites prose: one string literal that reads as words (a space, a lower-case
    letter; no SQL, not bytes) wrapped in XX or put in lower or upper case (mutmut's string operators), the
    rest of the line the same, and the line compares or parses nothing."""
    if len(removed) != 1 or len(added) != 1:
        return False
    before, after = removed[0], added[0]
    if _PARSES.search(_STRING.sub('""', before)):
        return False
    for match in _STRING.finditer(before):
        literal, text = match.group(), match.group()[1:-1]
        if before[match.start() - 1 : match.start()].isalpha() or not _PROSE.search(text) or _SQL.search(text):
            continue  # a prefixed (bytes, raw) literal, a token or a statement
        quote = literal[0]
        for rewritten in (f"XX{text}XX", text.lower(), text.upper()):
            if rewritten != text and before.replace(literal, quote + rewritten + quote, 1) == after:
                return True
    return False


def sql_case_only(removed: tuple[str, ...], added: tuple[str, ...]) -> bool:
    """Whether a change only puts an SQL statement without quoted values in lower or upper case: SQLite's
    keywords and identifiers are case-insensitive (only quoted literals are not), so the mutant is equivalent."""
    if len(removed) != 1 or len(added) != 1:
        return False
    before, after = removed[0], added[0]
    for match in _STRING.finditer(before):
        literal, text = match.group(), match.group()[1:-1]
        if not _SQL.search(text) or "'" in text or before[match.start() - 1 : match.start()].isalpha():
            continue
        quote = literal[0]
        for rewritten in (text.lower(), text.upper()):
            if rewritten != text and before.replace(literal, quote + rewritten + quote, 1) == after:
                return True
    return False


def rule_for(mutant: Mutant) -> str | None:
    """The reason a survivor is equivalent or wording-only by one of the two general rules, or None."""
    if sql_case_only(mutant.removed, mutant.added):
        return SQL_CASE
    if wording_only(mutant.removed, mutant.added):
        return WORDING
    return None


def changed_lines(diff: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The removed and added lines of a unified diff, stripped of indentation."""
    lines = [line for line in diff.splitlines() if not line.startswith(("---", "+++", "@@"))]
    removed = tuple(line[1:].strip() for line in lines if line.startswith("-"))
    added = tuple(line[1:].strip() for line in lines if line.startswith("+"))
    return removed, added


def function_of(name: str) -> str:
    """`shared.pki.csr._public_key` or `shared.service.access.Principals.factory_for_app` from a mutant name."""
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    module = name.partition("__mutmut_")[0].rpartition(".")[0]
    function, class_name = orig_function_and_class_names_from_key(name)
    return f"{module}.{class_name}.{function}" if class_name else f"{module}.{function}"


def load_mutants() -> list[Mutant]:
    """Every mutant of the last run, read from `mutants/` with mutmut's own readers (run in REPO)."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    mutants = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        module = ".".join(Path(path).with_suffix("").parts)
        for name, exit_code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[exit_code]
            removed = added = ()
            if status not in KILLED_STATUSES and status != "not checked":
                removed, added = changed_lines(get_diff_for_mutant(name, path=path))
            mutants.append(Mutant(name, module, function_of(name), status, removed, added))
    return mutants


def load_justified(folder: Path = JUSTIFIED) -> dict[tuple, str]:
    """{(function, removed lines, added lines): reason} from the survivors files; ValueError when malformed."""
    justified = {}
    for path in sorted(folder.glob("*.toml")):
        with open(path, "rb") as handle:
            entries = tomllib.load(handle).get("survivor", [])
        for number, entry in enumerate(entries, 1):
            missing = {"function", "removed", "added", "reason"} - entry.keys()
            if missing or not str(entry.get("reason", "")).strip():
                raise ValueError(f"{path.name}: survivor {number} needs function, removed, added and a reason")
            justified[(entry["function"], tuple(entry["removed"]), tuple(entry["added"]))] = entry["reason"]
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
            'reason = ""',
            "",
        ]
    )


def report(mutants: list[Mutant], justified: dict[tuple, str], floor: float, drafts: bool) -> int:
    """Print the per-module table and the survivors; 0 when the score and the survivors pass."""
    by_module: dict[str, Counter] = defaultdict(Counter)
    open_survivors, justified_survivors, used = [], [], set()
    for mutant in mutants:
        counts = by_module[mutant.module]
        counts["mutants"] += 1
        if mutant.status in KILLED_STATUSES:
            counts["killed"] += 1
        elif mutant.status == "not checked":
            counts["not run"] += 1
        elif mutant.change in justified or rule_for(mutant):
            counts["justified"] += 1
            justified_survivors.append(mutant)
            used.add(mutant.change)
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
        print(f"justified  {mutant.name}: {justified.get(mutant.change) or rule_for(mutant)}")
    for mutant in open_survivors:
        print(f"OPEN       {mutant.name} ({mutant.status}): {' / '.join(mutant.removed)} -> {' / '.join(mutant.added)}")
        if drafts:
            print(draft(mutant))
    stale = len(justified) - len(used)
    if stale and not total["not run"]:
        print(f"{stale} entries of {JUSTIFIED.name}/ match no survivor of this run (killed now, or the code changed)")
    score = 100 * total["killed"] / max(total["mutants"], 1)
    passed = score >= floor and not open_survivors and not total["not run"]
    print(
        f"mutation score {score:.1f}% killed ({total['killed']} of {total['mutants']}; floor {floor:g}%), "
        f"{total['justified']} survivors justified, {total['open']} open, {total['not run']} not run: "
        + ("passed" if passed else "FAILED")
    )
    return 0 if passed else 1


def row(module: str, counts: Counter) -> str:
    score = 100 * counts["killed"] / max(counts["mutants"], 1)
    return (
        f"{module:40} {counts['mutants']:8} {counts['killed']:7} {counts['justified']:9} {counts['open']:5} "
        f"{counts['not run']:8} {score:5.1f}%"
    )


def run(children: int, names: list[str]) -> int:
    """`mutmut run` with one Azurite Table service shared by every test session; mutmut's exit status."""
    sys.path.insert(0, str(REPO))
    from tests.azurite import Azurite

    azurite = Azurite()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop Azurite when the run is stopped
    try:
        environment = {**os.environ, "AZURITE_TABLE_PORT": str(azurite.port)}
        command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names]
        return subprocess.run(command, cwd=REPO, env=environment, check=False).returncode
    finally:
        azurite.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report"], help="run mutmut then report, or report the last run")
    parser.add_argument("mutants", nargs="*", help="mutmut name patterns to run (all configured when none)")
    parser.add_argument("--floor", type=float, default=90.0, help="least percentage of mutants killed (90)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants run at once (CPUs)")
    parser.add_argument("--draft", action="store_true", help="print a survivors-file entry for each open survivor")
    parser.add_argument("--module", action="append", help="report only modules starting with this (repeatable)")
    parser.add_argument("--survivors", type=Path, default=JUSTIFIED, help="folder of justified survivors' files")
    parser.add_argument("--mutants", type=Path, default=REPO, help="folder holding the run's mutants/ (this project)")
    args = parser.parse_args()
    survivors = args.survivors.resolve()
    os.chdir(args.mutants)
    if args.command == "run" and run(args.children, args.mutants) != 0:
        print("mutmut run did not finish; the report below covers what it did", file=sys.stderr)
    if not Path("mutants").is_dir():
        print("no mutation run to report on: make mutation", file=sys.stderr)
        return 2
    mutants = [m for m in load_mutants() if not args.module or m.module.startswith(tuple(args.module))]
    return report(mutants, load_justified(survivors), args.floor, args.draft)


if __name__ == "__main__":
    sys.exit(main())
