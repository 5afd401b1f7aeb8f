"""Budget forcing: thinkcap ends the reasoning at the cap itself, for backends whose own budget
field is missing, rejected or ignored (``[backend] budget = "forced"``, or ``"auto"`` after the
start-up probe saw that).

A forced chat request goes upstream as a stream, whatever the client asked for. Its reasoning
is counted as it arrives, from ``reasoning_content`` (or ``reasoning``) deltas, or from the
``content`` text between the model's tags (``[backend] reasoning_tags``) when the answer opens
with the start tag. The count is the server's own running count of generated tokens where its
stream carries one (:data:`~thinkcap.proxy.dialects.RUNNING_COUNT_FIELDS`: a delta can hold
several tokens), else one token per non-empty delta. When the count reaches the cap
before the model ends its reasoning, the upstream request is closed (the server stops that
generation) and a second one continues it: the same messages and an assistant message holding
the reasoning so far, closed with the end tag, which the model continues with its answer
(:data:`~thinkcap.proxy.dialects.CONTINUE_FIELDS`). The client sees one answer, streamed or
whole, with one ``usage`` block that adds both requests' tokens and reports the reasoning count.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, CIMultiDictProxy

from thinkcap.proxy.dialects import CONTINUE_FIELDS, ask_running_count
from thinkcap.proxy.errors import ProxyError
from thinkcap.proxy.request.failures import upstream_failure
from thinkcap.proxy.request.headers import returned_headers
from thinkcap.proxy.request.sse import (
    Events,
    MalformedStreamError,
    Tokens,
    delta_of,
    finish_of,
    from_usage,
    running_count,
)
from thinkcap.proxy.transport.client import Response, UpstreamError
from thinkcap.proxy.transport.server import Reply, StreamReply

if TYPE_CHECKING:
    from thinkcap.proxy.pool import Replica
    from thinkcap.proxy.request.forward import Exchange


@dataclass
class Reasoning:
    """The reasoning of one streamed answer as it arrives: where it is (``field``:
    ``reasoning_content`` or ``reasoning``; ``tags``: inside ``content``), its text, its count
    and whether the model ended it by itself.

    The count is the server's running count of generated tokens where its chunks carry one
    (less the tokens before the start tag, inside ``content``), else one per non-empty delta.
    """

    tags: tuple[str, str]
    where: str | None = None  # "field" | "tags" once seen
    text: list[str] = field(default_factory=list)  # the reasoning (field) or the content so far (tags)
    deltas: int = 0  # non-empty reasoning deltas
    ended: bool = False
    server: int | None = None  # the server's running count at the last reasoning delta
    _offset: int = 0  # the server's count before the reasoning began (the start tag's tokens)
    _head: str = ""  # content before it is known whether it opens with the start tag
    _decided: bool = False  # whether content opens with the start tag is known

    @property
    def tokens(self) -> int:
        """Reasoning tokens so far."""
        return self.deltas if self.server is None else max(self.server - self._offset, 0)

    def _count(self, running: int | None) -> None:
        self.deltas += 1
        if running is not None:
            self.server = running

    def feed(self, delta: dict[str, Any], running: int | None = None) -> None:
        """One streamed delta, and the server's running count of generated tokens with it."""
        for key in ("reasoning_content", "reasoning"):
            piece = delta.get(key)
            if isinstance(piece, str) and piece:
                self.where = self.where or "field"
                if self.where == "field" and not self.ended:
                    self._count(running)
                    self.text.append(piece)
                break
        content = delta.get("content")
        if not isinstance(content, str) or not content or self.ended:
            return
        start, end = self.tags
        if self.where == "field":
            if content.strip() and content.strip() != end:  # answer text: the reasoning is over
                self.ended = True
            return
        if not self._decided:
            self._head += content
            opening = self._head.lstrip()
            if not opening or start.startswith(opening):
                return  # nothing yet, or part of the start tag
            self._decided = True
            if not opening.startswith(start):
                self.ended = True  # an answer without reasoning in it
                return
            self.where = "tags"
            self.text.append(self._head)
            after = opening[len(start) :]
            if end in after:
                self.ended = True
            elif after.strip():
                self._count(running)
            elif running is not None:
                self._offset = running  # the start tag's tokens are not reasoning
            return
        self.text.append(content)
        if end in "".join(self.text[-3:]):  # the end tag, possibly split over deltas
            self.ended = True
        else:
            self._count(running)

    def prefill(self) -> str:
        """The assistant message the continuation starts from: the reasoning so far, closed."""
        start, end = self.tags
        if self.where == "tags":
            return "".join(self.text).rstrip() + f"\n{end}\n\n"
        return f"{start}\n{''.join(self.text)}\n{end}\n\n"  # as generated: the server's prefix cache keeps it

    def closing(self) -> str:
        """What the client is shown between the reasoning and the continued answer: the end
        tag, where the reasoning was inside ``content``."""
        return self.prefill()[len("".join(self.text)) :] if self.where == "tags" else ""


