"""The online step-time fit: token gaps, whole answers, the prefill guard, evidence, forgetting."""

from __future__ import annotations

import numpy as np
import pytest

from thinkcap.estimators import GapTally, StepFit

A, B, PRE, P = 0.016, 0.0065, 0.04, 0.005  # seconds: step base, per sequence, prefill base, per prompt token


def _streamed(fit: StepFit, rng: np.random.Generator, now: float, *, noise: float = 0.002, jmax: int = 4) -> None:
    gaps = GapTally()
    prompt = float(rng.integers(10, 200))
    for _ in range(int(rng.integers(20, 80))):
        j = int(rng.integers(1, jmax + 1))
        n = 1 if rng.random() < 0.9 else 2  # two tokens in one read now and then
        gaps.add(n * (A + B * j) + float(rng.normal(0, noise)), n, j)
    fit.update(prompt_tokens=prompt, tokens=gaps.samples + 1, service_s=1.0, mean_in_service=2.0, gaps=gaps,
               first_token_s=PRE + P * prompt + float(rng.normal(0, noise)), now=now)  # fmt: skip


def _whole(fit: StepFit, rng: np.random.Generator, now: float, *, noise: float = 0.01) -> None:
    prompt, tokens, n = float(rng.integers(10, 200)), float(rng.integers(5, 120)), float(rng.uniform(1, 4))
    service = PRE + P * prompt + tokens * (A + B * n) + float(rng.normal(0, noise))
    fit.update(prompt_tokens=prompt, tokens=tokens, service_s=service, mean_in_service=n, now=now)


def test_gaps_alone_give_the_line_through_each_occupancys_mean_step() -> None:
    """Without forgetting, the step from streamed gaps is the least-squares line through each
    occupancy's mean step (least squares of its gaps on their token counts), every occupancy
    weighing the same, however often it occurs."""
    rng = np.random.default_rng(0)
    fit = StepFit(forgetting=1.0)
    sums: dict[int, list[float]] = {j: [0.0, 0.0] for j in range(1, 5)}
    for i in range(20):
        gaps = GapTally()
        for _ in range(50):
            j = int(rng.choice([1, 2, 2, 2, 3, 4]))  # occupancy 2 three times as often
            n = int(rng.integers(1, 3))
            y = n * (A + B * j) + float(rng.normal(0, 0.003))
            gaps.add(y, n, j)
            sums[j][0] += n * n
            sums[j][1] += n * y
        fit.update(prompt_tokens=0, tokens=51, service_s=1.0, mean_in_service=2.0, gaps=gaps, now=float(i))
    js = np.arange(1, 5, dtype=float)
    means = np.array([sums[j][1] / sums[j][0] for j in range(1, 5)])
    ref, *_ = np.linalg.lstsq(np.column_stack([np.ones(4), js]), means, rcond=None)
    est = fit.get()
    np.testing.assert_allclose([est.base_s, est.per_seq_s], ref, rtol=1e-9)
    assert est.gaps == 1000 and est.requests == 20


def test_a_step_that_is_not_a_line_is_read_as_a_calibration_reads_it() -> None:
    """llama-server's step (11.7, 22.7, 35.8, 36.9 ms at 1..4) under traffic that mostly runs 2
    or 3 sequences: the fit is the line a calibration running each occupancy in turn finds
    (about 7.5 + 7.9 ms j), not the line through the busy occupancies (negative intercept)."""
    steps = {1: 0.0117, 2: 0.0227, 3: 0.0358, 4: 0.0369}
    rng = np.random.default_rng(10)
    fit = StepFit(base_s=0.03, per_seq_s=0.0, min_samples=30)
    for i in range(100):
        gaps = GapTally()
        for _ in range(60):
            j = int(rng.choice([1, 2, 2, 2, 2, 3, 3, 3, 3, 4]))
            gaps.add(steps[j] * (1 + float(rng.normal(0, 0.05))), 1, j)
        fit.update(prompt_tokens=20, tokens=61, service_s=2.0, mean_in_service=2.5, gaps=gaps, first_token_s=0.05,
                   now=float(i))  # fmt: skip
    est = fit.get()
    js = np.arange(1, 5, dtype=float)
    calibration, *_ = np.linalg.lstsq(np.column_stack([np.ones(4), js]), np.array(list(steps.values())), rcond=None)
    assert (est.base_s, est.per_seq_s) == pytest.approx(tuple(calibration), rel=0.05)
    assert est.base_s > 0 and est.fitted
    # the step itself is read per occupancy: the line through the levels misses tau(1) by 15 %
    assert est.levels == pytest.approx(tuple(steps.values()), rel=0.02)
    assert [est.step_time(j) for j in (1, 2, 3, 4)] == pytest.approx(list(steps.values()), rel=0.02)
    assert est.base_s + est.per_seq_s > 1.1 * steps[1]


