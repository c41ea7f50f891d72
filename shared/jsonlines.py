"""JSON Lines as POST /api/batches and `python cli.py sign-batch` read it, one implementation for both, and
the JSON form of a batch that both take too (`read_batch_object`).

Lines end at LF (CRLF too): not str.splitlines, which also breaks at U+2028 and other characters a JSON
string may hold as they are. A line of nothing but JSON whitespace is blank and holds no item; the others
are items, in order. Each item keeps its line number as the client's file has it (1-based, blank lines
counted), so that whatever is said about an item can name its line. Each line is decoded as UTF-8 on its
own (RFC 8259 section 8.1; the byte-order marks a line starts with are dropped, as files joined with `cat`
leave them): bytes that are not UTF-8 spoil their own line, as a line that is not JSON does, and no other.
"""

import codecs
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CaError

_JSON_WHITESPACE = b" \t\r"  # and LF, which ends the line
TOO_DEEP_OR_LONG = "the body is not JSON this route reads: nested too deeply, or a number too long"


@dataclass(frozen=True)
class NotJson:
    """A line that is not JSON, and why: its item's failure, not the whole body's."""

    reason: str


@dataclass(frozen=True)
class NotUtf8:
    """A line that is not UTF-8 text: its item's failure, not the whole body's."""


@dataclass(frozen=True)
class JsonLines:
    """The items of a JSON Lines text (each a JSON value, NotJson or NotUtf8) and the line number of each."""

    items: list[Any]
    lines: list[int]


def read_json_lines(data: bytes) -> JsonLines:
    """The items of `data` (JSON Lines, https://jsonlines.org): each line that is not blank parsed as JSON
    (NotJson when it is not, NotUtf8 when it is not UTF-8 text), with its line number. Never raises."""
    # files joined with `cat`, each saved with a byte-order mark: any line may start with one (an empty
    # file saved so makes a line of a mark alone, blank like any other)
    lines = (_without_marks(line) for line in data.split(b"\n"))
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip(_JSON_WHITESPACE)]
    return JsonLines([_value(line) for _, line in numbered], [number for number, _ in numbered])


_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),  # before UTF-16's: it starts with the same two bytes
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def wide_encoding(data: bytes) -> str | None:
    """ "UTF-16" or "UTF-32" when `data` is JSON text in that encoding (a byte-order mark, or the NUL bytes
    of RFC 4627 §3 in its first four bytes: UTF-8 JSON holds no NUL), else None. JSON exchanged between
    systems is UTF-8 (RFC 8259 §8.1); Windows PowerShell 5 writes UTF-16 by default."""
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            return name
    head = data[:4]
    if len(head) < 4:
        return None
    if head[:3] == b"\0\0\0" or head[1:] == b"\0\0\0":
        return "UTF-32"
    if (head[0] == 0 and head[2] == 0) or (head[1] == 0 and head[3] == 0):
        return "UTF-16"
    return None


def read_batch_object(body: bytes) -> tuple[list[Any], str | None]:
    """The items and `intermediateId` of a batch in its JSON form, `{"items": [...], "intermediateId"?}` (the
    items are checked one by one later, each failing alone). CaError "invalid-request", in words about "the
    body", when it is not UTF-8, not JSON, or not such an object."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CaError("the body is not UTF-8 text", "invalid-request") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        hint = "; JSON Lines (one item a line) is sent as application/jsonl" if error.msg == "Extra data" else ""
        raise CaError(f"the body is not valid JSON: {error}{hint}", "invalid-request") from None
    except (ValueError, RecursionError):  # a number too long to read, arrays or objects nested too deeply
        raise CaError(TOO_DEEP_OR_LONG, "invalid-request") from None
    if not isinstance(document, dict) or not isinstance(document.get("items"), list):
        raise CaError('the body must be a JSON object {"items": [{"deviceId", "csr"}, ...]}', "invalid-request")
    unknown = sorted(set(document) - {"items", "intermediateId"})
    if unknown:
        raise CaError(
            f"unknown field(s) in the body: {', '.join(repr(n)[:40] for n in unknown[:3])}", "invalid-request"
        )
    intermediate = document.get("intermediateId")
    if intermediate is not None and not isinstance(intermediate, str):
        raise CaError("intermediateId must be a string", "invalid-request")
    return document["items"], intermediate


def is_batch_object(data: bytes) -> bool:
    """Whether `data`'s whole text is one JSON object with an "items" field: a batch in its JSON form (a JSON
    Lines item is an object without one)."""
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON (JSON Lines of several items), too deep
        return False
    return isinstance(document, dict) and "items" in document


def line_problem(line: int, value: Any, problem: str) -> str:
    """What is wrong with the item on `line`, as its error message: `problem` is what is wrong with an item
    that is a JSON object; a line that is not JSON, or JSON but not an object, says so instead."""
    if isinstance(value, NotJson):
        return f"line {line} is not JSON: {value.reason}"
    if isinstance(value, NotUtf8):
        return f"line {line} is not UTF-8 text"
    if not isinstance(value, Mapping):
        return f'line {line} is JSON but not an object ({_kind(value)}); a line holds one {{"deviceId", "csr"}}'
    return f"line {line}: {problem}"


def _without_marks(line: bytes) -> bytes:
    """`line` without the byte-order marks it starts with (an empty file saved with one, joined with `cat`
    before another such file, leaves two)."""
    while line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8) :]
    return line


def _value(line: bytes) -> Any:
    try:
        text = line.removesuffix(b"\r").decode("utf-8")  # a CRLF's CR is no column of the line
    except UnicodeDecodeError:
        return NotUtf8()
    try:
        return json.loads(text)
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
