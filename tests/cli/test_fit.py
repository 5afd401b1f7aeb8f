"""``thinkcap fit`` over request logs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from thinkcap.cli import main
from thinkcap.proxy.model_file import load_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "thinkcap.toml"
TRUTH = {"b0": 0.15, "out": 0.012, "in": 0.006}


def write_trace(path: Path, n: int = 600, rate: float = 0.5, *, proxy_events: bool = False) -> None:
    rng = np.random.default_rng(0)
    t = 1.7e9
    names, probs = ["math", "code", "reasoning", "chat"], [0.4, 0.3, 0.1, 0.2]
    with path.open("w") as fh:
        for _ in range(n):
            t += float(rng.exponential(1 / rate))
            name = str(rng.choice(names, p=probs))
            prompt, out = int(rng.integers(20, 600)), int(rng.integers(5, 900))
            service = TRUTH["b0"] + TRUTH["out"] * out + TRUTH["in"] * prompt + float(rng.normal(0, 0.02))
            row = {"type": name, "prompt_tokens": prompt, "completion_tokens": out}
            if proxy_events:
                row.update(event="request", arrival_time=t, service_time_s=service, cached_tokens=0)
            else:
                row.update(time=t, service_time=service)
            fh.write(json.dumps(row) + "\n")


def test_fit_recovers_rate_mix_and_service_from_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The JSON report carries the documented fields, close to the truth that made the trace."""
    log = tmp_path / "trace.jsonl"
    write_trace(log)
    assert main(["fit", str(log), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["observations"] == 600 and out["malformed"] == 0
    assert out["mean_arrival_rate"] == pytest.approx(0.5, rel=0.1)
    assert out["priors"]["math"] == pytest.approx(0.4, abs=0.08)
    assert sum(out["priors"].values()) == pytest.approx(1.0)
    svc = out["service"]["math"]
    assert set(svc) >= {"overhead_s", "per_token_s", "variance_s2", "samples"}
    assert svc["per_token_s"] == pytest.approx(TRUTH["out"], rel=0.02)
    assert sum(s["samples"] for s in out["service"].values()) == 600


def test_proxy_request_events_are_read_and_other_events_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lines with event=request are observations; other events are ignored, not malformed."""
    log = tmp_path / "proxy.jsonl"
    write_trace(log, n=100, proxy_events=True)
    with log.open("a") as fh:
        fh.write(json.dumps({"event": "decision", "caps": {}}) + "\n")
    assert main(["fit", str(log), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["observations"] == 100 and out["malformed"] == 0


def test_malformed_lines_are_counted_with_line_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad lines are reported with their numbers and do not stop the fit."""
    log = tmp_path / "trace.jsonl"
    write_trace(log, n=50)
    with log.open("a") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({"time": 1.0, "type": "math"}) + "\n")
        fh.write(
            json.dumps({"time": 2.0, "type": "math", "prompt_tokens": -3, "completion_tokens": 1, "service_time": 1})
            + "\n"
        )
        fh.write(
            json.dumps({"time": 3.0, "type": "nope", "prompt_tokens": 1, "completion_tokens": 1, "service_time": 1})
            + "\n"
        )
    assert main(["fit", str(log), "--config", str(EXAMPLE)]) == 0
    text = capsys.readouterr().out
    assert "(4 malformed)" in text
    for line, what in (
        (51, ""),
        (52, "missing field prompt_tokens"),
        (53, "prompt_tokens"),
        (54, "unknown type 'nope'"),
    ):
        assert f"line {line}: {what}" in text


def test_written_config_solves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--write-config produces a config that thinkcap solve accepts, with the fitted values."""
    log = tmp_path / "trace.jsonl"
    write_trace(log, n=400, rate=0.05)
    out_cfg = tmp_path / "fitted.toml"
    assert main(["fit", str(log), "--config", str(EXAMPLE), "--write-config", str(out_cfg)]) == 0
    cfg = load_model(out_cfg)
    math_type = next(t.task for t in cfg.types if t.task.name == "math")
    assert math_type.per_token_s == pytest.approx(TRUTH["out"], rel=0.02)
    assert cfg.arrival_rate == pytest.approx(0.05, rel=0.15)
    capsys.readouterr()
    assert main(["solve", str(out_cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] in ("converged", "overload")


def test_write_config_needs_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--write-config without --config exits 2 with a clear message."""
    log = tmp_path / "trace.jsonl"
    write_trace(log, n=5)
    assert main(["fit", str(log), "--write-config", str(tmp_path / "x.toml")]) == 2
    assert "--config" in capsys.readouterr().err


def test_missing_log_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A log that cannot be read names its path."""
    assert main(["fit", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_written_config_of_a_batching_engine_keeps_its_service_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With slots > 1 a logged service time is not a time alone on the engine: the written
    config keeps the configured prefill and step, updates priors and rate, and still loads."""
    text = re.sub(r"overhead_s = ([0-9.]+), per_token_s = [0-9.]+", r"prefill_s = \1", EXAMPLE.read_text())
    text = text.replace('dialect = "vllm"', 'dialect = "vllm"\nslots = 8\nstep = { base_s = 0.008, per_seq_s = 0.004 }')
    cfg = tmp_path / "batching.toml"
    cfg.write_text(text)
    log = tmp_path / "trace.jsonl"
    write_trace(log)
    out_cfg = tmp_path / "fitted.toml"
    assert main(["fit", str(log), "--config", str(cfg), "--write-config", str(out_cfg)]) == 0
    assert "kept as configured" in capsys.readouterr().err
    before, after = load_model(cfg), load_model(out_cfg)
    assert [t.task.overhead_s for t in after.types] == [t.task.overhead_s for t in before.types]
    assert after.queue == before.queue and after.arrival_rate != before.arrival_rate