def test_the_levels_run_from_one_sequence_up_to_the_first_not_pinned_down() -> None:
    """Gaps at 1, 2 and 4 sequences (none at 3): the levels are tau(1), tau(2); above them the
    line, never below tau(2); without gaps at one sequence there are no levels."""
    steps = {1: 0.010, 2: 0.020, 4: 0.030}
    rng = np.random.default_rng(12)
    fit, high = StepFit(min_samples=5), StepFit(min_samples=5)
    for i in range(40):
        gaps, upper = GapTally(), GapTally()
        for _ in range(60):
            j = int(rng.choice([1, 2, 4]))
            gaps.add(steps[j] * (1 + float(rng.normal(0, 0.03))), 1, j)
            upper.add(steps[j] * (1 + float(rng.normal(0, 0.03))), 1, j + 1)
        for f, g in ((fit, gaps), (high, upper)):
            f.update(prompt_tokens=0, tokens=61, service_s=1.0, mean_in_service=2.0, gaps=g, now=float(i))
    est = fit.get()
    assert est.levels == pytest.approx((0.010, 0.020), rel=0.02)
    assert est.step_time(1.5) == pytest.approx(0.015, rel=0.02)
    assert est.step_time(3) == pytest.approx(max(est.base_s + 3 * est.per_seq_s, est.levels[1]))
    assert est.step_time(4) == pytest.approx(est.base_s + 4 * est.per_seq_s)
    assert high.get().levels == ()


@pytest.mark.parametrize("kind", ["streamed", "whole", "both"])
def test_recovers_step_and_prefill_with_honest_errors(kind: str) -> None:
    """Streamed answers, whole ones or both: the fit recovers the step and the prefill, with
    standard errors that cover the truth."""
    rng = np.random.default_rng(1)
    fit = StepFit(base_s=0.05, per_seq_s=0.0, prefill_s=0.5, min_samples=30)
    for i in range(300):
        streamed = kind == "streamed" or (kind == "both" and i % 2 == 0)
        (_streamed if streamed else _whole)(fit, rng, float(i))
    est = fit.get()
    assert est.fitted
    for got, true, se in ((est.base_s, A, est.base_stderr_s), (est.per_seq_s, B, est.per_seq_stderr_s)):
        assert abs(got - true) <= max(4 * se, 1e-5), (got, true, se)
        assert abs(got - true) / true < 0.05
    assert est.prefill_base_s == pytest.approx(PRE, abs=0.01)
    assert est.prefill_per_token_s == pytest.approx(P, rel=0.05)
    assert est.step_time(4) == pytest.approx(A + 4 * B, rel=0.03)
    assert est.prefill_s(100) == pytest.approx(PRE + 100 * P, rel=0.05)


def test_the_first_tokens_wait_is_not_a_step() -> None:
    """A long time to the first token moves the prefill, never the step."""
    rng, slow_rng = np.random.default_rng(2), np.random.default_rng(2)
    fit, slow = StepFit(), StepFit()
    for i in range(50):
        _streamed(fit, rng, float(i), noise=0.0)
        gaps = GapTally()
        for _ in range(30):
            j = int(slow_rng.integers(1, 5))
            gaps.add(A + B * j, 1, j)
        slow.update(prompt_tokens=50, tokens=31, service_s=9.0, mean_in_service=2.0, gaps=gaps, first_token_s=8.0,
                    now=float(i))  # fmt: skip
    a, b = fit.get(), slow.get()
    assert (b.base_s, b.per_seq_s) == pytest.approx((A, B), rel=1e-6)
    assert (a.base_s, a.per_seq_s) == pytest.approx((A, B), rel=1e-6)
    assert b.prefill_s(50) == pytest.approx(8.0, rel=1e-3)