def continuation(body: dict[str, Any], prefill: str, dialect: str, spent: int) -> dict[str, Any]:
    """The second request: the first's body with the reasoning so far as a trailing assistant
    message; a client's total limit loses the tokens the first request spent (at least 1 left)."""
    out = dict(body)
    out["messages"] = [*body["messages"], {"role": "assistant", "content": prefill}]
    out.update(CONTINUE_FIELDS.get(dialect, {}))
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = max(1, value - spent)
    return out


#: Characters a server may put before its echo of the prefill (llama-server with
#: ``--reasoning-format none`` sends an empty ``<think></think>`` block first).
ECHO_LEAD = 64


class Echo:
    """Drops the start of a continuation's content that repeats the prefill: llama-server sends
    the assistant prefill back before its own tokens, vLLM and SGLang do not. Content is held
    back until the prefill is found (within :data:`ECHO_LEAD` characters of the start) or
    cannot be there any more; :meth:`flush` gives out what is held when the stream ends first."""

    def __init__(self, prefill: str) -> None:
        self.prefill = prefill
        self.held = ""
        self.done = not prefill

    def feed(self, content: str) -> str:
        if self.done:
            return content
        self.held += content
        at = self.held.find(self.prefill)
        if 0 <= at <= ECHO_LEAD:
            self.done = True
            out, self.held = self.held[at + len(self.prefill) :], ""
            return out
        if len(self.held) >= len(self.prefill) + ECHO_LEAD:
            return self.flush()
        return ""

    def flush(self) -> str:
        self.done = True
        out, self.held = self.held, ""
        return out


