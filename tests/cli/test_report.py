"""``thinkcap report``: a log turned into one self-contained page of plots, checked as HTML and
in a real headless Chromium (skipped with a message where Chromium or Playwright is missing)."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.proxy.conftest import write_config
from thinkcap.cli import main
from thinkcap.cli import report as report_module
from thinkcap.proxy.control import ControlLoop
from thinkcap.proxy.logs import configure, logger
from thinkcap.proxy.logs import reset as reset_logging
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import build_state

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOTS = ("arrival", "caps", "latency", "service", "accuracy")


def make_log(tmp_path: Path) -> Path:
    """A log of real decisions (the control loop on a fake clock, shedding on for two of
    them), requests answered 0.3 s after they arrive, graded feedback, and a corrupt line."""
    settings = load_settings(write_config(tmp_path, "http://127.0.0.1:9", controller="interval_s = 1.0"))
    now = [100.0]
    state = build_state(settings, clock=lambda: now[0])
    loop = ControlLoop(state, settings.controller)
    path = tmp_path / "thinkcap.jsonl"
    with path.open("w") as fh:
        configure(json_lines=True, stream=fh)
        try:
            for k in range(8):
                now[0] = 100.0 + k
                state.shedding = k in (3, 4)  # held there: the shedding rule itself is tested elsewhere
                loop._shedding = lambda *_, **__: None  # type: ignore[method-assign]
                assert loop.step(now[0]) is not None
                for i in range(3):
                    logger().info("request", arrival_time=now[0] + 0.1 + 0.3 * i, system_time_s=0.3 + 0.01 * k,
                                  status=200 if i else 503, type="easy")  # fmt: skip
            for i in range(40):
                logger().info("feedback", type="easy" if i % 2 else "hard", reasoning_tokens=10 * i, correct=i % 3 != 0)
        finally:
            reset_logging()
        fh.write("{not json\n")
    return path


def test_the_page_has_the_summary_and_every_plot_with_its_series(tmp_path: Path) -> None:
    """The report page holds the summary (replays, unreadable lines, answers) and every plot with
    its series."""
    page = report_module.render_html(report_module.read_log(str(make_log(tmp_path))))
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    summary = page[page.index('<table id="summary">') : page.index("</table>")]
    assert "8 replayed, 0 mismatches" in summary
    assert "<th>unreadable lines</th><td>1</td>" in summary
    assert "24: 16 answered (200), 8 not" in summary
    assert "graded feedback</th><td>40 answers" in summary
    assert '<table id="shedding">' in page and "2.0 s" in page  # shedding on from t = 3 s to 5 s
    for key in PLOTS:
        start = page.index(f'<figure class="plot" id="plot-{key}">')
        figure = page[start : page.index("</figure>", start)]
        assert re.search(r'id="series-[^"]+"', figure), key
    assert "series-cap-hard" in page and "series-cap-easy" in page
    assert "series-accuracy-easy" in page and "series-accuracy-hard" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing is fetched when it is viewed


def test_a_log_without_feedback_says_so(tmp_path: Path) -> None:
    """A log without graded feedback says so in place of the accuracy plot."""
    path = make_log(tmp_path)
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if '"feedback"' not in line))
    page = report_module.render_html(report_module.read_log(str(path)))
    assert 'id="missing-accuracy"' in page and "no graded feedback in this log" in page
    assert 'id="plot-accuracy"' not in page


def test_the_command_writes_next_to_the_log_and_explains_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``thinkcap report`` writes the page next to the log; a missing log is one line on stderr and
    exit 2."""
    log = make_log(tmp_path)
    assert main(["report", str(log)]) == 0
    assert f"report: {log.with_suffix('.html')}" in capsys.readouterr().out
    assert log.with_suffix(".html").read_text().startswith("<!doctype html>")
    assert main(["report", str(tmp_path / "absent.jsonl")]) == 2
    assert "cannot be read" in capsys.readouterr().err

    def missing() -> Any:
        raise report_module.MissingExtraError("thinkcap report draws with matplotlib: pip install 'thinkcap[report]'")

    monkeypatch.setattr(report_module, "_pyplot", missing)
    assert main(["report", str(log), "--out", str(tmp_path / "x.html")]) == 2
    assert "thinkcap[report]" in capsys.readouterr().err


