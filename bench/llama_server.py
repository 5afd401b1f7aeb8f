"""llama-server benchmark: thinkcap in front of a real continuous-batching server, judged.

Run: .venv/bin/python bench/llama_server.py [--runs 3] [--phase-s 120] [--json]
(``make backend`` first: it builds ``llama-server`` into ``.venv/bin``)

The walk-through of ``make demo-real`` (``examples/real_backend.py``: llama-server
``--parallel 4``, SmolLM2-135M, one thread) with more of everything, then its figures
against the goals:

1. throughput at saturation through thinkcap with slots = 4, at least 95 % of direct (and
   what ``max_concurrency = 1`` costs), three saturation measurements alternated per round;
2. thinkcap's live step fit, a and b within 20 % of the direct calibration;
3. predicted against observed mean system time within 25 % in every Poisson run at about
   50 % and 80 % of the capacity, and on average; caps smaller under the heavier load;
4. the live fit's tau(1) and tau(4) at the end of every run within 15 % of the steps the
   direct calibration measured at 1 and 4 sequences (its mean gaps, after a discarded
   warm-up round; its fitted line is shown too, but the step is not a line and a line's ends
   move with the occupancies behind it), and the fit in use at most 60 s after the proxy's
   first request;
5. the live fit's step at every occupancy at the end of every run within 15 % of the engine's
   own steps over the traffic the fit has seen by then (the closed loops through thinkcap and
   the runs so far), read off llama-server's clock (``timings.predicted_ms`` of each streamed
   event): the truth of the same steps, where the direct calibration runs minutes away and
   the engine's speed moves between two of them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The walk-through this benchmark judges (run as a script: examples are leaves).
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "real_backend.py"

GOALS = {
    "throughput_ratio": 0.95,
    "step_error": 0.20,
    "prediction_error": 0.25,
    "tau_error": 0.15,
    "fit_in_use_s": 60.0,
}


def verdicts(report: dict[str, Any]) -> list[str]:
    """One line per goal: the figure, the goal, met or missed."""
    s = report["summary"]
    lines = []

    def line(what: str, ok: bool) -> None:
        lines.append(f"{'met   ' if ok else 'MISSED'} {what}")

    line(f"throughput through thinkcap / direct = {s['throughput_ratio']:.3f} (goal >= {GOALS['throughput_ratio']})",
         s["throughput_ratio"] >= GOALS["throughput_ratio"])  # fmt: skip
    for key, name in (("base_error", "a"), ("per_seq_error", "b")):
        line(f"fitted {name} against direct: {100 * s[key]:+.1f} % (goal within 20 %; the direct calibration "
             f"repeated at the end moved {100 * s['direct_' + key.replace('error', 'drift')]:+.1f} %; thinkcap's is "
             f"{100 * s['client_' + key]:+.1f} % from the client's fit of the loops it saw)",
             abs(s[key]) <= GOALS["step_error"])  # fmt: skip
    for load, ratios in s["ratios"].items():
        text = ", ".join(f"{r:.2f}" for r in ratios)
        line(f"predicted / observed at {load}, run by run: {text} (goal within 25 %)",
             all(abs(r - 1) <= GOALS["prediction_error"] for r in ratios))  # fmt: skip
        mean = s["mean_ratio"][load]
        line(f"predicted / observed at {load}, over the runs: {mean:.2f}", abs(mean - 1) <= GOALS["prediction_error"])
    for e in s["tau_errors"]:
        worst = max(abs(e["start_tau1"]), abs(e["start_tauN"]))
        line(f"run {e['run']} at {e['load']}: the live fit's tau(1), tau(4) {100 * e['start_tau1']:+.1f} %, "
             f"{100 * e['start_tauN']:+.1f} % from the steps the direct calibration measured (goal within 15 %; "
             f"at the end {100 * e['end_tau1']:+.1f} %, {100 * e['end_tauN']:+.1f} %; from its line "
             f"{100 * e['line_tau1']:+.1f} %, {100 * e['line_tauN']:+.1f} %)", worst <= GOALS["tau_error"])  # fmt: skip
    for e in s["engine_errors"]:
        text = ", ".join(f"{j}: {100 * v:+.1f} %" for j, v in e["errors"].items())
        line(f"run {e['run']} at {e['load']}: the live fit's step from the engine's own over the traffic it has "
             f"seen, by occupancy: {text or 'no occupancy with enough gaps'} (goal within 15 %)",
             bool(e["errors"]) and all(abs(v) <= GOALS["tau_error"] for v in e["errors"].values()))  # fmt: skip
    after = s["fit_in_use_after_s"]
    line(f"live fit in use {'never' if after is None else f'{after:.0f} s'} after the first request (goal <= 60 s)",
         after is not None and after <= GOALS["fit_in_use_s"])  # fmt: skip
    light, heavy = (sum(c.values()) for c in s["caps"].values())
    line(f"caps under the heavier load smaller: {heavy:.0f} against {light:.0f} tokens in all", heavy < light)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--phase-s", type=float, default=120.0)
    ap.add_argument("--settle-s", type=float, default=20.0)
    ap.add_argument("--throughput-s", type=float, default=30.0)
    ap.add_argument("--throughput-rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--log-dir")
    args = ap.parse_args()
    passed = ["--slots", str(args.slots), "--runs", str(args.runs), "--phase-s", str(args.phase_s),
              "--settle-s", str(args.settle_s), "--throughput-s", str(args.throughput_s),
              "--throughput-rounds", str(args.throughput_rounds)]  # fmt: skip
    if args.log_dir:
        passed += ["--log-dir", args.log_dir]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        # the example prints its own report (the lines a person reads) and writes the JSON
        done = subprocess.run([sys.executable, str(EXAMPLE), *passed, "--report", str(out)],
                              stdout=subprocess.DEVNULL if args.json else None, check=False)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"{EXAMPLE.name} failed with status {done.returncode}")
        report = json.loads(out.read_text())
    if args.json:
        print(json.dumps(report))
        return
    print()
    print("\n".join(verdicts(report)))


if __name__ == "__main__":
    main()
