"""thinkcap serve in front of the real llama.cpp server under Poisson load (examples/real_backend.py).

The walk-through starts llama.cpp, measures it directly, runs the proxy with a wrong
configured service model through a warm-up, a moderate and a heavy phase of open-loop load,
then measures the server directly again.
The direct measurement brackets the load and draws its prompts as the load does, so the
server's drift and its prompt cache weigh on both sides of the fit's comparison.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples.real_backend import BackendDiedError, Server, free_port, wait_for
from thinkcap.sim.des import lindley

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "real_backend.py"


@pytest.mark.timeout(1200)  # three 90-s phases and 32 direct requests: about 6 minutes
def test_caps_follow_the_load_on_a_real_backend() -> None:
    """Every request is answered (or shed while overloaded), the cap probe passes, the service model fitted from live
    traffic is within 15 % of the direct measurement, the heavy phase gets smaller caps than the moderate one, and the
    predicted mean system time at the moderate load is within MODERATE_BAND of the observed one."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--phase-s", "90", "--json"], capture_output=True, text=True,
                         timeout=1200, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]  # a dead server: its exit status and log's tail
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["answered"] + report["shed"] == report["sent"] > 30  # shed: 503 while overloaded
    assert report["answered"] > 30
    assert report["probe"]["status"] == "honoured"
    for name, fitted in report["fitted"].items():
        assert fitted["fitted"] and fitted["samples"] >= 8, name
        assert fitted["per_token_s"] > 0, (name, fitted)
        assert abs(fitted["error"]) <= 0.15, (name, fitted, report["direct"])
    _, moderate, heavy = report["phases"]
    assert moderate["decisions"] > 0 and heavy["decisions"] > 0
    assert all(heavy["caps_mean"][n] < moderate["caps_mean"][n] for n in moderate["caps_mean"]), report["phases"]
    assert heavy["estimated_rate"] > moderate["estimated_rate"]
    low, high = MODERATE_BAND
    assert low <= report["moderate_predicted_over_observed"] <= high, moderate


#: Bounds of (M/G/1 prediction) / (mean system time observed over the moderate phase). A
#: 90-s phase at 0.25 requests/s holds 22 requests on average (19 with the walk-through's
#: seed), too few for a tight bound: see the test below.
MODERATE_BAND = (0.6, 1.6)


def test_the_moderate_band_covers_what_one_phase_of_an_exact_model_reads() -> None:
    """With the M/G/1 model exactly true (the walk-through's moderate phase: 0.25 requests/s,
    0.56 s + 14.8 ms per token, caps of 91 and 48 tokens, a 90-s phase after 90 s at the same
    rate), the ratio of the prediction to one phase's observed mean leaves MODERATE_BAND in
    under 1 % of phases, and leaves +-25 % in more than 5 % of them: a tight band would fail
    on sampling noise alone. The median ratio is above 1: one phase's mean is usually below
    the long-run mean, now and then far above it."""
    rng = np.random.default_rng(0)
    rate, overhead, per_token, caps = 0.25, 0.56, 0.0148, np.array([91.0, 48.0])
    service = overhead + per_token * caps
    mean, second = service.mean(), (service**2).mean()
    rho = rate * mean
    predicted = mean + rate * second / (2 * (1 - rho))  # Pollaczek-Khinchine
    ratios = []
    for _ in range(4000):
        arrival = np.cumsum(rng.exponential(1 / rate, 120))
        arrival = arrival[arrival < 180.0]
        s = service[rng.integers(0, 2, arrival.size)] * rng.normal(1.0, 0.05, arrival.size)
        system = lindley(arrival, s) + s
        ratios.append(predicted / system[arrival >= 90.0].mean())
    r = np.array(ratios)
    low, high = MODERATE_BAND
    assert np.mean((r < low) | (r > high)) < 0.01
    assert np.mean((r < 0.75) | (r > 1.25)) > 0.05
    assert np.median(r) > 1.0


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
