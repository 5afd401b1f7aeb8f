"""thinkcap serve in front of llama.cpp's llama-server (4 slots) under closed-loop and Poisson load
(examples/real_backend.py, the walk-through of ``make demo-real``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from thinkcap.sim.llamacpp import BackendDiedError, Server, free_port, wait_for

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
    # the step read per occupancy (what the queue model uses), against the steps the direct
    # calibration measured at 1-4 sequences before and after the live runs: within STEP_BAND of
    # one of them (the engine's own speed moved 10-16 % between the two in one run here; in one
    # suite run the live levels read 23-50 % above the start's steps, the end's not kept)
    start, end = ([report[k]["mean_gap_s"][str(j)] for j in (1, 2, 3, 4)] for k in ("direct_step", "direct_step_end"))
    assert len(fitted["levels_s"]) == 4, fitted
    for level, *measured in zip(fitted["levels_s"], start, end, strict=True):
        assert min(abs(level / m - 1) for m in measured) <= STEP_BAND, (fitted["levels_s"], start, end)
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
#: Largest relative difference of a live level from the direct calibration's step (one short run).
STEP_BAND = 0.25


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
