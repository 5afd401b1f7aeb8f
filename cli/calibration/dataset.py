"""The calibration set: its lines read and checked, and the graders of an answer."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

GRADERS = ("exact", "numeric", "regex", "choice")
#: Seconds a calibration request may take.
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
CHOICE = re.compile(r"\b([A-J])\b")


@dataclass(frozen=True)
class Item:
    """One labelled question."""

    line: int
    type: str
    messages: tuple[dict[str, str], ...]
    answer: str
    grader: str
    tolerance: float = 1e-6


def parse_item(line: int, text: str) -> Item:
    """One dataset line (raises ``ValueError`` saying what is wrong)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    kind = row.get("type")
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError('"type" must be a non-empty string')
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )  # fmt: skip
        if not ok:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} strings')
        messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages = ({"role": "user", "content": row["prompt"]},)
    else:
        raise ValueError('give "prompt" (a string) or "messages"')
    answer = row.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError('"answer" must be a non-empty string or a number')
    grader = row.get("grader", "exact")
    tolerance = 1e-6
    if isinstance(grader, dict):
        spec = grader
        grader = spec.get("kind")
        if "tolerance" in spec:
            tol = spec["tolerance"]
            if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
                raise ValueError('"grader.tolerance" must be a number >= 0')
            tolerance = float(tol)
    if grader not in GRADERS:
        raise ValueError(f'"grader" must be one of {list(GRADERS)}, got {grader!r}')
    if grader == "numeric" and _number(answer) is None:
        raise ValueError(f"a numeric grader needs a numeric answer, got {answer!r}")
    if grader == "regex":
        try:
            re.compile(answer)
        except re.error as exc:
            raise ValueError(f'"answer" is not a regular expression: {exc}') from None
    return Item(line, kind.strip(), messages, answer, str(grader), tolerance)


def read_dataset(path: str | Path) -> tuple[list[Item], list[tuple[int, str]]]:
    """The usable items and ``(line, why)`` for each bad line."""
    items, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                items.append(parse_item(number, text))
            except ValueError as exc:
                bad.append((number, str(exc)))
    return items, bad


def _number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _normal(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .!?;:\"'")


def grade(item: Item, response: str) -> bool:
    """Whether ``response`` answers ``item``: ``exact`` (the normalised answer is the response
    or its last line), ``numeric`` (the last number in it, within ``tolerance``), ``regex``
    (the answer, a regular expression, matches somewhere, case-insensitively) or ``choice``
    (the first option letter A-J in it is the answer's).

    >>> it = Item(1, "t", (), "42", "numeric", 0.5)
    >>> grade(it, "so the total is 42.3."), grade(it, "about 40")
    (True, False)
    """
    if item.grader == "numeric":
        got, want = _number(response), _number(item.answer)
        return got is not None and want is not None and abs(got - want) <= item.tolerance
    if item.grader == "regex":
        return re.search(item.answer, response, re.IGNORECASE | re.DOTALL) is not None
    if item.grader == "choice":
        m = CHOICE.search(response.upper())
        return m is not None and m.group(1) == item.answer.strip().upper()[:1]
    text = _normal(item.answer)
    lines = [ln for ln in response.splitlines() if ln.strip()]
    return _normal(response) == text or (bool(lines) and _normal(lines[-1]) == text)
