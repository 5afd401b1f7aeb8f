"""Token accounting from ``usage`` or, failing that, from the streamed deltas.

:class:`StreamTally` splits an upstream Server-Sent Events stream into whole events, so each
one can be forwarded as soon as it is complete, counted, and (when the proxy asked for usage
on the client's behalf) the extra usage-only chunk removed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EVENT_END = (b"\n\n", b"\r\n\r\n")


@dataclass
class Tokens:
    """Token counts of one answer and where they came from (``usage`` or ``stream``)."""

    prompt: int | None = None
    completion: int | None = None
    reasoning: int | None = None
    cached: int = 0
    source: str | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def from_usage(usage: Any) -> Tokens | None:
    """Counts from an OpenAI ``usage`` object (``None`` if it is not one)."""
    if not isinstance(usage, Mapping):
        return None
    details = usage.get("completion_tokens_details")
    prompt_details = usage.get("prompt_tokens_details")
    reasoning = _int(details.get("reasoning_tokens")) if isinstance(details, Mapping) else None
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, Mapping) else None
    completion = _int(usage.get("completion_tokens"))
    return Tokens(
        _int(usage.get("prompt_tokens")), completion, reasoning if reasoning is not None else 0, cached or 0, "usage"
    )


class MalformedStreamError(ValueError):
    """An upstream SSE event whose data is not a JSON object."""


class StreamTally:
    """Incremental SSE splitter and counter.

    ``feed`` returns the complete events to forward, in order; a malformed event raises
    :class:`MalformedStreamError` after the events before it were returned by earlier calls.
    """

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self._buf = b""
        self.reasoning_chunks = 0
        self.content_chunks = 0
        self.usage: Tokens | None = None
        self.done = False
        self.events = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add upstream bytes; return the whole events now ready to forward."""
        self._buf += data
        out: list[bytes] = []
        while True:
            cut = -1
            for sep in EVENT_END:
                i = self._buf.find(sep)
                if i >= 0 and (cut < 0 or i + len(sep) < cut):
                    cut = i + len(sep)
            if cut < 0:
                return out
            event, self._buf = self._buf[:cut], self._buf[cut:]
            if self._inspect(event):
                out.append(event)

    def flush(self) -> bytes:
        """Whatever trails the last complete event (an unterminated tail)."""
        tail, self._buf = self._buf, b""
        return tail

    def _inspect(self, event: bytes) -> bool:
        keep = True
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise MalformedStreamError(f"upstream sent a stream event that is not JSON: {payload[:80]!r}") from None
            if not isinstance(chunk, dict):
                raise MalformedStreamError("upstream sent a stream event that is not a JSON object")
            self.events += 1
            usage = from_usage(chunk.get("usage"))
            if usage is not None:
                self.usage = usage
            choices = chunk.get("choices")
            if isinstance(choices, list):
                for choice in choices:
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    if isinstance(delta, dict):
                        if delta.get("reasoning") or delta.get("reasoning_content"):
                            self.reasoning_chunks += 1
                        if delta.get("content"):
                            self.content_chunks += 1
            if usage is not None and self.strip_usage and not choices:
                keep = False
        return keep

    def tokens(self) -> Tokens:
        """Usage if the upstream sent it, else counts of streamed deltas (one token per delta)."""
        if self.usage is not None:
            return self.usage
        return Tokens(None, self.reasoning_chunks + self.content_chunks, self.reasoning_chunks, 0, "stream")
