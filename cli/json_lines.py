"""JSON-lines files as the command line's tools read them (``audit``, ``report``, ``fit``, the
examples): one JSON object per line, blank lines skipped, every other line reported with its
number instead of stopping the read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BadLine:
    """A line that is not a JSON object: its number (from 1) and why."""

    number: int
    error: str


def read_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]] | BadLine]:
    """``(line number, object)`` for each JSON object line, a :class:`BadLine` for each other
    non-blank line. Bytes that are not UTF-8 are replaced, never fatal; an unreadable file
    raises ``OSError``."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            text = line.strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except ValueError as exc:
                yield BadLine(number, f"not JSON: {str(exc).splitlines()[0]}")
                continue
            if not isinstance(value, dict):
                yield BadLine(number, "not a JSON object")
                continue
            yield number, value
