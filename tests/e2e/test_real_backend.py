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

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "real_backend.py"


@pytest.mark.timeout(1200)  # three 90-s phases and 32 direct requests: about 6 minutes
def test_caps_follow_the_load_on_a_real_backend() -> None:
    """Every request is answered (or shed while overloaded), the cap probe passes, the service model fitted from live
    traffic is within 15 % of the direct measurement, the heavy phase gets smaller caps than the moderate one, and the
    predicted mean system time at the moderate load is within 25 % of the observed one."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--phase-s", "90", "--json"], capture_output=True, text=True,
                         timeout=1200, check=True)  # fmt: skip
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
    assert 0.75 <= report["moderate_predicted_over_observed"] <= 1.25, moderate