def test_a_first_token_is_its_prefill_held_up_by_other_prompts_and_its_first_events_steps() -> None:
    """A streamed time to the first token is the prompt's prefill alone, plus the k other
    prompts read before its first decode step, plus the steps of the tokens its first event
    brought beyond the first ((1 + k)(o + p P) + (n - 1) tau(j)): the fit recovers the prefill.
    Read as the prefill slowed by the batch (the reading before), a mean prompt's came out 97 %
    long here."""
    rng = np.random.default_rng(6)
    fit = StepFit()
    seen, weight = 0.0, 0.0  # the others' prompts are read at the mean prompt seen (as the fit forgets)
    for i in range(300):
        gaps = GapTally()
        for _ in range(40):
            j = int(rng.integers(1, 5))
            gaps.add(A + B * j, 1, j)
        prompt, j, k = float(rng.integers(10, 200)), int(rng.integers(1, 5)), int(rng.integers(0, 3))
        seen, weight = fit.forgetting * seen + prompt, fit.forgetting * weight + 1.0
        first = PRE + P * prompt + k * (PRE + P * seen / weight) + 15 * (A + B * j)
        fit.update(prompt_tokens=prompt, tokens=41, service_s=1.0, mean_in_service=2.0, gaps=gaps,
                   first_token_s=first, first_token_in_service=j, first_token_held_by=k,
                   first_event_tokens=16, now=float(i))  # fmt: skip
    est = fit.get()
    assert est.prefill_base_s == pytest.approx(PRE, rel=0.02)
    assert est.prefill_per_token_s == pytest.approx(P, rel=0.02)


def test_a_first_tokens_own_wait_is_told_from_the_prefill_by_the_prompts_read_meanwhile() -> None:
    """Before its first token a request also waits on its own (the hops, the step in
    progress: 4 ms here), and its first event brings 9 to 16 tokens, as the simulated server's
    (its step 0.25 + 0.35 ms x j, 8 slots; a prefill of 8 ms + 0.03 ms a prompt token): the
    prefill, the time it holds up the others, is read from the k other prompts read meanwhile
    with the own wait c apart, and the first event's steps read off the gaps (on the demo's
    engine, the steps fitted beside the prefill read it 15 % short: 9.8 ms against 11.5)."""
    a, b, o, p, own = 0.00025, 0.00035, 0.008, 0.00003, 0.004
    rng = np.random.default_rng(7)
    fit = StepFit(base_s=a, per_seq_s=b, prefill_s=o)
    seen, weight = 0.0, 0.0
    for i in range(2000):
        gaps = GapTally()
        for _ in range(10):
            j = int(rng.integers(1, 9))
            gaps.add(16 * (a + b * j) * float(rng.normal(1, 0.02)), 16, j)
        prompt, k, n = float(rng.integers(10, 200)), int(rng.poisson(0.6)), int(rng.integers(9, 17))
        j = min(int(rng.integers(1, 7)) + k, 8)  # the others read meanwhile run in its first event's steps
        seen, weight = fit.forgetting * seen + prompt, fit.forgetting * weight + 1.0
        first = own + o + p * prompt + k * (o + p * seen / weight) + (n - 1) * (a + b * j) + float(rng.normal(0, 0.002))
        fit.update(prompt_tokens=prompt, tokens=41, service_s=1.0, mean_in_service=2.0, gaps=gaps,
                   first_token_s=max(first, 0.0), first_token_in_service=j, first_token_held_by=k,
                   first_event_tokens=n, now=float(i))  # fmt: skip
    est = fit.get()
    assert est.prefill_s(100) == pytest.approx(o + 100 * p, rel=0.05), est
    assert est.first_token_base_s == pytest.approx(own, abs=0.001), est
    assert est.step_time(1) == pytest.approx(a + b, rel=0.02)


def test_not_fitted_before_enough_requests_or_without_spread_in_the_batch() -> None:
    """The fit does not count before min_samples requests, nor without a spread of occupancies."""
    rng = np.random.default_rng(3)
    fit = StepFit(base_s=0.02, per_seq_s=0.01, min_samples=30)
    for i in range(29):
        _streamed(fit, rng, float(i))
    assert not fit.get().fitted
    _streamed(fit, rng, 29.0)
    assert fit.get().fitted
    # Always two in service: tau(2) is known, a and b apart are not.
    flat = StepFit(base_s=0.02, per_seq_s=0.01, min_samples=5)
    for i in range(100):
        gaps = GapTally()
        for _ in range(40):
            gaps.add(A + 2 * B + float(rng.normal(0, 0.002)), 1, 2)
        flat.update(prompt_tokens=0, tokens=41, service_s=1.0, mean_in_service=2.0, gaps=gaps, now=float(i))
    est = flat.get()
    assert not est.fitted
    assert est.step_time(2) == pytest.approx(A + 2 * B, rel=0.01)


