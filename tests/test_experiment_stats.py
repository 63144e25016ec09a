"""The report's statistics (upcycle.experiment_stats): the bootstrap interval over documents covers a known
difference at about its nominal rate, the t quantiles, the verdict, crossings and interpolation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from upcycle import experiment_stats as stats


def test_the_paired_document_bootstrap_covers_a_known_difference_at_about_95_percent():
    """Synthetic scores: two models on 300 documents of 20..200 tokens, the second worse by exactly 0.05 nats per
    token plus per-token noise (shared document difficulty cancels in the pair). Over 400 independent validation
    sets, the 95% interval should contain 0.05 about 95% of the time; with 400 trials the binomial standard error is
    1.1 points, so [0.91, 0.99] allows ~3.5 of them either way."""
    rng = np.random.default_rng(1234)
    true_gap, trials, docs = 0.05, 400, 300
    covered = 0
    for trial in range(trials):
        tokens = rng.integers(20, 201, size=docs).astype(np.float64)
        difficulty = rng.normal(3.0, 0.5, size=docs)  # per document, the same for both models
        base = tokens * difficulty + rng.normal(0, 1.0, size=docs) * np.sqrt(tokens)
        other = tokens * (difficulty + true_gap) + rng.normal(0, 1.0, size=docs) * np.sqrt(tokens)
        counts = stats.bootstrap_counts({"d": docs}, 400, seed=trial)["d"]
        samples = stats.domain_estimates(counts, (other - base)[:, None], tokens)[:, 0]
        low, high = stats.percentile_interval(samples)
        covered += low <= true_gap <= high
    assert 0.91 <= covered / trials <= 0.99, covered / trials


def test_bootstrap_estimates_are_token_weighted_means_of_the_resampled_documents():
    sums = np.array([10.0, 40.0, 5.0])
    tokens = np.array([10.0, 20.0, 5.0])
    counts = np.array([[1, 1, 1], [3, 0, 0], [0, 2, 1]], dtype=np.float32)
    got = stats.domain_estimates(counts, sums[:, None], tokens)[:, 0]
    assert got == pytest.approx([55 / 35, 1.0, 85 / 45])


def test_t_quantiles_match_the_students_t_distribution():
    assert stats.t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert stats.t_quantile_975(2) == pytest.approx(4.3027, abs=1e-4)
    assert stats.t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-3)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 29, 30, 31, 40, 100):
        assert stats.t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-4), df


def test_seed_interval_is_the_students_t_interval_and_absent_for_one_seed():
    got = stats.seed_interval([1.0, 2.0, 3.0])
    half = 4.3027 * 1.0 / math.sqrt(3)
    assert (got["mean"], got["low"], got["high"], got["n"]) == pytest.approx((2.0, 2.0 - half, 2.0 + half, 3))
    assert stats.seed_interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 1}


@pytest.mark.parametrize("intervals, expected", [
    ([(-0.3, -0.1), (-0.2, -0.01)], "ahead"),
    ([(0.1, 0.3), (0.05, 0.2)], "behind"),
    ([(-0.3, 0.1), (-0.2, -0.01)], "level"),  # one interval includes zero
    ([(-0.3, -0.1), (0.01, 0.2)], "level"),  # the intervals disagree
    ([(None, None), (-0.2, -0.01)], "ahead"),  # one seed: only the bootstrap interval
    ([(None, None)], "level"),
])
def test_an_arm_is_ahead_or_behind_only_where_every_interval_excludes_zero(intervals, expected):
    assert stats.verdict(intervals) == expected


def test_crossing_and_interpolation():
    assert stats.crossing([(0, 2.0), (100, 0.5), (200, -0.5)]) == 150
    assert stats.crossing([(0, 2.0), (100, 0.5)]) is None
    assert stats.crossing([(0, -1e-7), (100, -0.5)]) is None  # never behind: no crossing
    assert stats.crossing([(0, 1e-7), (100, -0.5)]) is None  # naive against its dense parent: no gap at the start
    assert stats.crossing([(0, -0.1), (100, 0.2), (200, -0.2)]) == 150
    assert stats.interpolate([0, 10, 20], [1.0, 2.0, 4.0], 15) == pytest.approx(3.0)
    assert stats.interpolate([0, 10], [1.0, 2.0], 11) is None
