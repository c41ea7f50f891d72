"""JSON Lines as POST /api/batches and `python cli.py sign-batch` read it, one implementation for both.

Lines end at LF (CRLF too): not str.splitlines, which also breaks at U+2028 and other characters a JSON
string may hold as they are. A line of nothing but JSON whitespace is blank and holds no item; the others
are items, in order. Each item keeps its line number as the client's file has it (1-based, blank lines
counted), so that whatever is said about an item can name its line.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_JSON_WHITESPACE = " \t\r"  # and LF, which ends the line


@dataclass(frozen=True)
class NotJson:
    """A line that is not JSON, and why: its item's failure, not the whole body's."""

    reason: str


@dataclass(frozen=True)
class JsonLines:
    """The items of a JSON Lines text (each a JSON value, or NotJson) and the line number of each."""

    items: list[Any]
    lines: list[int]


def read_json_lines(text: str) -> JsonLines:
    """The items of `text` (JSON Lines, https://jsonlines.org): each line that is not blank parsed as JSON
    (NotJson when it is not), with its line number. Never raises."""
    numbered = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip(_JSON_WHITESPACE)]
    return JsonLines([_value(line) for _, line in numbered], [number for number, _ in numbered])


def line_of_byte(data: bytes, offset: int) -> int:
    """The line number (1-based) of the byte at `offset` in `data`."""
    return data.count(b"\n", 0, offset) + 1


def line_problem(line: int, value: Any, problem: str) -> str:
    """What is wrong with the item on `line`, as its error message: `problem` is what is wrong with an item
    that is a JSON object; a line that is not JSON, or JSON but not an object, says so instead."""
    if isinstance(value, NotJson):
        return f"line {line} is not JSON: {value.reason}"
    if not isinstance(value, Mapping):
        return f'line {line} is JSON but not an object ({_kind(value)}); a line holds one {{"deviceId", "csr"}}'
    return f"line {line}: {problem}"


def _value(line: str) -> Any:
    try:
        return json.loads(line.removesuffix("\r"))  # a CRLF's CR is no column of the line
    except json.JSONDecodeError as error:
        return NotJson(f"{error.msg} (column {error.colno})")
    except (ValueError, RecursionError):  # a number too long to read, arrays or objects nested too deeply
        return NotJson("nested too deeply, or a number too long")


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return "a number"
