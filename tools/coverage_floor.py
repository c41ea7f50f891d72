"""Fail when line or branch coverage of `shared/` falls under its floor (read from coverage.py's JSON).

coverage.py's own `fail_under` is one figure for lines and branches together; the project keeps one
floor for each. Usage: python tools/coverage_floor.py coverage.json --lines 95 --branches 85
"""

import argparse
import json
import sys


def shares(report: dict, prefix: str) -> tuple[float, float]:
    """(line %, branch %) over the files whose path starts with `prefix`."""
    statements = executed = branches = taken = 0
    for path, data in report["files"].items():
        if path.startswith(prefix):
            summary = data["summary"]
            statements += summary["num_statements"]
            executed += summary["covered_lines"]
            branches += summary.get("num_branches", 0)
            taken += summary.get("covered_branches", 0)
    return 100 * executed / max(statements, 1), 100 * taken / max(branches, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="coverage.py JSON report (coverage json -o FILE)")
    parser.add_argument("--prefix", default="shared/")
    parser.add_argument("--lines", type=float, required=True, help="floor for line coverage, percent")
    parser.add_argument("--branches", type=float, required=True, help="floor for branch coverage, percent")
    args = parser.parse_args()
    with open(args.report) as handle:
        lines, branches = shares(json.load(handle), args.prefix)
    print(
        f"coverage of {args.prefix}: {lines:.1f}% of lines (floor {args.lines:g}%), "
        f"{branches:.1f}% of branches (floor {args.branches:g}%)"
    )
    if lines < args.lines or branches < args.branches:
        print("coverage is under its floor: add tests for what the report lists as missing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