def test_a_negative_intercept_keeps_the_fit_out_of_use_where_the_line_reads_the_step() -> None:
    """Gaps on a line through -2 ms at 2-4 sequences, none at one: the line reads tau(1), so its
    negative intercept is reported as fitted, not clamped, and keeps the fit out of use (a
    clamped intercept reads as no batching gain). A step that shrinks with the batch is no fit
    either, levels or not."""
    fit = StepFit(min_samples=1)
    for i in range(20):
        gaps = GapTally()
        for j in (2, 3, 4):
            gaps.add(0.010 * j - 0.002, 1, j)
        fit.update(prompt_tokens=0, tokens=5, service_s=1.0, mean_in_service=3.0, gaps=gaps, now=float(i))
    est = fit.get()
    assert est.levels == ()
    assert est.base_s == pytest.approx(-0.002, rel=1e-6) and est.per_seq_s == pytest.approx(0.010, rel=1e-6)
    assert not est.fitted
    flat = StepFit(min_samples=1)
    for i in range(20):
        gaps = GapTally()
        for j in (1, 2, 3, 4):
            gaps.add(0.030 - 0.001 * j, 1, j)  # a step that shrinks with the batch
        flat.update(prompt_tokens=0, tokens=5, service_s=1.0, mean_in_service=2.0, gaps=gaps, now=float(i))
    est = flat.get()
    assert est.per_seq_s == pytest.approx(-0.001, rel=1e-3) and not est.fitted


def test_a_concave_step_read_per_occupancy_is_a_fit_whatever_its_lines_intercept() -> None:
    """llama-server's step on one thread (6.7, 14.1, 25.1 ms at 1-3 sequences; 4 rare at half
    load, so not pinned down): the line through those levels crosses 0 at -3.1 ms, far outside
    its noise, and the fit went out of use for half of a 50 % run in CI, the decisions falling
    back to the configured step. The levels carry the step from one sequence up, so the fit
    counts: tau(1..3) read as measured, the line (through the origin, under a >= 0) only above
    them. A line through -2 ms from one sequence up is a fit the same way."""
    rng = np.random.default_rng(14)
    steps = {1: 0.0067, 2: 0.0141, 3: 0.0251}
    fit = StepFit(base_s=0.03, per_seq_s=0.0, min_samples=5)
    for i in range(60):
        gaps = GapTally()
        for j, tau in steps.items():
            for _ in range(15):
                gaps.add(tau * (1 + float(rng.normal(0, 0.05))), 1, j)
        fit.update(prompt_tokens=0, tokens=46, service_s=1.0, mean_in_service=2.0, gaps=gaps, now=float(i))
    js, taus = np.array(list(steps), dtype=float), np.array(list(steps.values()))
    assert np.polyfit(js, taus, 1)[1] < -0.003  # the unconstrained line's intercept
    est = fit.get()
    assert est.fitted and est.base_s == 0.0
    assert est.levels == pytest.approx(tuple(steps.values()), rel=0.02)
    assert est.per_seq_s == pytest.approx(float(js @ taus / (js @ js)), rel=0.02)
    assert est.step_time(4) == pytest.approx(4 * est.per_seq_s)
    steep = StepFit(min_samples=1)
    for i in range(20):
        gaps = GapTally()
        for k in (1, 2, 3, 4):
            for _ in range(12):
                gaps.add(0.010 * k - 0.002 + float(rng.normal(0, 0.0004)), 1, k)
        steep.update(prompt_tokens=0, tokens=49, service_s=1.0, mean_in_service=2.5, gaps=gaps, now=float(i))
    est = steep.get()
    assert est.fitted and est.levels == pytest.approx((0.008, 0.018, 0.028, 0.038), rel=0.02)


