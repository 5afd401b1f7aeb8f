"""``thinkcap calibrate`` against a deterministic OpenAI-style server on loopback: an answer
cut off by the cap is wrong, so accuracy rises with the cap; the written TOML is a config
``thinkcap serve`` reads; a run cut short resumes where it stopped."""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.cli.test_sim import free_port
from thinkcap.cli import main
from thinkcap.cli.calibration.dataset import Item, grade, parse_item, read_dataset
from thinkcap.proxy.serve_file import load_settings
from thinkcap.sim import dataset

ROOT = Path(__file__).resolve().parents[2]


def answer(prompt: str) -> list[str]:
    """The stub model's whole answer, token by token."""
    if m := re.search(r"to (\d+)", prompt):
        return [f"{i}\n" for i in range(1, int(m.group(1)) + 1)]
    if m := re.search(r"What is ([\d +]+)\?", prompt):
        terms = [int(t) for t in m.group(1).split("+")]
        return [*(f"{t} + " for t in terms[:-1]), f"{terms[-1]} = ", f"{sum(terms)}."]
    return ["I ", "do ", "not ", "know."]


class Stub:
    """A streaming chat server on its own thread; counts the requests it answered."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests = 0
        self.limits: list[int] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        limit = int(body["max_tokens"])
        self.limits.append(limit)
        tokens = answer(body["messages"][-1]["content"])[:limit]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for t in tokens:
            await asyncio.sleep(0.001)  # a token's step
            chunk = {"choices": [{"index": 0, "delta": {"content": t}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": len(tokens)}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        self.requests += 1
        return resp

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self._runner = web.AppRunner(app)
        loop.run_until_complete(self._runner.setup())
        loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._loop = loop
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def __enter__(self) -> Stub:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: Any) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def stub() -> Iterator[Stub]:
    with Stub() as s:
        yield s


def test_the_shipped_set_is_the_generators_and_every_line_is_usable() -> None:
    """The shipped calibration set is exactly what the generator writes: 48 usable items of two
    types."""
    path = ROOT / "examples" / "calibration.jsonl"
    assert path.read_text() == dataset.jsonl()
    items, bad = read_dataset(path)
    assert not bad and {i.type for i in items} == {"count", "add"} and len(items) == 48


def test_bad_lines_are_reported_with_their_numbers(tmp_path: Path) -> None:
    """A dataset line that is not JSON or lacks a field is reported with its line number; the good
    ones are kept."""
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"type": "a", "prompt": "q", "answer": "1", "grader": "numeric"}\n'
        "not json\n"
        '{"type": "a", "prompt": "q", "answer": "x", "grader": "numeric"}\n'
        '{"type": "a", "answer": "1"}\n'
        '{"type": "a", "prompt": "q", "answer": "(", "grader": "regex"}\n'
        '{"type": "a", "prompt": "q", "answer": "1", "grader": "fuzzy"}\n'
        "\n"
        '{"type": "a", "messages": [{"role": "user", "content": "q"}], "answer": 3}\n'
    )
    items, bad = read_dataset(path)
    assert [i.line for i in items] == [1, 8]
    assert [n for n, _ in bad] == [2, 3, 4, 5, 6]
    assert "numeric answer" in bad[1][1] and "prompt" in bad[2][1] and "regular expression" in bad[3][1]


@pytest.mark.parametrize(
    ("grader", "answer", "response", "ok"),
    [
        ("exact", "Paris", "paris.", True),
        ("exact", "Paris", "I think\nParis", True),
        ("exact", "Paris", "Paris is big", False),
        ("numeric", "12", "7 + 5 = 12.", True),
        ("numeric", "12", "12, no: 13", False),
        ("numeric", "1,000", "it is 1,000", True),
        ("regex", r"(^|\D)5(\D|$)", "1\n2\n3\n4\n5\n", True),
        ("regex", r"(^|\D)5(\D|$)", "1\n2\n3\n4\n15", False),
        ("choice", "B", "The answer is (B).", True),
        ("choice", "B", "A, I think", False),
    ],
)
def test_graders(grader: str, answer: str, response: str, ok: bool) -> None:
    """Each grader takes a right answer and refuses a wrong one."""
    assert grade(Item(1, "t", (), answer, grader), response) is ok


def test_a_numeric_grader_takes_a_tolerance() -> None:
    """A numeric grader with a tolerance takes an answer within it, not one outside."""
    item = parse_item(
        1, '{"type": "t", "prompt": "q", "answer": "3.14", "grader": {"kind": "numeric", "tolerance": 0.01}}'
    )
    assert grade(item, "about 3.145") and not grade(item, "3.2")


def test_calibrate_fits_the_curves_writes_a_serve_config_and_a_plot(
    tmp_path: Path, stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    """``thinkcap calibrate`` against a stub backend fits each type's curve and writes a config
    serve loads, and a plot."""
    out = tmp_path / "calibrated.toml"
    args = ["calibrate", "--backend", f"http://127.0.0.1:{stub.port}/v1", "--dialect", "max_tokens",
            "--dataset", str(ROOT / "examples" / "calibration.jsonl"), "--caps", "4,8,16,32",
            "--concurrency", "1,2", "--out", str(out), "--bootstrap", "30"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert stub.requests == 48 * 4 and sorted(set(stub.limits)) == [4, 8, 16, 32]
    assert f"config: {out}" in text
    settings = load_settings(out)  # what thinkcap serve reads
    types = {t.task.name: t.task for t in settings.model.types}
    assert set(types) == {"count", "add"}
    assert types["count"].prior == pytest.approx(0.5)
    count, add = types["count"], types["add"]

    def acc(t: Any, cap: float) -> float:
        return float(t.accuracy_base + t.accuracy_gain * (1 - math.exp(-t.accuracy_rate * cap)))

    assert (count.min_tokens, count.max_tokens) == (4, 32)
    # the stub counts one token per number: counting to N needs N tokens, a sum 3 or 4 tokens
    assert acc(count, 32) > acc(count, 8) > acc(count, 4)
    assert acc(add, 4) > 0.6 and acc(add, 8) > 0.95
    # counting to N needs N tokens: at cap 4 only N = 3 (three phrasings), at 8 N = 3, 5, 8 ...
    assert "# count: correct at each cap 4: 3/24, 8: 9/24, 16: 15/24, 32: 24/24;" in out.read_text()
    assert settings.backend.slots == 2 and settings.model.queue.slots == 2
    # the step measured at one and at two requests in flight is written as the levels the model reads
    levels = settings.model.queue.step_levels_s  # type: ignore[attr-defined]
    assert len(levels) == 2 and min(levels) >= 0.001
    assert "# measured per occupancy (levels_s, what the model reads up to 2):" in out.read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


def test_a_cut_short_run_resumes_without_repeating_what_it_has(tmp_path: Path, stub: Stub) -> None:
    """A run cut short resumes from its partial file: the answers it has are not asked again."""
    data = tmp_path / "d.jsonl"
    data.write_text(dataset.jsonl().splitlines(keepends=True)[0] + dataset.jsonl().splitlines(keepends=True)[30])
    out = tmp_path / "c.toml"
    base = ["calibrate", "--backend", f"http://127.0.0.1:{stub.port}", "--dialect", "max_tokens",
            "--dataset", str(data), "--caps", "2,4,8", "--out", str(out), "--bootstrap", "5"]  # fmt: skip
    assert main(base) == 0
    assert stub.requests == 6
    partial = out.with_name(out.name + ".partial.jsonl")
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])  # two lost, one torn
    assert main([*base, "--resume"]) == 0
    assert stub.requests == 6 + 2
    assert len(partial.read_text().splitlines()) == 4 + 2  # the torn line is dropped
    first = out.read_text()
    assert main(base) == 0  # without --resume: everything again
    assert stub.requests == 8 + 6

    def graded(text: str) -> list[str]:  # the graded outcomes and curves (times differ run to run)
        return [ln for ln in text.splitlines() if ln.startswith(("# count", "# add", "accuracy ="))]

    assert graded(out.read_text()) == graded(first) and len(graded(first)) == 4
