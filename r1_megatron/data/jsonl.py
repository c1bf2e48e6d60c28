"""JSONL datasets: prompt sets, code tasks and SFT pairs, with per-line error reports.

Kinds and their required fields (extra fields are kept as they are):
- ``prompt``: ``{"prompt": str, "answer": str | int}`` (an int answer is turned into its string);
- ``code``:   ``{"prompt": str, "tests": [str | {"input": str, "output": str}, ...]}`` (non-empty);
- ``sft``:    ``{"prompt": str, "response": str}``.

A bad line (invalid JSON, not an object, a missing field, a wrong type, an empty prompt) becomes a
`JsonlError` naming ``file:line`` and the reason, and the good lines are still returned. Blank lines
are skipped. ``strict=True`` raises on the first bad line instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("prompt", "code", "sft")


@dataclass(frozen=True)
class JsonlError:
    """One rejected line: where it is and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class JsonlFormatError(ValueError):
    """Raised by strict reads; the message is ``file:line: reason``."""


def _check_str(record: dict, key: str) -> str | None:
    if key not in record:
        return f"missing field '{key}'"
    if not isinstance(record[key], str):
        return f"field '{key}' must be a string, got {type(record[key]).__name__}"
    return None


def _check_test(test: Any, k: int) -> str | None:
    if isinstance(test, str):
        return None
    if isinstance(test, dict):
        for key in ("input", "output"):
            if not isinstance(test.get(key), str):
                return f"tests[{k}] needs string fields 'input' and 'output'"
        return None
    return f"tests[{k}] must be a string or an {{input, output}} object, got {type(test).__name__}"


def validate_record(record: Any, kind: str) -> tuple[dict | None, str | None]:
    """(normalized record, None) if `record` is a valid `kind` item, else (None, reason)."""
    if kind not in KINDS:
        raise ValueError(f"unknown JSONL kind '{kind}'; known: {list(KINDS)}")
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    reason = _check_str(record, "prompt")
    if reason is None and not record["prompt"].strip():
        reason = "field 'prompt' is empty"
    if reason:
        return None, reason
    if kind == "prompt":
        answer = record.get("answer")
        if "answer" not in record:
            return None, "missing field 'answer'"
        if isinstance(answer, bool) or not isinstance(answer, str | int):
            return None, f"field 'answer' must be a string or an integer, got {type(answer).__name__}"
        return {**record, "answer": str(answer)}, None
    if kind == "sft":
        reason = _check_str(record, "response")
        return (None, reason) if reason else (dict(record), None)
    tests = record.get("tests")
    if "tests" not in record:
        return None, "missing field 'tests'"
    if not isinstance(tests, list) or not tests:
        return None, "field 'tests' must be a non-empty list"
    for k, test in enumerate(tests):
        reason = _check_test(test, k)
        if reason:
            return None, reason
    return dict(record), None


def read_lines(
    path: str | Path, check: Callable[[Any], tuple[dict | None, str | None]], *, strict: bool = False
) -> tuple[list[tuple[int, dict]], list[JsonlError]]:
    """Every non-blank line of a JSONL file, parsed and passed to `check(record) -> (item, reason)`:
    ((line number, item) for the lines it accepts, in file order; errors for the others)."""
    items: list[tuple[int, dict]] = []
    errors: list[JsonlError] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                record, reason = None, f"invalid JSON ({e.msg} at column {e.colno})"
            else:
                record, reason = check(record)
            if reason is None:
                items.append((number, record))
                continue
            error = JsonlError(str(path), number, reason)
            if strict:
                raise JsonlFormatError(str(error))
            errors.append(error)
    return items, errors


def read_jsonl(path: str | Path, kind: str, *, strict: bool = False) -> tuple[list[dict], list[JsonlError]]:
    """Read a `kind` JSONL file: (good items in file order, errors for the bad lines)."""
    if kind not in KINDS:
        raise ValueError(f"unknown JSONL kind '{kind}'; known: {list(KINDS)}")
    items, errors = read_lines(path, lambda record: validate_record(record, kind), strict=strict)
    return [item for _, item in items], errors


def write_jsonl(path: str | Path, items: Iterable[dict]) -> int:
    """Write one JSON object per line (UTF-8, non-ASCII kept); returns the number written."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            count += 1
    return count