def test_an_engine_whose_step_is_proportional_to_the_batch_is_a_fit() -> None:
    """A step of 8.6 ms per sequence and no intercept, read with 1 ms of jitter: the level line's
    intercept comes out a little below 0 (-0.06 ms on a CI machine's llama-server), well inside
    its noise. It reads as 0, the line refitted through the origin, and the fit counts (it was
    kept out of use for good)."""
    rng = np.random.default_rng(2)
    fit = StepFit(base_s=0.02, per_seq_s=0.01, min_samples=5)
    means: dict[int, list[float]] = {j: [] for j in (1, 2, 3, 4)}
    for i in range(40):
        gaps = GapTally()
        for j in (1, 2, 3, 4):
            for _ in range(10):
                gap = 0.0086 * j + float(rng.normal(0, 0.001))
                gaps.add(gap, 1, j)
                means[j].append(gap)
        fit.update(prompt_tokens=0, tokens=41, service_s=1.0, mean_in_service=2.5, gaps=gaps, now=float(i))
    _slope, intercept = np.polyfit([1, 2, 3, 4], [np.mean(means[j]) for j in (1, 2, 3, 4)], 1)
    assert -0.0002 < intercept < 0  # the unconstrained line's intercept: negative, inside the noise
    est = fit.get()
    assert est.fitted and est.base_s == 0.0
    assert est.per_seq_s == pytest.approx(0.0086, rel=0.01)


def test_a_step_about_proportional_to_the_batch_is_fitted_through_the_origin() -> None:
    """llama-server on one CPU thread, as thinkcap's live fit read it in a Poisson run here:
    about 8.2 ms per sequence and an intercept of -0.25 ms, some standard errors below 0 but 3 %
    of tau(1): the step is about proportional to the batch. The fit counts, through the origin
    (it went out of use whenever the intercept crossed below 0, and the run's last decisions
    used the configured step)."""
    rng = np.random.default_rng(5)
    levels = {j: 0.0082 * j - 0.00025 for j in (1, 2, 3, 4)}
    fit = StepFit(base_s=0.03, per_seq_s=0.0, min_samples=5)
    for i in range(120):
        gaps = GapTally()
        for j, tau in levels.items():
            for _ in range(12):
                gaps.add(tau + float(rng.normal(0, 0.0004)), 1, j)
        fit.update(prompt_tokens=0, tokens=49, service_s=1.0, mean_in_service=2.5, gaps=gaps, now=float(i))
    j = np.array([1.0, 2.0, 3.0, 4.0])
    tau = np.array(list(levels.values()))
    assert np.polyfit(j, tau, 1)[1] < -0.0002  # the unconstrained line's intercept
    est = fit.get()
    assert est.fitted and est.base_s == 0.0
    assert est.per_seq_s == pytest.approx(float(j @ tau / (j @ j)), rel=0.01)


def test_a_rare_occupancy_seen_in_a_few_noisy_gaps_does_not_swing_the_fit() -> None:
    """Occupancies 1-3 seen in thousands of gaps, 4 in six gaps that a prompt's prefill
    stretched: the level of 4 waits until its mean is known (it swung the line's intercept
    and threw the fit out of use), and the fit is that of 1-3."""
    rng = np.random.default_rng(6)
    fit = StepFit(base_s=0.03, per_seq_s=0.0, min_samples=5)
    for i in range(60):
        gaps = GapTally()
        for j in (1, 2, 3):
            for _ in range(20):
                gaps.add(A + B * j + float(rng.normal(0, 0.0003)), 1, j)
        fit.update(prompt_tokens=0, tokens=61, service_s=1.0, mean_in_service=2.0, gaps=gaps, now=float(i))
    assert fit.get().fitted
    gaps = GapTally()
    for k in range(6):
        gaps.add(A + 4 * B + (0.0 if k % 2 else 0.05), 1, 4)
    fit.update(prompt_tokens=0, tokens=7, service_s=1.0, mean_in_service=4.0, gaps=gaps, now=60.0)
    est = fit.get()
    assert est.fitted
    assert est.step_time(1) == pytest.approx(A + B, rel=0.02) and est.per_seq_s == pytest.approx(B, rel=0.05)


def test_gaps_at_one_occupancy_never_make_a_fit_however_small_the_jitter() -> None:
    """Every gap at one occupancy with a microsecond of jitter: the information on (a, b) is
    singular, so the fit does not count (it was declared fitted on its tiny residuals)."""
    rng = np.random.default_rng(8)
    fit = StepFit(base_s=0.02, per_seq_s=0.01, min_samples=5)
    for i in range(100):
        gaps = GapTally()
        for _ in range(40):
            gaps.add(A + B + float(rng.normal(0, 1e-6)), 1, 1)
        fit.update(prompt_tokens=0, tokens=41, service_s=1.0, mean_in_service=1.0, gaps=gaps, now=float(i))
    est = fit.get()
    assert est.step_time(1) == pytest.approx(A + B, rel=1e-3) and not est.fitted


