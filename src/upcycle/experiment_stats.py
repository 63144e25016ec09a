"""The statistics of `upcycle experiment`'s report, as pure functions (numpy only): intervals across seeds, the paired
bootstrap over validation documents, the verdict drawn from them, and the derived numbers (crossing points, tokens to
reach a loss, values at equal FLOPs).

Two sources of uncertainty, and one interval for each:
- across seeds (training randomness: data order, upcycling draws, router and from-scratch init), a Student-t interval
  of the per-seed values; gaps to naive are paired by seed (each seed's arm minus the same seed's naive);
- over validation documents (the finite validation set, shared by every arm and seed, so the seeds' spread does not
  show it), a paired percentile bootstrap: documents are resampled with replacement within each domain, the same
  resample for every arm and seed, and the gap is recomputed from the resampled documents' summed losses and tokens.
An arm is called ahead of (behind) naive only where every interval it has lies below (above) zero; otherwise "level".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
# Student t quantiles t_{0.975, df}, df = 1..30 (beyond, the Cornish-Fisher expansion below is within 1e-4).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (two-sided 95% intervals)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def seed_interval(values: Sequence[float]) -> dict:
    """Mean of per-seed values and its 95% Student-t interval ({"mean", "low", "high", "n"}; low and high None with
    fewer than 2 seeds)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = t_quantile_975(n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def bootstrap_counts(doc_counts: Mapping[str, int], resamples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per domain, (resamples, documents) multiplicities of one paired bootstrap: each row resamples the domain's
    documents with replacement. One draw for the whole report, so every gap is resampled alike (paired)."""
    rng = np.random.default_rng(seed)
    return {d: rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float32) if n else
            np.zeros((resamples, 0), dtype=np.float32) for d, n in sorted(doc_counts.items())}


def domain_estimates(counts_BN: np.ndarray, sums_NG: np.ndarray, tokens_N: np.ndarray) -> np.ndarray:
    """Token-weighted means under each resample: (B, G) = (counts @ sums) / (counts @ tokens), for G quantities that
    are per-document loss sums (or gaps of them) over the same N documents."""
    numerator_BG = counts_BN @ sums_NG.astype(np.float64)
    tokens_B = counts_BN @ tokens_N.astype(np.float64)
    return numerator_BG / tokens_B[:, None]


def weighted_over_domains(per_domain: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Sum over domains of weight x value (weights normalized over the domains given)."""
    total = sum(weights[d] for d in per_domain)
    return sum(per_domain[d] * (weights[d] / total) for d in per_domain)


def percentile_interval(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The central 95% of bootstrap samples (percentile interval)."""
    tail = (1 - CONFIDENCE) / 2 * 100
    return np.percentile(samples, tail, axis=axis), np.percentile(samples, 100 - tail, axis=axis)


def verdict(intervals: Sequence[tuple[float | None, float | None]]) -> str:
    """ahead where every available interval lies below zero, behind where every one lies above, level otherwise (or
    with no interval at all)."""
    known = [(low, high) for low, high in intervals if low is not None and high is not None]
    if not known:
        return "level"
    if all(high < 0 for _, high in known):
        return "ahead"
    if all(low > 0 for low, _ in known):
        return "behind"
    return "level"


# ---------------------------------------------------------------------------------------------------------------------
# Derived numbers


def training_flops(active_params: int, tokens: int) -> int:
    """Training FLOPs by the usual estimate: 6 x parameters used per token x tokens (forward 2, backward 4)."""
    return 6 * int(active_params) * int(tokens)


def tokens_to_target(curve: Sequence[tuple[float, float]], target: float) -> int | None:
    """Training tokens at which a loss curve first reaches `target` (loss <= target), or None if it never does.

    `curve` is [(tokens, loss)] in increasing tokens. Between the two points around the first crossing the loss is
    interpolated linearly in tokens (the true curve between points is not known).
    """
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return int(tokens)
            t0, l0 = previous
            return int(round(t0 + (tokens - t0) * (l0 - target) / (l0 - loss)))
        previous = (tokens, loss)
    return None


# Gaps within this many nats of zero count as zero: a naive upcycle computes its dense parent's function up to
# floating-point error, so their losses differ by ~1e-7 before training, which is no gap to cross.
GAP_RESOLUTION = 1e-6


def crossing(points: Sequence[tuple[float, float]]) -> int | None:
    """Tokens at which a gap [(tokens, gap)] first falls from above zero to zero or below, interpolated linearly
    between the two points around it; None if a positive gap never does (an arm never behind has no crossing).
    Gaps within GAP_RESOLUTION of zero count as zero."""
    for (t0, g0), (t1, g1) in zip(points, points[1:]):
        if g0 > GAP_RESOLUTION and g1 <= GAP_RESOLUTION:
            return int(round(t0 + (t1 - t0) * g0 / (g0 - g1)))
    return None


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """y at x on the piecewise-linear curve through (xs, ys) (xs increasing); None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def mean_offdiagonal(similarity_EE: np.ndarray) -> float:
    """Mean pairwise cosine similarity between experts: the mean of the off-diagonal entries (1.0 for copies)."""
    similarity_EE = np.asarray(similarity_EE, dtype=np.float64)
    E = similarity_EE.shape[0]
    if E < 2:
        return 1.0
    return float((similarity_EE.sum() - np.trace(similarity_EE)) / (E * (E - 1)))


def mean_or_none(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