def combined_usage(first: Tokens | None, second: Tokens | None, reasoning: int) -> dict[str, Any]:
    """One ``usage`` object for both requests, with the reasoning count."""
    parts = [t for t in (first, second) if t is not None]
    prompt = sum(t.prompt or 0 for t in parts)
    completion = sum(t.completion or 0 for t in parts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(t.cached for t in parts)},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _sse(item: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(item, separators=(",", ":")).encode() + b"\n\n"


class ForcedRelay:
    """One forced chat request: the first stream relayed and counted, cut at the cap, the
    continuation relayed after it; the client's answer streamed or assembled whole."""

    def __init__(self, ex: Exchange, replica: Replica, headers: CIMultiDict[str], body: dict[str, Any],
                 *, cap: int, client_stream: bool, asked_usage: bool) -> None:  # fmt: skip
        self.ex = ex
        self.replica = replica
        self.headers = headers
        self.body = body
        self.cap = cap
        self.client_stream = client_stream
        self.asked_usage = asked_usage
        backend = ex.state.settings.backend
        self.dialect = backend.dialect
        self.reasoning = Reasoning(backend.reasoning_tags)
        self.usage: list[Tokens | None] = [None, None]
        self.head: dict[str, Any] = {}  # id, created, model of the first chunk
        self.content: list[str] = []  # the answer text (whole answers)
        self.finish: str | None = None
        self.resp: StreamReply | None = None
        self.up_headers: CIMultiDictProxy[str] | CIMultiDict[str] = CIMultiDict()
        self.record: dict[str, Any] = {"cap": cap, "forced": False, "second_sent": False}
        ex.event["forcing"] = self.record
        self.client_timings = body.get("timings_per_token") is True
        ask_running_count(body, self.dialect)  # see Reasoning's count

    async def run(self) -> Reply | StreamReply:
        ex = self.ex
        # Refused (nothing sent): the caller tries another replica, as for any request.
        up = await self.replica.lean().request("POST", ex.request.path_qs, self.headers, self._data(self.body))
        try:
            async with up:
                ex.event["upstream_status"] = up.status
                self.up_headers = up.headers
                if up.status != 200 or up.content_type != "text/event-stream":
                    return await ex.relay_body(up)
                done = await self.relay(up, second=False)
        except (MalformedStreamError, UpstreamError, TimeoutError) as exc:
            return await self.failed(exc, mid_stream=True)
        if not done:
            return await self.failed(UpstreamError("disconnected", "the upstream ended the stream before [DONE]"),
                                     mid_stream=True, code="upstream_truncated")  # fmt: skip
        if self.record["forced"]:
            if ex.request.client_gone:  # the client went away while the first request ended
                raise ConnectionResetError("the client closed the connection")
            spent = (self.usage[0].completion if self.usage[0] is not None else None) or self.reasoning.tokens
            second = continuation(self.body, self.reasoning.prefill(), self.dialect, spent)
            self.record["second_sent"] = True
            ex.clock.pause()  # the gap before the continuation's first token is its prefill, not a step
            t0 = ex.loop.time()
            try:
                up = await self.replica.lean().request("POST", ex.request.path_qs, self.headers, self._data(second))
                async with up:
                    self.record["second_status"] = up.status
                    if up.status != 200 or up.content_type != "text/event-stream":
                        detail = (await up.read())[:500].decode(errors="replace")
                        raise ProxyError(502, f"the continuation after the reasoning cap failed: HTTP {up.status}: "
                                         f"{detail}", "upstream_error", code="forcing_failed")  # fmt: skip
                    done = await self.relay(up, second=True)
            except (MalformedStreamError, UpstreamError, TimeoutError) as exc:
                return await self.failed(exc, mid_stream=True, code="forcing_failed")
            except ProxyError as exc:
                return await self.failed(exc, mid_stream=True, code="forcing_failed")
            self.record["second_s"] = ex.loop.time() - t0
            if not done:
                return await self.failed(UpstreamError("disconnected", "the continuation ended before [DONE]"),
                                         mid_stream=True, code="forcing_failed")  # fmt: skip
        return await self.answer()

    def _data(self, body: dict[str, Any]) -> bytes:
        return json.dumps(body, separators=(",", ":")).encode()

    async def relay(self, up: Response, *, second: bool) -> bool:
        """Relay one upstream stream; ``True`` once it ended ([DONE], or cut at the cap)."""
        ex = self.ex
        events = Events()
        occupancy = self.replica.occupancy
        echo = Echo(self.reasoning.prefill() if second else "")
        async for data in up.iter_chunks():
            ex.clock.read(data, ex.loop.time, occupancy)
            out: list[bytes] = []
            for item in events.feed(data):
                if item == "[DONE]":
                    out += self._held(echo)
                    await self._send(out)
                    return True
                assert isinstance(item, dict)
                running = running_count(item)
                tokens = from_usage(item.get("usage"))
                if tokens is not None:
                    self.usage[1 if second else 0] = tokens
                item.pop("usage", None)
                if not self.client_timings:
                    item.pop("timings", None)
                if not self.head:
                    self.head = {k: item[k] for k in ("id", "created", "model") if k in item}
                delta, reason = delta_of(item), finish_of(item)
                if not delta and reason is None:
                    continue  # a usage-only chunk: one usage block is sent at the end
                if second:
                    item.update(self.head)
                    content = delta.get("content")
                    if isinstance(content, str):
                        delta["content"] = echo.feed(content)
                    if reason is not None:
                        out += self._held(echo)
                    if delta.get("role") and not delta.get("content"):
                        delta.pop("role")
                    if not delta.get("content") and not delta.get("reasoning_content") and reason is None:
                        continue
                else:
                    self.reasoning.feed(delta, running)
                if reason is not None:
                    self.finish = reason
                self._collect(delta)
                out.append(_sse(item))
                if not second and not self.reasoning.ended and self.reasoning.tokens >= self.cap:
                    self.record.update(forced=True, reasoning_at_cut=self.reasoning.tokens)
                    closing = self.reasoning.closing()
                    if closing:  # the client sees the reasoning closed, as the model will
                        out.append(_sse({**self.head, "object": "chat.completion.chunk",
                                         "choices": [{"index": 0, "delta": {"content": closing},
                                                      "finish_reason": None}]}))  # fmt: skip
                        self.content.append(closing)
                    await self._send(out)
                    return True  # leaving the ``async with`` closes the upstream request
            await self._send(out)
        return False

    def _held(self, echo: Echo) -> list[bytes]:
        """Content the echo check still holds, as one event (the stream is ending)."""
        held = echo.flush()
        if not held:
            return []
        self._collect({"content": held})
        return [_sse({**self.head, "object": "chat.completion.chunk",
                      "choices": [{"index": 0, "delta": {"content": held}, "finish_reason": None}]})]  # fmt: skip

    def _collect(self, delta: dict[str, Any]) -> None:
        if self.client_stream:
            return
        content = delta.get("content")
        if isinstance(content, str):
            self.content.append(content)

    async def _send(self, out: list[bytes]) -> None:
        """Write events to a streaming client (its head first)."""
        if not self.client_stream or not out:
            return
        ex = self.ex
        if self.resp is None:
            headers = returned_headers(self.up_headers, ex.rid)
            headers["X-Accel-Buffering"] = "no"
            self.resp = ex.stream = StreamReply(status=200, headers=headers)
            ex.event["first_byte_s"] = ex.loop.time() - ex.t_arrival
            await self.resp.prepare(ex.request, b"".join(out))
            return
        await self.resp.write(b"".join(out))

    def combined(self) -> dict[str, Any]:
        """Both requests' usage as one. A stream cut at the cap never sends its usage: its
        completion is then the reasoning counted, and its prompt is inside the continuation's,
        which repeats it."""
        first, second = self.usage
        if first is None and self.record["forced"]:
            first = Tokens(completion=self.reasoning.tokens)
        return combined_usage(first, second, self.reasoning.tokens)

    async def answer(self) -> Reply | StreamReply:
        ex = self.ex
        usage = self.combined()
        ex.tokens = Tokens(usage["prompt_tokens"], usage["completion_tokens"], self.reasoning.tokens,
                           usage["prompt_tokens_details"]["cached_tokens"], "usage", "stream")  # fmt: skip
        ex.event["status"] = 200
        if self.client_stream:
            tail = []
            if self.asked_usage:
                tail.append(_sse({**self.head, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
            tail.append(b"data: [DONE]\n\n")
            if self.resp is None:
                await self._send(tail)
                assert self.resp is not None
                await self.resp.write_eof()
            else:
                await self.resp.write_eof(b"".join(tail))
            return self.resp
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.reasoning.where == "field":
            message["reasoning_content"] = "".join(self.reasoning.text)
        whole = {**self.head, "object": "chat.completion", "created": self.head.get("created", int(time.time())),
                 "choices": [{"index": 0, "message": message, "finish_reason": self.finish or "stop"}],
                 "usage": usage}  # fmt: skip
        headers = returned_headers(self.up_headers, ex.rid)
        headers["Content-Type"] = "application/json"
        return Reply(json.dumps(whole).encode(), status=200, headers=headers)

    async def failed(self, exc: BaseException, *, mid_stream: bool, code: str | None = None) -> Reply | StreamReply:
        """An OpenAI-style error: the client's answer, or an ``error`` event ending its stream."""
        err = upstream_failure(exc, mid_stream=mid_stream)
        if code is not None and err.code != code:
            err = ProxyError(err.status, err.message, "upstream_error", code=code)
        if code == "forcing_failed":
            self.record["error"] = err.message
        if self.resp is not None and self.resp.prepared:
            return await self.ex.end_stream(self.resp, err)
        raise err