def test_an_unidentified_intercept_is_not_a_fit() -> None:
    """Occupancies 3 and 4 only, 100 gaps with 5 ms of jitter: tau(3.5) is pinned down but the
    intercept's standard error is a large share of tau(1), so the fit does not count."""
    rng = np.random.default_rng(9)
    fit = StepFit(base_s=0.02, per_seq_s=0.01, min_samples=5)
    for i in range(10):
        gaps = GapTally()
        for _ in range(10):
            j = int(rng.integers(3, 5))
            gaps.add(A + B * j + float(rng.normal(0, 0.005)), 1, j)
        fit.update(prompt_tokens=0, tokens=41, service_s=1.0, mean_in_service=3.5, gaps=gaps, now=float(i))
    est = fit.get()
    assert est.base_stderr_s > 0.1 * est.step_time(1) and not est.fitted
    assert abs(est.step_time(3.5) - (A + 3.5 * B)) < 0.1 * (A + 3.5 * B)


def test_forgetting_follows_a_slower_engine() -> None:
    """With forgetting, the fit follows an engine that became twice as slow."""
    rng = np.random.default_rng(4)
    fit = StepFit(forgetting=0.98)
    for i in range(200):
        _streamed(fit, rng, float(i))
    gaps_scale = 2.0
    for i in range(200, 600):
        gaps = GapTally()
        for _ in range(40):
            j = int(rng.integers(1, 5))
            gaps.add(gaps_scale * (A + B * j), 1, j)
        fit.update(prompt_tokens=0, tokens=41, service_s=1.0, mean_in_service=2.0, gaps=gaps, now=float(i))
    est = fit.get()
    assert est.base_s == pytest.approx(2 * A, rel=0.02) and est.per_seq_s == pytest.approx(2 * B, rel=0.02)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt_tokens", -1),
        ("tokens", float("nan")),
        ("service_s", True),
        ("mean_in_service", float("inf")),
        ("first_token_s", -0.1),
        ("first_token_in_service", 0.5),
    ],
)
def test_bad_observations_are_refused_and_change_nothing(field: str, value: object) -> None:
    """A bad observation is refused, naming the field, and leaves the fit as it was."""
    fit = StepFit(base_s=0.02, per_seq_s=0.01)
    _whole(fit, np.random.default_rng(5), 0.0)
    before = fit.get()
    row = {"prompt_tokens": 10, "tokens": 10, "service_s": 0.5, "mean_in_service": 1.0, "now": 1.0, field: value}
    with pytest.raises(ValueError, match=field):
        fit.update(**row)  # type: ignore[arg-type]
    assert fit.get() == before and fit.count == 1


def test_bad_settings_are_refused() -> None:
    """A negative step, a forgetting factor of 0 and min_samples of 0 are refused."""
    with pytest.raises(ValueError, match="base_s"):
        StepFit(base_s=-1.0)
    with pytest.raises(ValueError, match="forgetting"):
        StepFit(forgetting=0.0)
    with pytest.raises(ValueError, match="min_samples"):
        StepFit(min_samples=0)


def test_gaps_rescaled_to_the_tokens_the_usage_reports() -> None:
    """A server that sends 16 tokens per event: each gap is 16 steps while one event is counted.
    Rescaled by the tokens the usage reports over the events counted, the fit reads the step."""
    rng = np.random.default_rng(11)
    fit = StepFit(min_samples=5)
    for i in range(40):
        gaps = GapTally()
        for _ in range(30):
            j = int(rng.integers(1, 5))
            gaps.add(16 * (A + B * j), 1, j)  # one event counted, sixteen steps taken
        assert gaps.tokens == 30
        gaps.rescale(16 * 31 / 31)  # the usage says 16 tokens for each of the 31 events
        fit.update(prompt_tokens=0, tokens=16 * 31, service_s=1.0, mean_in_service=2.5, gaps=gaps, now=float(i))
    est = fit.get()
    assert (est.base_s, est.per_seq_s) == pytest.approx((A, B), rel=1e-9)
