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


# ---------------------------------------------------------------------------------------------------------------------
# One interval per gap: seeds and validation documents together


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (any df > 0), by bisection on t_cdf to 1e-9."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > p:
        low *= 2.0
    while t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-9 * max(1.0, abs(high)):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def two_sided_p(estimate: float, se: float, df: float) -> float:
    """The two-sided p-value of estimate / se under Student's t with `df` degrees of freedom."""
    if se <= 0:
        return 0.0 if estimate != 0 else 1.0
    return 2.0 * (1.0 - t_cdf(abs(estimate) / se, df))


def ratio_variance(sums_N: Sequence[float], tokens_N: Sequence[float]) -> float:
    """The sampling variance of a token-weighted mean sum(sums) / sum(tokens) over N documents drawn from a larger
    population of documents: the delete-one jackknife. (The linearization estimator ran 1-5 points below its nominal
    coverage at 8-17 documents of very unequal lengths in simulation; tests/unit/test_experiment_stats.py.) 0 for fewer than
    2 documents."""
    sums, tokens = np.asarray(sums_N, dtype=np.float64), np.asarray(tokens_N, dtype=np.float64)
    n = len(sums)
    if n < 2:
        return 0.0
    left_out = (sums.sum() - sums) / (tokens.sum() - tokens)
    return float((n - 1) / n * np.sum((left_out - left_out.mean()) ** 2))


def effective_documents(tokens_N: Sequence[float]) -> float:
    """Kish's effective sample size of a token-weighted mean: (sum t)^2 / sum t^2 (N for documents of equal length,
    fewer where a few long documents carry most tokens)."""
    tokens = np.asarray(tokens_N, dtype=np.float64)
    return float(tokens.sum() ** 2 / np.sum(tokens**2)) if len(tokens) else 0.0


def document_error(doc_sums: Mapping[str, Sequence[float]], doc_tokens: Mapping[str, Sequence[float]],
                   weights: Mapping[str, float]) -> tuple[float, float]:
    """(standard error, degrees of freedom) over validation documents of a weighted mean over domains of per-domain
    token-weighted means (of losses, or of per-document gaps of loss sums). Domains are independent samples: their
    jackknife variances add with the squared weights; each domain brings its effective number of documents less one
    degrees of freedom, combined by Welch-Satterthwaite."""
    total = sum(weights[d] for d in doc_sums)
    parts = {d: (weights[d] / total) ** 2 * ratio_variance(doc_sums[d], doc_tokens[d]) for d in doc_sums}
    variance = sum(parts.values())
    if variance <= 0:
        return 0.0, math.inf
    denominator = sum(part**2 / max(effective_documents(doc_tokens[d]) - 1, 1.0) for d, part in parts.items())
    return math.sqrt(variance), variance**2 / denominator


def gap_interval(per_seed: Sequence[float], doc_se: float = 0.0, doc_df: float = math.inf) -> dict:
    """One 95% interval for a gap (or any mean over seeds of values measured on one shared validation set): the mean
    over seeds, with standard error sqrt(se_seed^2 + se_doc^2), where se_seed is the spread of the per-seed values
    (training randomness; sd / sqrt(seeds)) and se_doc the validation documents' sampling error (`document_error`,
    shared by every seed, so the seeds' spread cannot show it), and a Student-t quantile with Welch-Satterthwaite's
    degrees of freedom. With one seed se_seed is unknown: the interval then holds the document error only and is
    marked provisional. Also the two-sided p-value of the mean (for a family's Holm correction)."""
    values = np.asarray(per_seed, dtype=np.float64)
    n = len(values)
    mean = float(values.mean())
    se_seed = float(values.std(ddof=1)) / math.sqrt(n) if n >= 2 else 0.0
    variance = se_seed**2 + doc_se**2
    out = {"mean": mean, "n": n, "se_seed": se_seed if n >= 2 else None, "se_doc": doc_se, "provisional": n < 2}
    if variance <= 0:
        return {**out, "low": None, "high": None, "se": 0.0, "df": None, "p": None}
    seed_term = se_seed**4 / (n - 1) if n >= 2 else 0.0
    doc_term = doc_se**4 / doc_df if math.isfinite(doc_df) else 0.0
    df = variance**2 / (seed_term + doc_term) if seed_term + doc_term > 0 else math.inf
    df = min(df, 1e6)
    se = math.sqrt(variance)
    half = t_quantile(0.5 + CONFIDENCE / 2, df) * se
    return {**out, "low": mean - half, "high": mean + half, "se": se, "df": df, "p": two_sided_p(mean, se, df)}


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family's p-values (controls the family-wise error rate at the level the
    adjusted values are compared with): sorted ascending, the i-th (0-based) of m is multiplied by m - i, and the
    adjusted values are made non-decreasing in that order and capped at 1."""
    order = sorted(pvalues, key=pvalues.get)
    m, running, adjusted = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def call(interval: Mapping, *, p_adjusted: float | None = None) -> str:
    """ahead (below zero), behind (above zero) or level, from one interval; with `p_adjusted` (a primary comparison
    under Holm's correction) the adjusted p-value must also lie below 1 - CONFIDENCE."""
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return "level"
    if p_adjusted is not None and p_adjusted >= 1 - CONFIDENCE:
        return "level"
    if high < 0:
        return "ahead"
    if low > 0:
        return "behind"
    return "level"


def interpolate_log(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """y at x on the curve through (xs, ys), piecewise linear in log x (xs positive and increasing); None outside
    [xs[0], xs[-1]]. Loss curves are close to straight in log tokens (and log FLOPs) and convex in tokens, so a straight
    line in tokens between budgets 2x apart lies above the curve and flatters whichever arm is read off it."""
    if not xs or x < xs[0] or x > xs[-1] or xs[0] <= 0:
        return None
    return float(np.interp(math.log(x), [math.log(v) for v in xs], ys))
