"""A real engine that thinks: llama-server with SmolLM2-135M under a ChatML template that opens
``<think>`` (``sim/smollm2_thinking.jinja``), so that llama.cpp's template analysis finds the
reasoning tags, parses the reasoning into ``reasoning_content`` and takes a per-request
``thinking_budget_tokens``. Directly and through ``thinkcap serve`` (dialect llama-server)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from thinkcap.cli import main
from thinkcap.proxy.app import create_app
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim.llamacpp import Server, start_llama_server
from thinkcap.sim.sse import StreamedAnswer

#: Tokens the server may add past the budget: the end-of-thinking tag it forces.
END_TAG_TOKENS = 3
CAPS = (8, 32, 128)
PROMPT = [{"role": "user", "content": "Count the legs of three spiders, step by step."}]

CONFIG = """
[objective]
latency_penalty = 0.01

[workload]
arrival_rate = 0.2

[backend]
url = "{url}"
dialect = "llama-server"
slots = 1
probe = false

[proxy]
default_type = "t128"

[controller]
enabled = false
{types}
"""

TYPE = """
[[types]]
name = "t{cap}"
prior = {prior}
max_tokens = 512
keywords = ["budget{cap}"]
accuracy = {{ base = 0.2, gain = 0.6, rate = 0.02 }}
service = {{ overhead_s = 0.05, per_token_s = 0.008 }}
"""


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_llama_server(tmp_path_factory.mktemp("llama"), slots=1, thinking=True)
    try:
        yield server
    finally:
        server.stop()


def props(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(server.url + "/props", timeout=10) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


async def stream_reasoning(url: str, body: dict[str, Any]) -> tuple[str, str]:
    """The reasoning and the content of a streamed answer, as the client reads them."""
    answer = StreamedAnswer()
    async with aiohttp.ClientSession() as s, s.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            answer.feed(line)
    return answer.reasoning, answer.content


async def test_the_template_makes_llama_server_parse_reasoning(thinking_server: Server) -> None:
    """Under the template the server's analysis finds the reasoning tags: its template caps say
    it renders reasoning (``supports_preserve_reasoning``, false under SmolLM2's own template)
    and an answer comes back with its reasoning in ``reasoning_content``, apart from the
    content."""
    caps = props(thinking_server)["chat_template_caps"]
    assert caps["supports_preserve_reasoning"] is True, caps
    body = {"messages": PROMPT, "max_tokens": 40, "thinking_budget_tokens": 16, "temperature": 0.0}
    reasoning, content = await stream_reasoning(thinking_server.url + "/v1/chat/completions", body)
    assert reasoning.strip() and "<think>" not in reasoning + content


@pytest.mark.parametrize("cap", CAPS)
async def test_the_native_budget_bounds_the_reasoning(thinking_server: Server, cap: int) -> None:
    """Directly: ``thinking_budget_tokens`` bounds ``reasoning_content`` to the cap (plus the
    end tag the server forces), as the server's own tokenizer counts it."""
    body = {"messages": PROMPT, "max_tokens": cap + 48, "thinking_budget_tokens": cap, "temperature": 0.0}
    reasoning, _ = await stream_reasoning(thinking_server.url + "/v1/chat/completions", body)
    assert reasoning, "no reasoning_content: the template's tags were not found"
    assert thinking_server.tokenize(reasoning) <= cap + END_TAG_TOKENS


@pytest.fixture
async def proxy(thinking_server: Server, tmp_path: Path) -> AsyncIterator[tuple[str, ProxyState]]:
    types = "".join(TYPE.format(cap=c, prior=p) for c, p in zip(CAPS, (0.3, 0.3, 0.4), strict=True))
    path = tmp_path / "thinkcap.toml"
    path.write_text(CONFIG.format(url=thinking_server.url, types=types))
    state = build_state(load_settings(path))
    state.caps.pin({f"t{c}": c for c in CAPS})
    async with create_app(state, "127.0.0.1", 0) as front:
        yield str(front.make_url("/v1/chat/completions")), state


@pytest.mark.parametrize("cap", CAPS)
async def test_through_thinkcap_the_cap_binds_and_the_count_is_the_servers(
    proxy: tuple[str, ProxyState], thinking_server: Server, cap: int
) -> None:
    """Through ``thinkcap serve``: the type's cap goes out as ``thinking_budget_tokens``, the
    reasoning the client gets is at most the cap (plus the end tag), and thinkcap's reasoning
    count (streamed reasoning deltas: llama-server's usage has none) equals the server's own
    tokenisation of that reasoning within one token."""
    url, _ = proxy
    messages = [{"role": "user", "content": f"budget{cap}: count the legs of three spiders, step by step."}]
    with capture_logs() as logs:
        reasoning, _ = await stream_reasoning(url, {"messages": messages, "max_tokens": cap + 48, "temperature": 0.0})
    (event,) = [e for e in logs if e["event"] == "request"]
    assert event["type"] == f"t{cap}" and event["limit_field"] == "thinking_budget_tokens"
    assert event["effective_limit"] == cap
    served = thinking_server.tokenize(reasoning)
    assert served <= cap + END_TAG_TOKENS
    assert event["reasoning_tokens_source"] == "stream"
    assert abs(event["reasoning_tokens"] - served) <= 1, (event["reasoning_tokens"], served)


async def test_the_count_is_the_servers_where_a_delta_holds_several_tokens(
    proxy: tuple[str, ProxyState], thinking_server: Server
) -> None:
    """On a prompt whose reasoning writes ``<count>`` tags, llama-server holds back each
    ``<count`` (it may open a tag) and sends it with the next token: 96 deltas for 128 tokens.
    thinkcap asks for the server's running count in each chunk (``timings_per_token``) and
    counts by it, so its count is still the server's tokenisation within one token; the client
    gets its stream as the server sent it."""
    url, _ = proxy
    prompt = [{"role": "user", "content": "Please count from 1 up to 20, writing each number on its own line."}]
    with capture_logs() as logs:
        reasoning, _ = await stream_reasoning(url, {"messages": prompt, "max_tokens": 160, "temperature": 0.0,
                                                    "thinking_budget_tokens": 128})  # fmt: skip
    (event,) = [e for e in logs if e["event"] == "request"]
    served = thinking_server.tokenize(reasoning)
    assert "<count" in reasoning and served > 64, reasoning
    assert abs(event["reasoning_tokens"] - served) <= 1, (event["reasoning_tokens"], served)


def test_calibrate_measures_accuracy_against_the_reasoning_cap(thinking_server: Server, tmp_path: Path) -> None:
    """``thinkcap calibrate`` against the thinking server (dialect llama-server, the model
    thinks: the cap is ``thinking_budget_tokens``): every job answers, each type gets a curve
    over the reasoning caps, and the config it writes loads as a serve config whose backend
    thinks."""
    lines = (Path(__file__).resolve().parents[2] / "examples" / "calibration.jsonl").read_text().splitlines()
    by_type: dict[str, list[str]] = {}
    for line in lines:
        by_type.setdefault(json.loads(line)["type"], []).append(line)
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(v for rows in by_type.values() for v in rows[:2]) + "\n")
    out = tmp_path / "calibrated.toml"
    args = ["calibrate", "--backend", thinking_server.url, "--dialect", "llama-server", "--thinks",
            "--dataset", str(data), "--caps", "8,32", "--out", str(out), "--bootstrap", "5"]  # fmt: skip
    assert main(args) == 0
    results = [json.loads(r) for r in out.with_name(out.name + ".partial.jsonl").read_text().splitlines()]
    assert len(results) == 2 * 2 * len(by_type) and not any(r["error"] for r in results)
    settings = load_settings(out)
    assert settings.backend.dialect == "llama-server" and settings.backend.thinks
    assert {t.task.name for t in settings.model.types} == set(by_type)
