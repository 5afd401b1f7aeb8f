"""The upstream body: the client's own bytes with the proxy's keys added, or the object encoded again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.proxy.conftest import in_front_of
from thinkcap.proxy.request.body import upstream_body


def edited(raw: bytes, **changes: Any) -> tuple[bytes, dict[str, Any]]:
    """``upstream_body`` after replacing or adding ``changes`` (``None`` removes a key)."""
    body = json.loads(raw)
    before = dict(body)
    for key, value in changes.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    return upstream_body(raw, before, body), body


def test_added_keys_are_written_into_the_clients_own_bytes() -> None:
    """Spacing, key order and non-ASCII text stay as sent; the new keys go before the brace."""
    raw = '{ "model" : "m",\n  "messages": [{"role": "user", "content": "héllo 世界"}] }\r\n'.encode()
    out, body = edited(raw, max_tokens=64, stream_options={"include_usage": True})
    cut = raw.rindex(b"}")
    assert out == raw[:cut] + b',"max_tokens":64,"stream_options":{"include_usage":true}' + raw[cut:]
    assert json.loads(out) == body
    empty, body = edited(b"{}", max_tokens=1)
    assert empty == b'{"max_tokens":1}' and json.loads(empty) == body


def test_a_body_the_proxy_did_not_change_goes_as_it_came() -> None:
    """A body whose values the proxy left alone goes upstream as the very bytes the client sent."""
    raw = b'{"max_tokens": 5,  "x": [1, 2.50]}'
    assert edited(raw)[0] is raw
    five = json.loads(raw)["max_tokens"]
    assert edited(raw, max_tokens=five)[0] is raw  # the same value object: unchanged


def test_a_changed_or_removed_value_or_a_body_not_in_utf8_is_encoded_again() -> None:
    """A changed or removed value, or a body in UTF-16 or with a byte order mark, is encoded again."""
    raw = b'{"max_tokens": 5000, "thinkcap": {"type": "math"}, "messages": []}'
    for changes in ({"max_tokens": 64}, {"thinkcap": None}, {"messages": [], "extra": 1}):
        out, body = edited(raw, **changes)
        assert out == json.dumps(body).encode()
    for raw in ('{"messages": []}'.encode("utf-16"), b'\xef\xbb\xbf{"messages": []}', ' {"m": 1}'.encode("utf-16-le")):
        out, body = edited(raw, max_tokens=1)  # UTF-16, UTF-8 with a byte order mark, UTF-16 without one
        assert out == json.dumps(body).encode()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    obj=st.dictionaries(st.text(max_size=6), JSON, max_size=5),
    layout=st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False}]),
    leading=st.sampled_from(["", " \n"]),
    trailing=st.sampled_from(["", "\n", " \r\n\t"]),
    changes=st.dictionaries(st.text(max_size=6), JSON | st.just(None), max_size=3),
)
def test_the_upstream_body_always_parses_to_the_edited_object(
    obj: dict[str, Any], layout: dict[str, Any], leading: str, trailing: str, changes: dict[str, Any]
) -> None:
    """Whatever the layout and the edits (added, replaced or removed keys), the bytes sent
    upstream parse to the object after the edits; with additions only, they start with the
    client's bytes up to the closing brace."""
    raw = (leading + json.dumps(obj, **layout) + trailing).encode()
    changes = {k: v for k, v in changes.items() if v is not None or k in obj}
    out, body = edited(raw, **changes)
    assert json.loads(out) == body
    if all(k not in obj for k in changes):
        assert out.startswith(raw[: raw.rindex(b"}")])


async def test_the_upstream_receives_the_clients_bytes_with_the_cap_added(tmp_path: Path) -> None:
    """Through the proxy: non-ASCII text arrives unescaped and the client's layout is kept."""
    received: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", record)
    async with in_front_of(upstream, tmp_path) as (state, front):
        sent = '{"model": "m", "messages": [{"role": "user", "content": "prove 定理"}]}'.encode()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                front.make_url("/v1/chat/completions"), data=sent, headers={"Content-Type": "application/json"}
            ) as r,
        ):
            assert r.status == 200
        cap = state.caps.cap("hard")
        assert received == [sent[:-1] + b',"thinking_token_budget":%d}' % cap]
