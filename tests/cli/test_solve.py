"""``thinkcap solve`` and the config it reads."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from thinkcap.cli import main
from thinkcap.proxy.model_file import load_model
from thinkcap.proxy.toml_reader import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "thinkcap.toml"

MINIMAL = """
[objective]
latency_penalty = 0.05

[[types]]
name = "only"
prior = 1.0
max_tokens = 2000
accuracy = { base = 0.1, gain = 0.8, rate = 0.004 }
service = { overhead_s = 0.1, per_token_s = 0.002 }
"""


BATCHING = "[backend]\nslots = 8\nstep = { base_s = 0.015, per_seq_s = 0.004 }\n" + MINIMAL.replace(
    "service = { overhead_s = 0.1, per_token_s = 0.002 }", "service = { prefill_s = 0.1 }"
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    """The shipped example is valid and has several types."""
    cfg = load_model(EXAMPLE)
    assert len(cfg.types) >= 3
    assert cfg.problem().size == len(cfg.types)


def test_json_output_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints one object with status, objective, rho, types and the rest."""
    assert main(["solve", str(EXAMPLE), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "status",
        "method",
        "arrival_rate",
        "objective",
        "objective_continuous",
        "rho",
        "mean_system_time",
        "iterations",
        "types",
    ):
        assert key in out
    assert out["status"] == "converged"
    assert out["method"] == "exact"
    cfg = load_model(EXAMPLE)
    assert [t["name"] for t in out["types"]] == [t.task.name for t in cfg.types]
    for t in out["types"]:
        assert set(t) >= {"name", "tokens", "tokens_continuous", "accuracy", "service_time"}
        assert isinstance(t["tokens"], int)
        assert abs(t["tokens"] - t["tokens_continuous"]) < 1.0
    assert out["objective"] <= out["objective_continuous"] + 1e-12


@pytest.mark.parametrize("method", ["exact", "fixed_point", "projected_gradient"])
def test_methods_agree_through_the_cli(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every --method gives the same integer caps on the example."""
    main(["solve", str(EXAMPLE), "--json"])
    ref = json.loads(capsys.readouterr().out)
    main(["solve", str(EXAMPLE), "--json", "--method", method])
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == method
    assert [t["tokens"] for t in out["types"]] == [t["tokens"] for t in ref["types"]]


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    """The table shows every type and the queue summary."""
    assert main(["solve", str(EXAMPLE), "--arrival-rate", "0.2"]) == 0
    out = capsys.readouterr().out
    for word in ("math", "code", "rho", "mean wait", "mean system time", "objective", "status", "solve time"):
        assert word in out
    assert "arrival rate      0.2 /s" in out


def test_sweep_shrinks_caps_as_load_grows(capsys: pytest.CaptureFixture[str]) -> None:
    """Caps never grow with the arrival rate, and overload shows up at the end."""
    assert main(["solve", str(EXAMPLE), "--json", "--sweep-arrival-rate", "0.01:3:15"]) == 0
    rows = json.loads(capsys.readouterr().out)["sweep"]
    assert len(rows) == 15
    caps = [[t["tokens"] for t in r["types"]] for r in rows]
    for before, after in itertools.pairwise(caps):
        assert all(b >= a for b, a in zip(before, after, strict=True))
    assert rows[0]["status"] == "converged"
    assert rows[-1]["status"] == "overload"
    assert rows[-1]["mean_system_time"] is None  # infinite: null in JSON


def test_sweep_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The sweep table has one row per rate plus a header."""
    assert main(["solve", str(EXAMPLE), "--sweep-arrival-rate", "0.1:1:4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    assert lines[0].split()[0] == "rate"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL.replace("prior = 1.0", "prior = 0.5"), "types[*].prior"),
        (MINIMAL.replace("rate = 0.004", "rate = -1.0"), "types[0].accuracy.rate"),
        (MINIMAL.replace("gain = 0.8", "gain = 0.95"), "types[0].accuracy.gain"),
        (MINIMAL.replace("max_tokens = 2000", "max_tokens = 2000\nmin_tokens = 3000"), "types[0].min_tokens"),
        (MINIMAL.replace("max_tokens = 2000", "max_tokens = 20.5"), "types[0].max_tokens"),
        (MINIMAL.replace("latency_penalty = 0.05", "latency_penalty = 0.05\nrho_max = 1.5"), "objective.rho_max"),
        (MINIMAL.replace("latency_penalty = 0.05", "latency_penality = 0.05"), "latency_penality"),
        (MINIMAL.replace("per_token_s = 0.002", "per_token_s = 'fast'"), "types[0].service.per_token_s"),
        (MINIMAL + "\n[surprise]\nx = 1\n", "surprise"),
        (MINIMAL.replace("[[types]]", "[[typos]]"), "typos"),
        (BATCHING.replace("slots = 8", "slots = 0"), "backend.slots"),
        (BATCHING.replace("step = { base_s = 0.015, per_seq_s = 0.004 }", ""), "backend.step"),
        (BATCHING.replace("base_s = 0.015", "base_s = -1.0"), "backend.step.base_s"),
        (BATCHING.replace("base_s = 0.015, per_seq_s = 0.004", "base_s = 0, per_seq_s = 0"), "backend.step.base_s"),
        (BATCHING.replace("per_seq_s = 0.004", "per_seq_s = 0.004, extra = 1"), "backend.step.extra"),
        (BATCHING.replace("slots = 8", "slots = 1"), "backend.step"),
        (BATCHING.replace("prefill_s = 0.1", "prefill_s = 0.1, per_token_s = 0.01"), "types[0].service.per_token_s"),
        (MINIMAL.replace("overhead_s = 0.1", "prefill_s = 0.1"), "types[0].service.prefill_s"),
        ("[objective]\nlatency_penalty = 0.1\n", "types"),
        ("this is = not toml [", "(syntax)"),
    ],
)
def test_config_errors_exit_2_naming_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    """A bad config exits 2 with one line naming the file and the key, no traceback."""
    path = write(tmp_path, text)
    assert main(["solve", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert key in err
    assert "Traceback" not in err
    with pytest.raises(ConfigError):
        load_model(path)


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing config names the path."""
    assert main(["solve", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_sweep_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed --sweep-arrival-rate is rejected by the parser (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        main(["solve", str(EXAMPLE), "--sweep-arrival-rate", "1:2"])
    assert exc.value.code == 2
    assert "START:STOP:N" in capsys.readouterr().err


def test_negative_arrival_rate_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """--arrival-rate must be >= 0."""
    assert main(["solve", str(EXAMPLE), "--arrival-rate", "-1"]) == 2
    assert "--arrival-rate" in capsys.readouterr().err


def test_console_script_runs() -> None:
    """The installed ``thinkcap`` entry point works as a process."""
    exe = Path(sys.executable).with_name("thinkcap")
    out = subprocess.run([str(exe), "solve", str(EXAMPLE), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["status"] == "converged"


def test_a_batching_engine_is_solved_and_described(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """slots > 1 with a step: the table names the engine and its occupancy; --json carries them;
    a type's per-token time is the step at one sequence and its overhead the prefill, which
    the queue model reads as holding up the batch."""
    text = BATCHING.replace("latency_penalty = 0.05", "latency_penalty = 0.05\n[workload]\narrival_rate = 5")
    path = write(tmp_path, text)
    cfg = load_model(path)
    assert cfg.queue.slots == 8
    task = cfg.types[0].task
    assert (task.overhead_s, task.per_token_s) == (0.1, pytest.approx(0.019))
    assert main(["solve", str(path)]) == 0
    table = capsys.readouterr().out
    assert "batching engine, 8 slots" in table and "in service" in table
    assert main(["solve", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queue"] == {"model": "batching", "slots": 8, "step_base_s": 0.015, "step_per_seq_s": 0.004,
                            "prefill_s": 0.1}  # fmt: skip
    p = cfg.problem()
    caps = [float(t["tokens"]) for t in out["types"]]
    q = p.metrics(np.array(caps))
    assert out["occupancy"] == pytest.approx(q.occupancy) and 1.0 < out["occupancy"] < 8.0
    assert out["rho"] == pytest.approx(q.rho)
    assert main(["solve", str(path), "--sweep-arrival-rate", "1:60:4"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert "busy" in rows[0] and len(rows) == 5


def test_a_reader_that_leaves_early_ends_the_command_quietly() -> None:
    """``thinkcap solve ... | head -1``: exit status 141 (SIGPIPE's), no traceback on stderr."""
    cmd = [sys.executable, "-m", "thinkcap.cli", "solve", str(EXAMPLE), "--sweep-arrival-rate", "0.1:1:3000"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().split()[0] == b"rate"
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err
