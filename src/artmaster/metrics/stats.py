"""Statistics for small sets of paintings: unbiased KID/MMD, bootstrap intervals, paired effects
clustered by prompt over training replicates, and ROC AUC.

With ~20 reference works FID is meaningless; the unbiased MMD^2 estimate with a polynomial kernel
(KID) is fine at any size, and its bootstrap keeps the estimate's U-statistic form (pairs of the
same original sample are left out), so equal distributions give intervals around 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided bootstrap percentile interval."""

    value: float
    low: float
    high: float
    confidence: float

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "confidence": self.confidence}


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
    """Mean of `values` with a bootstrap percentile interval (scipy.stats.bootstrap)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("cannot average an empty set of values")
    if len(values) == 1 or np.ptp(values) == 0:
        return Interval(float(values.mean()), float(values.mean()), float(values.mean()), confidence)
    result = scipy_stats.bootstrap((values,), np.mean, n_resamples=bootstrap, confidence_level=confidence,
                                   method="percentile", random_state=np.random.default_rng(seed))
    interval = result.confidence_interval
    return Interval(float(values.mean()), float(interval.low), float(interval.high), confidence)


@dataclass(frozen=True)
class PairedEffect:
    """How much model A's per-image scores exceed model B's on the same prompts and seeds, over
    training replicates: the mean difference, a crossed bootstrap interval (prompts and replicates
    resampled) and a prompt-level sign-flip permutation p-value."""

    mean_difference: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float
    permutations: int
    exact: bool
    prompts: int
    replicates: int
    pairs: int
    per_replicate: tuple[float, ...]

    @property
    def replicates_agreeing(self) -> int:
        """How many replicates' own mean difference has the sign of the overall one."""
        return int(sum(np.sign(d) == np.sign(self.mean_difference) for d in self.per_replicate))

    def significant(self, alpha: float) -> bool:
        return bool(self.p_value < alpha)

    def as_dict(self, alpha: float) -> dict:
        return {"mean_difference": self.mean_difference, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "confidence": self.confidence, "p_value": self.p_value, "permutations": self.permutations,
                "exact": self.exact, "significant": self.significant(alpha), "prompts": self.prompts,
                "replicates": self.replicates, "pairs": self.pairs, "per_replicate": list(self.per_replicate),
                "replicates_agreeing": self.replicates_agreeing}


def clustered_mean(values: np.ndarray, bootstrap: int, confidence: float, seed: int) -> Interval:
    """Mean of `values` (replicates, prompts, seeds) with a crossed bootstrap percentile interval:
    prompts and replicates resampled independently (images of one prompt, or of one training
    replicate, are not independent; scipy.stats.bootstrap resamples one level only)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 3 or 0 in values.shape:
        raise ValueError(f"values must be (replicates, prompts, seeds), got shape {values.shape}")
    cell = values.mean(axis=2)
    replicates, prompts = cell.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, replicates, size=(bootstrap, replicates))
    cols = rng.integers(0, prompts, size=(bootstrap, prompts))
    estimates = np.array([cell[np.ix_(r, c)].mean() for r, c in zip(rows, cols)])
    return _percentile_interval(float(cell.mean()), estimates, confidence)


def clustered_auc(positive: np.ndarray, positive_groups: np.ndarray, negative: np.ndarray,
                  negative_groups: np.ndarray, bootstrap: int, confidence: float, seed: int) -> Interval:
    """AUC of positive over negative scores with a bootstrap interval that resamples whole groups
    (the painter's scans, the prompts) on each side."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    positive_groups, negative_groups = np.asarray(positive_groups), np.asarray(negative_groups)
    value = roc_auc(positive, negative)
    rng = np.random.default_rng(seed)
    members = [[np.flatnonzero(groups == g) for g in np.unique(groups)] for groups in (positive_groups, negative_groups)]
    estimates = []
    for _ in range(bootstrap):
        drawn = [np.concatenate([side[i] for i in rng.integers(0, len(side), len(side))]) for side in members]
        estimates.append(roc_auc(positive[drawn[0]], negative[drawn[1]]))
    return _percentile_interval(value, np.array(estimates), confidence)


def paired_effect(difference: np.ndarray, bootstrap: int, confidence: float, permutations: int,
                  seed: int) -> PairedEffect:
    """`difference` (replicates, prompts, seeds): score of A minus score of B per image pair.

    Images of one prompt are not independent (nor are a replicate's), so inference treats the
    prompts as the independent units: the p-value flips the sign of whole prompts (scipy's
    permutation_test, exact when 2^prompts <= `permutations`), and the interval resamples prompts
    and replicates independently (a crossed bootstrap, which scipy.stats.bootstrap does not do)."""
    difference = np.asarray(difference, dtype=np.float64)
    if difference.ndim != 3 or 0 in difference.shape:
        raise ValueError(f"paired differences must be (replicates, prompts, seeds), got shape {difference.shape}")
    replicates, prompts, _ = difference.shape
    cell = difference.mean(axis=2)  # (replicates, prompts)
    mean = float(cell.mean())
    interval = clustered_mean(difference, bootstrap, confidence, seed)
    prompt_means = cell.mean(axis=0)
    if prompts < 2:  # nothing to permute: no evidence either way
        p_value, draws, exact = 1.0, 1, True
    else:
        exact = 2**prompts <= permutations
        test = scipy_stats.permutation_test((prompt_means,), lambda x, axis: np.mean(x, axis=axis),
                                            permutation_type="samples", alternative="two-sided",
                                            n_resamples=np.inf if exact else permutations,
                                            random_state=np.random.default_rng(seed))
        p_value, draws = float(test.pvalue), len(test.null_distribution)
    return PairedEffect(mean, interval.low, interval.high, confidence, p_value, draws, exact, prompts, replicates,
                        int(difference.size), tuple(float(v) for v in cell.mean(axis=1)))


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    # the Mann-Whitney U statistic over its maximum: the same number as the area under the ROC
    # curve, and fast enough for a few thousand bootstrap draws
    ranks = scipy_stats.rankdata(np.r_[positive, negative])
    count = len(positive)
    return float((ranks[:count].sum() - count * (count + 1) / 2) / (count * len(negative)))
