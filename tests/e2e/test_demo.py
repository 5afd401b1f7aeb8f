"""``thinkcap demo`` in its short mode: the report adds up and the caps follow the load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_report import check_in_browser
from thinkcap.cli import main

POLICIES = ("adaptive", "static", "maximal")


def test_short_demo_report_is_consistent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every request is answered, shed or errored; heavy-load caps are below light-load caps; the log audits clean."""
    log_dir = tmp_path / "logs"
    report_path = tmp_path / "report.json"
    assert main(["demo", "--duration", "16", "--log-dir", str(log_dir), "--report", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "whole run" in out and "adaptive" in out
    page = log_dir / "thinkcap.html"
    assert f"page:   {page}" in out  # the demo writes its page of plots next to its log and says where
    rep = json.loads(report_path.read_text())
    phases = rep["phases"]
    assert [p["name"] for p in phases] == ["light", "heavy", "overload", "light"]
    # the demo logs its phases; the report compares prediction and observation in each
    by_phase = rep["prediction_by_phase"]
    assert [p["name"] for p in by_phase] == ["light", "heavy", "overload", "light"]
    assert all(p["from_s"] == pytest.approx(2.0, abs=0.05) for p in by_phase)  # a 4-s phase: from half of it
    assert (
        "predicted / observed mean system time, adaptive, from 10 s (at most half the phase) into each phase "
        "(± its standard error): light " in out
    )
    # each ratio printed with the standard error the report holds for it
    assert all(p["ratio"] is None or p["requests"] < 2 or p["ratio_stderr"] is not None for p in by_phase), by_phase
    assert "phase 1 heavy (9/s)" in page.read_text()
    for p in phases:
        sent = {pol: p["policies"][pol]["sent"] for pol in POLICIES}
        assert len(set(sent.values())) == 1, sent  # one arrival sequence for every policy
        for pol in POLICIES:
            r = p["policies"][pol]
            assert r["sent"] == r["answered"] + r["shed"] + r["errored"]
    for pol in POLICIES:
        t = rep["totals"][pol]
        assert t["sent"] == sum(p["policies"][pol]["sent"] for p in phases) > 0
        assert t["sent"] == t["answered"] + t["shed"] + t["errored"]
        records = (log_dir / f"requests-{pol}.jsonl").read_text().splitlines()
        assert len(records) == t["sent"]
    light, overload = phases[0]["policies"]["adaptive"], phases[2]["policies"]["adaptive"]
    assert all(overload["caps_mean"][n] < light["caps_mean"][n] for n in light["caps_mean"]), (light, overload)
    static = phases[0]["policies"]["static"]["caps"]
    maximal = phases[0]["policies"]["maximal"]["caps"]
    assert all(static[n] <= maximal[n] for n in static)
    assert main(["audit", str(log_dir / "thinkcap.jsonl"), "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["decisions"] >= 8 and audit["mismatches"] == [] and audit["bad_lines"] == []
    adaptive = rep["totals"]["adaptive"]
    assert audit["requests"] >= adaptive["answered"] + adaptive["shed"]
    # the page of the demo's log, in a real browser: the demo sends no graded feedback
    check_in_browser(page, tmp_path / "demo.png", ("arrival", "caps", "latency", "service"))
    assert "no graded feedback in this log" in page.read_text()
