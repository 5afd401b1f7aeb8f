"""A finished request's accounting: its event, the metrics, the estimators, the feedback
memory. ``serve``'s request path and any other front that sees whole requests share it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thinkcap.estimators import GapTally
from thinkcap.proxy.logs import logger
from thinkcap.proxy.pool import Occupancy
from thinkcap.proxy.request.sse import CONTENT, DELTA_TEXT, REASONING, Tokens
from thinkcap.proxy.state import Finished, ProxyState

#: Tokens per event (by the usage) from which a stream is read as several tokens per event,
#: each gap's tokens apportioned by its text rather than counted in events.
PACKED_EVENTS = 1.5


@dataclass
class TokenClock:
    """A request's tokens as they arrive from upstream: the first one's time (it ends the
    prefill) and, with ``gaps`` (a batching engine's step fit), each later read's gap unless a
    prefill ran since the read before (see :class:`~thinkcap.proxy.pool.Occupancy`)."""

    gaps: GapTally | None = None
    t_first_token: float | None = None
    t_token: float | None = None
    first_in_service: int = 1  # requests in service when the first token came
    first_held_by: int = 0  # others' prompts read before its first token (see read)
    counted: int = 0  # token events counted (a server may put several tokens in one)
    text: int = 0  # bytes of their text (with ``gaps``): how many tokens each event held
    first_counted: int = 0  # the events, and the bytes of text, of the read that brought the first token
    first_text: int = 0
    paused: bool = False  # the next read's gap is not a step (see pause)
    started_mark: int = 0  # the occupancy's requests started when this one was (itself included)
    others_started: int = 0  # requests started on its replica while it was in service (see leave)
    steps_mark: tuple[float, float] = (0.0, 0.0)  # the occupancy's steps and sequence-steps then
    step_in_service: float = 1.0  # the mean number in service over its steps (see leave)

    def pause(self) -> None:
        """The next tokens come from a new upstream request (budget forcing's continuation):
        the gap before them is its prefill, not a decode step."""
        self.paused = True

    def read(self, data: bytes, now: Callable[[], float], occupancy: Occupancy) -> None:
        """One upstream read of a stream."""
        if self.gaps is None and self.t_first_token is not None:
            return  # only the first token's time was wanted
        tokens = len(CONTENT.findall(data)) + len(REASONING.findall(data))
        if not tokens:
            return
        self.counted += tokens
        text = 0
        if self.gaps is not None:
            text = sum(len(m) for m in DELTA_TEXT.findall(data))
            self.text += text
        t = now()
        if self.paused:
            self.paused, self.t_token = False, t
            return
        if self.t_first_token is None:
            self.t_first_token = t
            self.first_counted, self.first_text = tokens, text
            self.first_in_service = occupancy.in_service
            # The prompts sent while it waited: the engine read them before its first event.
            self.first_held_by = occupancy.started - self.started_mark
            occupancy.first_token(t)
        elif self.gaps is not None and occupancy.clean(self.t_token or t):
            self.gaps.add(t - (self.t_token or t), tokens, occupancy.in_service, text)
        self.t_token = t

    def _packed(self, completion: int) -> bool:
        """Whether the ``completion`` tokens the usage reports say the server packs several
        per event (from :data:`PACKED_EVENTS` per event counted on), with text to apportion
        them by (``counted`` > 0)."""
        return completion / self.counted >= PACKED_EVENTS and self.text > 0

    def settle(self, completion: int) -> None:
        """Read the gaps in the ``completion`` tokens the usage reports: a server may send
        several tokens per event, and then (see :meth:`_packed`) each gap's share of the text
        says how many it brought, the last event's few and the many of a full one alike."""
        if self.gaps is None or not self.counted or completion <= 0:
            return
        if self._packed(completion):
            self.gaps.by_text(completion / self.text)
        else:
            self.gaps.rescale(completion / self.counted)

    def first_tokens(self, completion: int) -> float:
        """The tokens the read that brought the first token held, of the ``completion`` the
        usage reports (at least 1): its share of the text where a server packs several tokens
        per event (as :meth:`settle` reads the gaps), else its events at the answer's mean
        tokens per event. The answer's mean alone read a first event of 16 tokens as 13.7 on
        the simulated server (its short last event counted in)."""
        if not self.counted or completion <= 0:
            return 1.0
        if self._packed(completion) and self.first_text:
            return max(self.first_text * completion / self.text, 1.0)
        return max(self.first_counted * completion / self.counted, 1.0)

    def enter(self, occupancy: Occupancy, now: float, *, streamed: bool) -> float:
        """The request is sent upstream at ``now``: the occupancy's area then (its mark)."""
        mark = occupancy.start(now, streamed=streamed)
        self.started_mark = occupancy.started
        self.steps_mark = (occupancy.steps, occupancy.seq_steps)
        return mark

    def leave(self, occupancy: Occupancy, end: float, *, since: float, mark: float, streamed: bool) -> float:
        """The request leaves service at ``end`` (it entered at ``since``, the occupancy's area
        then ``mark``): the time-averaged number in service meanwhile, itself included. Also
        the mean over its steps (``step_in_service``, what a whole answer's time is read
        with; see :meth:`~thinkcap.proxy.pool.Occupancy.set_step`) and the requests started
        meanwhile (``others_started``): their prompts held its steps up."""
        self.others_started = occupancy.started - self.started_mark
        area = occupancy.stop(end, prefilling=streamed and self.t_first_token is None)
        steps = occupancy.steps - self.steps_mark[0]
        self.step_in_service = (occupancy.seq_steps - self.steps_mark[1]) / steps if steps > 0 else 1.0
        return (area - mark) / (end - since) if end > since else 1.0


def account(
    state: ProxyState,
    event: dict[str, Any],
    tokens: Tokens | None,
    rid: str,
    *,
    end: float,
    t_arrival: float,
    t_dispatch: float | None,
    clock: TokenClock,
) -> None:
    """What one finished request tells: its ``request`` event completed (times on the event
    loop's clock: ``end``, ``t_arrival``, ``t_dispatch`` upstream, the ``clock``'s first token)
    and logged, the metrics, and, for an answer that went well, the estimators (service time,
    the step fit from the ``clock``'s token gaps, rescaled by usage over the token events
    counted), the answer lengths and the share of its limit used; it is remembered for
    feedback."""
    st, ev, t = state, event, tokens
    t_first_token, gaps = clock.t_first_token, clock.gaps
    ev["system_time_s"] = end - t_arrival
    if t_dispatch is not None:
        ev["service_time_s"] = end - t_dispatch
    if t is not None:
        ev.update(
            prompt_tokens=t.prompt,
            completion_tokens=t.completion,
            reasoning_tokens=t.reasoning,
            cached_tokens=t.cached,
            tokens_source=t.source,
            reasoning_tokens_source=t.reasoning_source,
        )
    name = ev["type"]
    status = ev["status"]
    ok = status == 200 and ev["error_kind"] is None
    tallied = {"prompt": t.prompt, "reasoning": t.reasoning, "completion": t.completion} if ok and t else {}
    st.metrics.finished(name or "unclassified", str(status), ev["system_time_s"], tallied)
    if ok and t is not None:
        first = None if t_first_token is None or t_dispatch is None else t_first_token - t_dispatch
        per_token = None
        if t_first_token is not None and t.completion is not None and t.completion > 1:
            per_token = (end - t_first_token) / (t.completion - 1)
        st.metrics.genai("chat" if ev.get("route") == "/v1/chat/completions" else "text_completion",
                         tokens={"input": t.prompt, "output": t.completion, "reasoning": t.reasoning},
                         duration_s=ev.get("service_time_s"), first_token_s=first,
                         per_output_token_s=per_token)  # fmt: skip
    if ok and name is not None and t is not None:
        now = st.clock()
        if t.completion is not None and t_dispatch is not None:
            st.estimators.served(
                name,
                prompt_tokens=t.prompt or 0,
                completion_tokens=t.completion,
                service_time=ev["service_time_s"],
                cached_tokens=t.cached,
                now=now,
            )
            if st.step is not None:
                first = t_first_token
                if t.completion:
                    clock.settle(t.completion)
                st.step.update(
                    prompt_tokens=max((t.prompt or 0) - (t.cached or 0), 0),
                    tokens=t.completion,
                    service_s=ev["service_time_s"],
                    mean_in_service=clock.step_in_service,  # read for a whole answer (gaps carry their own)
                    others_started=clock.others_started,
                    gaps=gaps,
                    first_token_s=None if first is None else first - t_dispatch,
                    first_token_in_service=max(clock.first_in_service, 1),
                    first_token_held_by=clock.first_held_by,
                    first_event_tokens=clock.first_tokens(t.completion),
                    now=now,
                )
        reasoning_dialect = st.reasoning_cap
        used = t.reasoning if reasoning_dialect else t.completion
        st.remember(rid, Finished(name, used))
        limit = ev.get("effective_limit")
        if used is not None and isinstance(limit, int) and ev.get("client_limit") is None:
            st.used.update(name, used=used, limit=limit, now=now)
        if reasoning_dialect and t.completion is not None and t.reasoning is not None:
            st.answer.update(name, max(t.completion - t.reasoning, 0), now=now)
    if st.log_requests:
        level = "info" if status is not None and status < 500 else "warning"
        getattr(logger(), level)("request", **ev)
