"""Statistics for small sets of paintings: unbiased KID/MMD, bootstrap intervals, paired
permutation tests, leave-one-out retrieval and ROC AUC.

With ~20 reference works FID is meaningless; the unbiased MMD^2 estimate with a polynomial kernel
(KID) is fine at any size, and its bootstrap keeps the estimate's U-statistic form (pairs of the
same original sample are left out), so equal distributions give intervals around 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist
from scipy.stats import rankdata


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided bootstrap percentile interval."""

    value: float
    low: float
    high: float
    confidence: float

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "confidence": self.confidence}


@dataclass(frozen=True)
class PermutationTest:
    mean_difference: float
    p_value: float
    permutations: int
    exact: bool

    def as_dict(self) -> dict:
        return {
            "mean_difference": self.mean_difference,
            "p_value": self.p_value,
            "permutations": self.permutations,
            "exact": self.exact,
        }


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (gamma * (x @ y.T) + coef0) ** degree


def _resample_counts(rng: np.random.Generator, size: int, draws: int) -> np.ndarray:
    """(draws, size) how often each sample appears in each bootstrap resample."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=draws).astype(np.float64)


def _within_mean(kernel: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean kernel value over pairs of distinct original samples, per resample (U-statistic);
    NaN for a resample that drew a single sample only (no pair: skipped by the percentiles).
    Its pair sum is a float difference of large equal terms, not exactly 0, so dividing would
    give +-inf and wreck the interval; small sets (a few references) draw such resamples."""
    diagonal = np.diag(kernel)
    pair_sum = np.einsum("bi,ij,bj->b", counts, kernel, counts) - (counts**2) @ diagonal
    pair_count = counts.sum(1) ** 2 - (counts**2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pair_count > 0, pair_sum / pair_count, np.nan)


def kernel_mmd2(
    x: np.ndarray,
    y: np.ndarray,
    degree: int,
    gamma: float,
    coef0: float,
    bootstrap: int,
    confidence: float,
    seed: int,
) -> Interval:
    """Unbiased MMD^2 between samples x (n, d) and y (m, d) with a polynomial kernel (KID),
    with a bootstrap percentile interval (both sets resampled)."""
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {n} and {m}")
    kxx = polynomial_kernel(x, x, degree, gamma, coef0)
    kyy = polynomial_kernel(y, y, degree, gamma, coef0)
    kxy = polynomial_kernel(x, y, degree, gamma, coef0)
    ones_x, ones_y = np.ones((1, n)), np.ones((1, m))
    value = float(_within_mean(kxx, ones_x)[0] + _within_mean(kyy, ones_y)[0] - 2 * kxy.mean())
    rng = np.random.default_rng(seed)
    counts_x, counts_y = _resample_counts(rng, n, bootstrap), _resample_counts(rng, m, bootstrap)
    cross = np.einsum("bi,ij,bj->b", counts_x, kxy, counts_y) / (n * m)
    estimates = _within_mean(kxx, counts_x) + _within_mean(kyy, counts_y) - 2 * cross
    return _percentile_interval(value, estimates, confidence)


def _percentile_interval(value: float, estimates: np.ndarray, confidence: float) -> Interval:
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(estimates, [tail, 100 - tail])
    return Interval(value=float(value), low=float(low), high=float(high), confidence=confidence)


def bootstrap_mean(values: np.ndarray, bootstrap: int, confidence: float, seed: int) -> Interval:
    """Mean of `values` with a bootstrap percentile interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("cannot average an empty set of values")
    counts = _resample_counts(np.random.default_rng(seed), len(values), bootstrap)
    return _percentile_interval(values.mean(), counts @ values / len(values), confidence)


def paired_permutation_test(a: np.ndarray, b: np.ndarray, permutations: int, seed: int) -> PermutationTest:
    """Two-sided test that paired scores a[i], b[i] (same prompt and seed) share one mean.

    Under the null each pair's difference is equally likely to have either sign. When 2^n sign
    patterns fit in `permutations` they are all enumerated (exact p-value); otherwise random
    patterns are drawn and p = (1 + hits) / (1 + draws), never 0."""
    difference = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if difference.ndim != 1 or len(difference) == 0:
        raise ValueError(f"paired test needs two equal-length 1-D score lists, got shapes {np.shape(a)} and {np.shape(b)}")
    n = len(difference)
    observed = abs(difference.mean())
    # Treat ties within rounding as "at least as extreme", so p never drops from float noise.
    tolerance = 1e-12 * max(1.0, float(np.abs(difference).max()))
    if 2**n <= permutations:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        hits = int((np.abs(signs @ difference / n) >= observed - tolerance).sum())
        return PermutationTest(float(difference.mean()), hits / len(signs), len(signs), exact=True)
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(permutations, n))
    hits = int((np.abs(signs @ difference / n) >= observed - tolerance).sum())
    return PermutationTest(float(difference.mean()), (1 + hits) / (1 + permutations), permutations, exact=False)


def leave_one_out_nearest(embedding: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row (Euclidean)."""
    if len(embedding) < 2:
        raise ValueError("leave-one-out retrieval needs at least 2 samples")
    distance = cdist(embedding, embedding)
    np.fill_diagonal(distance, np.inf)
    return distance.argmin(axis=1)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half
    (the Mann-Whitney form of the area under the ROC curve)."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    ranks = rankdata(np.concatenate([positive, negative]))
    rank_sum = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(rank_sum / (len(positive) * len(negative)))