def check_in_browser(page_path: Path, screenshot: Path, plots: tuple[str, ...]) -> dict[str, int]:
    """Open the page in headless Chromium: no errors, no request beyond the file, every plot's
    series drawn, and a screenshot that is not blank. Returns the series found per plot."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (make tools installs Debian's chromium): the page is not opened")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    image = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("request", lambda r: None if r.url.startswith("file:") else problems.append(f"fetched {r.url}"))
            page.goto(page_path.resolve().as_uri())
            counts = page.evaluate(
                """() => Object.fromEntries([...document.querySelectorAll('figure.plot')].map(f => [
                    f.id.replace('plot-', ''),
                    [...f.querySelectorAll('[id^="series-"]')].filter(g => {
                        const shapes = g.matches('path,rect,use') ? [g] : [...g.querySelectorAll('path,rect,use')];
                        return shapes.some(s => (s.getAttribute('d') || '').length > 8 || s.tagName !== 'path');
                    }).length]))"""
            )
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    for key in plots:
        assert counts.get(key, 0) >= 1, (key, counts)
    shot = image.open(io.BytesIO(screenshot.read_bytes())).convert("RGB")
    small = shot.resize((200, 400))
    assert len(small.getcolors(maxcolors=200 * 400) or []) > 50  # text, lines and colours, not one blank colour
    lo, hi = small.convert("L").getextrema()
    assert hi - lo > 150
    return counts


def test_the_page_loads_in_chromium_with_every_plot_drawn(tmp_path: Path) -> None:
    """The page, opened in a real Chromium, draws every plot with its series."""
    log = make_log(tmp_path)
    page = report_module.write_report(log, tmp_path / "report.html")
    counts = check_in_browser(page, tmp_path / "report.png", PLOTS)
    assert counts["caps"] >= 2  # one series per type


def test_the_prediction_is_compared_phase_by_phase_once_settled(tmp_path: Path) -> None:
    """``phase`` events (as ``thinkcap demo`` logs them) split the comparison: each phase's
    intervals from ``settle_s`` in (at most half the phase), weighted by their requests."""
    path = make_log(tmp_path)
    with path.open("a") as fh:
        configure(json_lines=True, stream=fh)
        try:
            logger().info("phase", phase=0, name="light", offered_rate=1.5, time=100.0)
            logger().info("phase", phase=1, name="heavy", offered_rate=9.0, time=104.0)
        finally:
            reset_logging()
    data = report_module.read_log(str(path))
    predicted = {d["time"]: d["predicted_mean_system_time"] for d in data.decisions}
    light, heavy = report_module.phase_ratios(data, settle_s=1.0)
    # light: the intervals of the decisions at 101-103 s, two answers each at 0.3 + 0.01 k s
    assert light["observed"] == pytest.approx(0.32)
    assert light["predicted"] == pytest.approx(sum(predicted[t] for t in (101.0, 102.0, 103.0)) / 3)
    assert light["requests"] == 6 and light["ratio"] == pytest.approx(light["predicted"] / 0.32)
    # and how well six answers know it: the observed mean's standard error, carried to the ratio
    se = float(np.std([0.31, 0.31, 0.32, 0.32, 0.33, 0.33], ddof=1) / np.sqrt(6))
    assert light["observed_stderr"] == pytest.approx(se)
    assert light["ratio_stderr"] == pytest.approx(light["ratio"] * se / 0.32)
    # heavy: the log ends at 107.7 s, so it settles from 105 s (1 s in): decisions 105-107
    assert heavy["observed"] == pytest.approx(0.36) and heavy["requests"] == 6 and heavy["from_s"] == 1.0
    summary = dict(report_module.summary(data))  # the page's default: 10 s in, here half the 4-s phase
    settled = report_module.phase_ratios(data)[0]
    assert summary["phase 0 light (1.5/s)"].endswith(
        f"ratio {settled['ratio']:.2f} ± {settled['ratio_stderr']:.2f} (4 requests from 2 s in)"
    )


def test_a_phase_with_nothing_to_compare_says_so(tmp_path: Path) -> None:
    """A phase whose intervals hold no prediction (an overload) or no answer has no ratio."""
    path = make_log(tmp_path)
    with path.open("a") as fh:
        configure(json_lines=True, stream=fh)
        try:
            logger().info("phase", phase=0, name="late", offered_rate=36.0, time=200.0)
        finally:
            reset_logging()
    data = report_module.read_log(str(path))
    (late,) = report_module.phase_ratios(data)
    assert late["ratio"] is None and late["requests"] == 0
    assert "nothing to compare" in dict(report_module.summary(data))["phase 0 late (36/s)"]
