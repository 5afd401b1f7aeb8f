"""``thinkcap mock-backend`` and the scenario file, from the command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from thinkcap.cli import main
from thinkcap.cli.scenario_file import load_scenario

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "scenario.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_example_scenario_loads_and_its_true_problem_solves() -> None:
    """The shipped scenario parses; its wall-clock problem scales service times and the penalty."""
    sc = load_scenario(EXAMPLE)
    assert sc.names == ("math", "code", "reasoning", "chat") and sc.phases
    p, q = sc.problem(2.0), sc.problem(2.0, wall_clock=False)
    assert p.c == pytest.approx(q.c * sc.time_scale)
    assert p.latency_penalty == pytest.approx(q.latency_penalty / sc.time_scale)
    assert list(p.hi) == [min(t.task.max_tokens, t.natural_tokens) for t in sc.types]
    assert p.t0[0] == pytest.approx(sc.time_scale * (0.25 + 0.012 * 12))


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("slots = 1", "slots = 1\nstep = { base_s = 0.01, per_seq_s = 0.0 }"), "server.step"),
        (("slots = 1", "slots = 4\nstep = { per_seq_s = 0.01 }"), "server.step.base_s"),
        (("slots = 1", "slots = 4\nstep = { base_s = 0.01, per_seq_s = 0.0 }"), "types[0].service.per_token_s"),
    ],
)
def test_engine_scenario_errors_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], key: str
) -> None:
    """A batching engine needs slots > 1 and a whole step, and its types give a prefill, not a per-token time."""
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace(edit[0], edit[1], 1))
    assert main(["loadgen", "--target", "http://127.0.0.1:9", "--scenario", str(bad)]) == 2
    assert f": {key}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("slots = 1", "slots = 0"), "server.slots"),
        (("time_scale = 0.02", "time_scale = -1"), "server.time_scale"),
        (("error_rate = 0.0", "error_rate = 0.6\ndrop_rate_x = 1"), "faults.drop_rate_x"),
        (("error_rate = 0.0\nstall_rate = 0.0", "error_rate = 0.7\nstall_rate = 0.5"), None),
        (('default_type = "chat"', 'default_type = "poetry"'), "server.default_type"),
        (('reasoning_field = "reasoning"', 'reasoning_field = "thoughts"'), "server.reasoning_field"),
        (("natural_tokens = 3000", "natural_tokens = -5"), "types[0].natural_tokens"),
        (("rate = 4.0", "rate = 4.0\nrate_end = -1.0"), "load.phases[1].rate_end"),
    ],
)
def test_scenario_errors_name_the_key_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], key: str | None
) -> None:
    """A bad scenario is one line on stderr naming the file and key, exit 2, no traceback."""
    text = EXAMPLE.read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    assert main(["loadgen", "--target", "http://127.0.0.1:9", "--scenario", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    if key is not None:
        assert f": {key}:" in err
    if edit[1].startswith("error_rate = 0.7"):
        assert "sum to at most 1" in err


def test_loadgen_without_a_schedule_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A scenario without [[load.phases]] and no --phase exits 2 with a hint."""
    text = EXAMPLE.read_text()
    start = text.index("[[load.phases]]")
    bare = tmp_path / "bare.toml"
    bare.write_text(text[:start] + text[text.index("[[types]]") :])
    assert main(["loadgen", "--target", "http://127.0.0.1:9", "--scenario", str(bare)]) == 2
    assert "--phase" in capsys.readouterr().err


def test_mock_backend_serves_the_openai_client_and_stops_on_sigterm() -> None:
    """The CLI server answers the official client on loopback and exits 0 on SIGTERM."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "thinkcap.cli",
            "mock-backend",
            "--scenario",
            str(EXAMPLE),
            "--port",
            str(port),
            "--time-scale",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in banner
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as client:
            r = client.chat.completions.create(
                model="sim-reasoner", messages=[{"role": "user", "content": "[sim:code] sort a list"}], max_tokens=100
            )
        assert r.usage is not None and r.usage.completion_tokens == 100
        assert r.usage.completion_tokens_details is not None
        assert r.usage.completion_tokens_details.reasoning_tokens == 100
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
