"""An OpenAI-style event stream read as a client reads it, one line at a time (the load
generator, ``thinkcap calibrate``, the examples and the tests share it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: What :func:`sse_data` returns for the stream's end marker, ``data: [DONE]``.
DONE = "[DONE]"


def sse_data(line: bytes | str) -> dict[str, Any] | str | None:
    """The event of one line: its JSON object, :data:`DONE` for the end marker, ``None`` for a
    line that carries no data (blank, a comment, another field). Raises ``ValueError`` on a
    data line that is not a JSON object."""
    text = line.decode() if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("data:"):
        return None
    data = text[5:].strip()
    if data == DONE:
        return DONE
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError("a stream chunk is not a JSON object")
    return chunk


@dataclass
class StreamedAnswer:
    """A streamed chat answer as a client reads it: its events, and the text of its reasoning
    (``reasoning_content`` deltas) and of its content, fed one line at a time."""

    events: list[dict[str, Any]] = field(default_factory=list)
    _reasoning: list[str] = field(default_factory=list)
    _content: list[str] = field(default_factory=list)

    def feed(self, line: bytes | str) -> None:
        chunk = sse_data(line)
        if not isinstance(chunk, dict):
            return
        self.events.append(chunk)
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            self._reasoning.append(delta.get("reasoning_content") or "")
            self._content.append(delta.get("content") or "")

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)
