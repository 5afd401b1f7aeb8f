"""The one JSON-lines reader of the command line's tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinkcap.cli.json_lines import BadLine, read_objects


def test_objects_come_with_their_line_numbers_and_the_rest_is_reported(tmp_path: Path) -> None:
    """Objects with their numbers, blank lines skipped, a line that is not JSON or not an object
    reported by number, bytes that are not UTF-8 replaced; a missing file is an ``OSError``."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"event": "a"}\n\n{broken\n[1, 2]\n{"text": "\xff"}\n')
    items = list(read_objects(path))
    assert items[0] == (1, {"event": "a"})
    assert isinstance(items[1], BadLine) and items[1].number == 3 and items[1].error.startswith("not JSON: ")
    assert items[2] == BadLine(4, "not a JSON object")
    assert items[3] == (5, {"text": "\ufffd"})
    with pytest.raises(OSError):
        list(read_objects(tmp_path / "missing.jsonl"))
