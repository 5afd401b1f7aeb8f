"""thinkcap serve in front of llama.cpp's llama-server (4 slots) under closed-loop and Poisson load
(examples/real_backend.py, the walk-through of ``make demo-real``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from thinkcap.sim.llamacpp import BackendDiedError, Server, free_port, wait_for
from thinkcap.sim.loadgen import Record

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "real_backend.py"


@pytest.mark.timeout(1500)  # calibration, saturation, two 75-s Poisson runs, the reasoning type
def test_thinkcap_runs_a_real_batching_server_and_learns_its_step() -> None:
    """llama-server with 4 slots: every request is answered (or shed while overloaded), the cap
    probe passes, the step fitted from live traffic replaces the configured flat one and grows
    with the batch, the heavier load gets smaller caps, thinkcap's count of requests in service
    agrees with the server's own gauge, and the predicted mean system time is within PREDICTION_BAND
    of the observed one in both runs; on a server whose model thinks, the reasoning type's caps
    bind natively (the probe's choice under auto) and when thinkcap forces them."""
    args = ["--runs", "1", "--phase-s", "75", "--settle-s", "15", "--throughput-s", "15", "--json"]
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=1500,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]  # a dead server: its exit status and log's tail
    report = json.loads(out.stdout.strip().splitlines()[-1])
    runs = report["runs"]
    assert all(r["answered"] + r["shed"] == r["sent"] > 10 for r in runs), runs
    assert report["probe"]["status"] == "honoured"
    fitted = report["fitted_step"]
    assert fitted["source"] == "fitted" and fitted["gaps"] > 1000, fitted
    assert fitted["per_seq_s"] > 0 and fitted["base_s"] >= 0  # an intercept within noise of 0 reads as 0
    # the step read per occupancy (what the queue model uses) at the end of each run, against the
    # engine's own steps by its own clock (llama-server's timings) over the traffic the fit has
    # seen by then (the closed loops through thinkcap, the runs so far): within ENGINE_BAND at
    # every occupancy with enough gaps, and those include one and four sequences in the heavier
    # run. Not against the direct calibration: it runs minutes away, and the engine's own speed
    # moved 19 % at four sequences between two of them four minutes apart here (39.1, 46.6 ms);
    # nor against the run's own steps alone: after the light run the fit's steps at three and
    # four sequences are still mostly the closed loops' (14 % under the run's in one suite run)
    assert len(fitted["levels_s"]) == 4, fitted
    judged = report["summary"]["engine_errors"]
    assert len(judged) == len(runs) and {"1", "4"} <= set(judged[-1]["errors"]), (judged, runs)
    for e in judged:
        assert all(abs(v) <= ENGINE_BAND for v in e["errors"].values()), judged
    # the fit in use through each run (a decision may fall back for a moment: the goal is the
    # fit in use, not never a flicker)
    assert all(r["step_fitted_share"] >= 0.8 for r in runs), [(r["load"], r["step_fitted_share"]) for r in runs]
    # and in use within a minute of the first request (the goal; 18 s in the benchmark)
    after = report["fit_in_use_after_s"]
    assert after is not None and after <= 60.0, after
    light, heavy = runs
    assert sum(heavy["caps_mean"].values()) < sum(light["caps_mean"].values()), runs
    assert report["gauges"]["equal_share"] > 0.8, report["gauges"]
    for r in runs:
        assert PREDICTION_BAND[0] <= r["predicted_over_observed"] <= PREDICTION_BAND[1], r
    # the reasoning type (step 7): the caps bind in the mode the probe chose and when forced
    reasoning = report["reasoning"]
    assert all(r["answered"] == r["sent"] > 0 and r["spent_max"] <= r["cap"] + 3 for r in reasoning), reasoning
    assert {(r["budget"], r["mode"]) for r in reasoning} == {("auto", "native"), ("forced", "forced")}
    t = report["throughput"]
    assert t["direct"]["tokens_per_s"] > 0 and t["thinkcap"]["tokens_per_s"] > 0 and t["serialised"]["tokens_per_s"] > 0


#: Bounds of predicted / observed mean system time in one 60-s window (75-s run less 15 s of
#: settling; about 25 requests at 50 % load): wide, because one window's mean is noisy; the
#: 25 % figure over three runs each is measured by ``bench/llama_server.py``.
PREDICTION_BAND = (0.5, 2.0)
#: Largest relative difference of the live fit's step at an occupancy from the engine's own
#: steps there over the traffic the fit has seen (the benchmark's goal for tau(1) and tau(4), 15 %).
ENGINE_BAND = 0.15


def _walk_through() -> ModuleType:
    """The walk-through, imported from its file (its dataclasses need it in ``sys.modules``)."""
    name = "thinkcap_example_real_backend"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_engines_own_steps_leave_out_the_step_that_read_a_prompt() -> None:
    """The truth the live fit is judged on: the engine's clock per gap, at the number of answers
    decoding across it; the step that read another answer's prompt is left out (its first event
    came in the gap, or a moment after the gap's end); answers without the engine's clock, and
    unanswered ones, count for nothing. An engine of 10 ms per sequence: A alone, then B's
    prompt read in a 30-ms step, then both, then B alone."""
    a_times = [0.00, 0.01, 0.02, 0.03, 0.04, 0.05, 0.080, 0.10, 0.12, 0.14]
    b_times = [0.0805, 0.10, 0.12, 0.14, 0.15, 0.16]  # its first event just after A's at the same step

    def answer(i: int, times: list[float], clocked: bool = True, status: int = 200) -> Record:
        clock = [1e3 * (t - times[0]) if clocked else None for t in times]
        return Record(id=i, phase=0, type="x", send_s=times[0] - 0.01, status=status,
                      events=list(zip(times, clock, strict=True)))  # fmt: skip

    # a third answer without the engine's clock, and a fourth shed, both inside B's run
    records = [answer(0, a_times), answer(1, b_times), answer(2, [0.11, 0.13], clocked=False),
               answer(3, [0.101, 0.121], status=503)]  # fmt: skip
    walk = _walk_through()
    steps = walk.engine_steps(records)
    assert set(steps) == {"1", "2"}
    assert steps["1"][1] == 7 and steps["1"][0] == pytest.approx(0.010)  # A's five, B's last two; not the 30 ms
    assert steps["2"][1] == 5 and steps["2"][0] == pytest.approx(0.020, rel=0.05)  # A's 0.08-0.10 left out (B's first)
    # the traffic the fit has seen: every gap of every stretch weighing the same
    assert walk.pooled(steps, {"1": [0.017, 7.0], "4": [0.04, 3.0]}) == {
        "1": [pytest.approx(0.0135), 14.0], "2": steps["2"], "4": [0.04, 3.0]}  # fmt: skip


def test_a_server_that_died_fails_at_once_with_its_exit_status_and_log(tmp_path: Path) -> None:
    """A started server that crashes is reported with its signal and the last lines of its log, by
    ``check`` and by ``wait_for`` (which does not keep polling the dead port until its deadline)."""
    log = tmp_path / "server.log"
    crash = "import os, signal; print('loading model', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", crash], stdout=out, stderr=subprocess.STDOUT)
    proc.wait(timeout=30)
    server = Server(proc, f"http://127.0.0.1:{free_port()}", log)
    with pytest.raises(BackendDiedError, match="signal SIGSEGV") as died:
        server.check()
    assert "loading model" in str(died.value)
    with pytest.raises(BackendDiedError, match="signal SIGSEGV"):
        wait_for(server.url + "/v1/models", proc, 3600.0, log)
