"""Token accounting from ``usage`` or, failing that, from the streamed deltas.

:class:`StreamTally` splits an upstream Server-Sent Events stream into whole events, so each
one can be forwarded as soon as it is complete, counted, and (when the proxy asked for usage
on the client's behalf) the extra usage-only chunk removed. :class:`Events` parses every
event in full, for the few readers that need each chunk's fields (budget forcing, the probe).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any


@dataclass
class Tokens:
    """Token counts of one answer and where they came from (``usage`` or ``stream``).

    A count the backend did not report is ``None`` (unknown), never 0. ``reasoning_source``
    says where the reasoning count came from: ``usage``, ``stream`` (streamed reasoning
    deltas, when the usage object carries no reasoning count) or ``None`` (unknown).
    """

    prompt: int | None = None
    completion: int | None = None
    reasoning: int | None = None
    cached: int = 0
    source: str | None = None
    reasoning_source: str | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def reasoning_count(usage: dict[str, Any]) -> int | None:
    """The reasoning tokens a ``usage`` object reports, wherever the server puts them.

    OpenAI and vLLM (from mid-2026) write ``completion_tokens_details.reasoning_tokens``;
    SGLang writes a top-level ``reasoning_tokens``; older vLLM and llama.cpp write none
    (``None``: unknown).
    """
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict):
        found = _int(details.get("reasoning_tokens"))
        if found is not None:
            return found
    return _int(usage.get("reasoning_tokens"))


def from_usage(usage: Any) -> Tokens | None:
    """Counts from an OpenAI-style ``usage`` object (``None`` if it is not one)."""
    if not isinstance(usage, dict):  # parsed JSON: a dict, never another mapping
        return None
    prompt_details = usage.get("prompt_tokens_details")
    reasoning = reasoning_count(usage)
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else None
    completion = _int(usage.get("completion_tokens"))
    return Tokens(
        _int(usage.get("prompt_tokens")),
        completion,
        reasoning,
        cached or 0,
        "usage",
        None if reasoning is None else "usage",
    )


class MalformedStreamError(ValueError):
    """An upstream SSE event whose data is not a JSON object."""


#: A non-empty reasoning or content delta inside a chunk's JSON. Each pattern starts with a
#: literal, which the regex engine looks for before trying the rest.
REASONING = re.compile(rb'"reasoning(?:_content)?":\s*"(?!")')
CONTENT = re.compile(rb'"content":\s*"(?!")')
#: The text of a reasoning or content delta (escapes kept): how long it is tells how many
#: tokens an event held where a server sends several per event.
DELTA_TEXT = re.compile(rb'"(?:reasoning(?:_content)?|content)":\s*"((?:[^"\\]|\\.)*)"')
#: A content delta that is only the end-of-thinking tag (llama-server leaves one in the content
#: after a budget cut): no answer text, not counted as content.
STRAY_END_TAG = re.compile(rb'"content":\s*"</think>(?:\\n)*"')
USAGE = re.compile(rb'"usage":\s*\{')
#: llama-server's running count of generated tokens, in each chunk of a stream that asked for
#: ``timings_per_token`` (see :data:`~thinkcap.proxy.dialects.RUNNING_COUNT_FIELDS`).
PREDICTED = re.compile(rb'"predicted_n":\s*(\d+)')
#: Events that are each one ``data: {...}`` line, and the same with ``data: [DONE]`` lines.
PLAIN_DATA = re.compile(rb"(?:data: \{[^\n]*\}\n\n)*")
PLAIN = re.compile(rb"(?:data: (?:\{[^\n]*\}|\[DONE\])\n\n)*")
#: Forwarded bytes held back uncounted: their deltas are counted only if no ``usage`` with a
#: reasoning count arrives first. Servers asked for usage send it at the end, and then the
#: counts are never read.
UNCOUNTED_BYTES = 1 << 16


class StreamTally:
    """Incremental SSE splitter and counter, cheap enough to sit on every streamed token.

    ``feed`` returns the complete events to forward, in order (CRLF line ends are normalised
    to LF). At a malformed event it stops: the events before it are returned, :attr:`error`
    holds a :class:`MalformedStreamError` and later calls return nothing.

    Notes
    -----
    Every ``data:`` payload must be ``[DONE]`` or look like a JSON object (``{...}``); the
    first chunk and any chunk carrying a ``usage`` object are parsed in full, the others are
    counted by pattern (one token per non-empty ``reasoning``, ``reasoning_content`` or
    ``content`` string). The counts are only read when no ``usage`` object with a reasoning
    count came, so forwarded bytes are counted late: when :data:`UNCOUNTED_BYTES` of them
    have piled up, or when :meth:`tokens` needs them; a usage object with a reasoning count
    drops them uncounted. Forwarded events are joined into one write per read; the read that
    holds the first event can give that event out alone first (``first_only``).
    """

    def __init__(self, *, strip_usage: bool, running: bool = False) -> None:
        self.strip_usage = strip_usage
        self.running = running  # chunks carry the server's running count (llama-server's predicted_n)
        self._reasoning_running: int | None = None  # that count at the last reasoning delta
        self._buf = b""
        self._reasoning = 0
        self._content = 0
        self._uncounted: list[bytes] = []
        self._uncounted_bytes = 0
        self.usage: Tokens | None = None
        self.done = False
        self.started = False  # a data event has been seen
        self.error: MalformedStreamError | None = None

    def feed(self, data: bytes, *, first_only: bool = False) -> list[bytes]:
        """Add upstream bytes; return the whole events now ready to forward.

        With ``first_only``, before the first event has been seen, only that event is
        inspected and returned; the rest stays buffered for the next call (``feed(b"")``), so
        that the first event can be sent before a long read is looked through.
        """
        if self.error is not None:
            return []
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        pieces = []
        if not self.started:  # the first data event is parsed in full
            first = buf.find(b"\n\n") + 2
            if first == 1:
                self._buf = buf
                return []
            self._buf = buf[first:]  # (emptied if the first event is malformed)
            pieces.append(self._slow(buf[:first]))
            if first_only or self.error is not None:
                return self._counted(pieces)
            buf, self._buf = self._buf, b""
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._buf = buf
            return self._counted(pieces)
        block, self._buf = buf[: cut + 2], buf[cut + 2 :]
        while block and self.error is None:
            at = block.find(b'"usage"')
            usage = USAGE.search(block, at) if at >= 0 else None
            if usage is None:  # the usual case: no usage chunk in this read
                pieces.append(block if self._plain(block) else self._slow(block))
                break
            # the events before the usage chunk, then the usage chunk alone (parsed in full)
            before = block.rfind(b"\n\n", 0, usage.start())
            start = before + 2 if before >= 0 else 0
            end = block.find(b"\n\n", usage.end()) + 2
            head, event, block = block[:start], block[start:end], block[end:]
            if head:
                pieces.append(head if self._plain(head) else self._slow(head))
            if self.error is None:
                pieces.append(self._slow(event))
        return self._counted(pieces)

    def _counted(self, pieces: list[bytes]) -> list[bytes]:
        """The forwarded pieces as one, held back to be counted unless a reasoning count has come."""
        joined = b"".join(pieces)
        if not joined:
            return []
        if self.usage is None or not self.usage.reasoning:
            self._uncounted.append(joined)
            self._uncounted_bytes += len(joined)
            if self._uncounted_bytes > UNCOUNTED_BYTES:
                self._count()
        return [joined]

    def _count(self) -> None:
        for block in self._uncounted:
            if not self.running:
                self._reasoning += len(REASONING.findall(block))
            else:  # a delta can hold several tokens: the server's count at the last reasoning delta says how many
                for event in block.split(b"\n\n"):
                    found = len(REASONING.findall(event))
                    if found:
                        self._reasoning += found
                        count = PREDICTED.search(event)
                        if count is not None:
                            self._reasoning_running = int(count.group(1))
            self._content += len(CONTENT.findall(block)) - len(STRAY_END_TAG.findall(block))
        self._uncounted.clear()
        self._uncounted_bytes = 0

    @property
    def reasoning_chunks(self) -> int:
        """Non-empty reasoning deltas forwarded so far (no longer kept once a usage object came);
        with ``running``, the server's count of tokens generated up to the last of them."""
        self._count()
        return self._reasoning if self._reasoning_running is None else self._reasoning_running

    @property
    def content_chunks(self) -> int:
        """Non-empty content deltas forwarded so far (no longer kept once a usage object came)."""
        self._count()
        return self._content

    def _slow(self, block: bytes) -> bytes:
        """Inspect event by event; keep what is forwarded, stop at a malformed event."""
        kept = []
        for event in block[:-2].split(b"\n\n"):
            if not event:
                continue
            try:
                keep = self._inspect(event)
            except MalformedStreamError as exc:
                self.error = exc
                self._buf = b""
                break
            if keep:
                kept.append(event + b"\n\n")
        return b"".join(kept)

    def _plain(self, block: bytes) -> bool:
        """The fast path: every event is one ``data: {...}`` or ``data: [DONE]`` line (the caller
        has taken out any usage chunk)."""
        data = PLAIN_DATA.match(block)  # (it matches the empty string at least)
        end = data.end() if data is not None else 0
        if end < len(block):  # what stopped it must be a ``[DONE]``, and the rest plain too
            if PLAIN.fullmatch(block, end) is None:
                return False
            self.done = True
        self.started = self.started or end > 0 or b"data: {" in block
        return True

    def flush(self) -> bytes:
        """Whatever trails the last complete event (an unterminated tail)."""
        tail, self._buf = self._buf, b""
        return tail

    def _inspect(self, event: bytes) -> bool:
        if event.startswith(b"data: {") and event.endswith(b"}") and b"\n" not in event:
            return self._chunk(event[6:])  # the usual one-line event
        keep = True
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
            elif payload.startswith(b"{") and payload.endswith(b"}"):
                keep = self._chunk(payload) and keep
            else:
                raise MalformedStreamError(f"upstream sent a stream event that is not a JSON object: {payload[:80]!r}")
        return keep

    def _chunk(self, payload: bytes) -> bool:
        first, self.started = not self.started, True
        if first or (b'"usage"' in payload and USAGE.search(payload)):
            return self._parse(payload)
        return True

    def _parse(self, payload: bytes) -> bool:
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise MalformedStreamError(f"upstream sent a stream event that is not JSON: {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise MalformedStreamError("upstream sent a stream event that is not a JSON object")
        usage = from_usage(chunk.get("usage"))
        if usage is None:
            return True
        self.usage = usage
        if usage.reasoning:  # a positive count: the streamed counts will not be read
            self._uncounted.clear()
            self._uncounted_bytes = 0
        return not (self.strip_usage and not chunk.get("choices"))

    def tokens(self) -> Tokens:
        """Usage if the upstream sent it, else counts of streamed deltas (one token per delta).

        A usage object without a reasoning count has it filled from the streamed reasoning
        deltas (``reasoning_source`` ``stream``); so has one that reports 0 next to streamed
        reasoning text (vLLM does for some templates): that 0 is unknown, not zero. A stream
        without a single reasoning delta leaves the reasoning count unknown: its server may
        write the reasoning into the content (``<think>``), where no delta can be told apart.
        """
        usage = self.usage
        if usage is not None and usage.reasoning:
            return usage
        deltas = self.reasoning_chunks
        reasoning, source = (deltas, "stream") if deltas > 0 else (None, None)
        if usage is not None:
            if usage.reasoning == 0 and deltas == 0:  # no reasoning streamed either: a true 0
                return usage
            return replace(usage, reasoning=reasoning, reasoning_source=source)
        return Tokens(None, deltas + self.content_chunks, reasoning, 0, "stream", source)


def whole_tokens(answer: dict[str, Any]) -> Tokens | None:
    """The counts of a whole (not streamed) answer: its usage, with a reasoning count of 0 next
    to reasoning text in a choice read as unknown (``None``), not as zero."""
    tokens = from_usage(answer.get("usage"))
    if tokens is None or tokens.reasoning != 0:
        return tokens
    for choice in answer.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and (message.get("reasoning_content") or message.get("reasoning")):
            return replace(tokens, reasoning=None, reasoning_source=None)
    return tokens


class Events:
    """Splits an SSE byte stream into its events' ``data`` payloads: parsed JSON objects, or
    ``"[DONE]"``; a payload that is neither is a :class:`MalformedStreamError`."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[dict[str, Any] | str]:
        self._buf += data.replace(b"\r\n", b"\n")
        out: list[dict[str, Any] | str] = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                return out
            block, self._buf = self._buf[:end], self._buf[end + 2 :]
            payload = b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
            if not payload:
                continue  # a comment or an event without data
            if payload == b"[DONE]":
                out.append("[DONE]")
                continue
            try:
                item = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                item = None
            if not isinstance(item, dict):
                raise MalformedStreamError("the upstream sent a stream event that is not a JSON object")
            out.append(item)


def delta_of(chunk: dict[str, Any]) -> dict[str, Any]:
    """The first choice's ``delta`` (empty if there is none)."""
    choices = chunk.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        if isinstance(delta, dict):
            return delta
    return {}


def running_count(chunk: dict[str, Any]) -> int | None:
    """The server's count of tokens generated so far, where a chunk carries one (see
    :data:`~thinkcap.proxy.dialects.RUNNING_COUNT_FIELDS`)."""
    for holder, key in ((chunk.get("timings"), "predicted_n"), (chunk.get("usage"), "completion_tokens")):
        if isinstance(holder, dict):
            value = holder.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return None


def finish_of(chunk: dict[str, Any]) -> str | None:
    choices = chunk.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    return None
