"""The statistics of the report, from scipy.stats wherever scipy has them.

Attribute vs null control (same seeds, so paired):
- exact one-sided McNemar test: on the seeds where both finished, a binomial test of the
  discordant pairs (attribute flipped, null did not) against (null flipped, attribute did not);
- Benjamini-Hochberg q-values across the attributes of one run.

Intervals: Wilson score interval for a flip rate; Clopper-Pearson (exact) bounds for the gate.

`zoom compare`: paired by seed when both runs drew the same seeds (exact two-sided McNemar and
Newcombe's paired score interval for the difference), otherwise unpaired (two-sided Fisher exact
test and Newcombe's hybrid score interval).

`zoom check`: an intersection-union test per attribute (rate > R *and* > null), Holm across the
checked attributes.

The pooled null row (K twins per seed, which share the seed's image and are not independent):
the seed is the unit. Its interval is Korn and Graubard's: Clopper-Pearson at the effective
sample size (the number of items over the design effect measured between seeds, shrunk for the
seeds' degrees of freedom). `zoom compare` tests two runs' null rows with a permutation test of the
per-seed flip shares.

Strength to flip: Kaplan-Meier quantiles with unflipped seeds right-censored (scipy.stats.ecdf).
"""

from __future__ import annotations

import functools
import math

from scipy import stats

NAN = float("nan")


@functools.lru_cache(maxsize=65536)  # scipy computes a p-value on the way; counts repeat across a report
def wilson_interval(flips: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    if n == 0:
        return NAN, NAN
    ci = stats.binomtest(flips, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def exact_lower_bound(flips: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound: the rate is above it with the given confidence."""
    if n == 0:
        return NAN
    return float(stats.binomtest(flips, n).proportion_ci(confidence_level=2 * confidence - 1, method="exact").low)


@functools.lru_cache(maxsize=65536)
def rate_above_p(flips: int, n: int, rate: float) -> float:
    """Exact one-sided p-value for H1: the true flip rate exceeds `rate` (binomial test)."""
    if n == 0:
        return NAN
    if rate >= 1.0:
        return 1.0
    return float(stats.binomtest(flips, n, rate, alternative="greater").pvalue)


@functools.lru_cache(maxsize=65536)
def mcnemar_greater_p(attribute_only: int, null_only: int) -> float:
    """Exact one-sided McNemar test for H1: the attribute flips a seed more often than the null does.

    Only discordant seeds carry information; under H0 each is the attribute's with probability 1/2.
    No discordant seed: p = 1. Valid whatever the correlation between the two arms on a seed
    (including the negative correlation of a joint search, where at most one arm is credited).
    """
    m = attribute_only + null_only
    if m == 0:
        return 1.0
    return float(stats.binomtest(attribute_only, m, 0.5, alternative="greater").pvalue)


def mcnemar_two_sided_p(only_1: int, only_2: int) -> float:
    """Exact two-sided McNemar test of equal rates on paired seeds (same as statsmodels' exact mcnemar)."""
    m = only_1 + only_2
    if m == 0:
        return 1.0
    return float(stats.binomtest(only_1, m, 0.5, alternative="two-sided").pvalue)


def bh_qvalues(pvalues: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values; NaN (untestable) entries stay NaN and are not counted."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    q = [NAN] * len(pvalues)
    if idx:
        adjusted = stats.false_discovery_control([pvalues[i] for i in idx], method="bh")
        for i, v in zip(idx, adjusted):
            q[i] = float(v)
    return q


def holm_adjusted(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control; scipy has no Holm).
    NaN entries stay NaN and are not counted in the family."""
    idx = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m, running = len(idx), 0.0
    out = [NAN] * len(pvalues)
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def difference_interval(flips_1: int, n_1: int, flips_2: int, n_2: int,
                        confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p1 - p2, independent samples (method 10 of Newcombe 1998).

    [d - sqrt((p1 - l1)^2 + (u2 - p2)^2), d + sqrt((u1 - p1)^2 + (p2 - l2)^2)], d = p1 - p2, with
    (l_i, u_i) the Wilson intervals. It stays inside [-1, 1] and behaves well at 0 and n flips.
    """
    if n_1 == 0 or n_2 == 0:
        return NAN, NAN
    return _newcombe(flips_1 / n_1, flips_2 / n_2, wilson_interval(flips_1, n_1, confidence),
                     wilson_interval(flips_2, n_2, confidence), 0.0)


def paired_difference_interval(both: int, only_1: int, only_2: int, neither: int,
                               confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's score interval for p1 - p2 from paired data (method 10 of Newcombe 1998b, as in
    Altman et al., Statistics with Confidence): the hybrid interval with the two Wilson intervals
    combined through the phi correlation of the 2x2 table (AD - BC shrunk by n/2 when positive),
    so a positive correlation between the pairs narrows it."""
    n = both + only_1 + only_2 + neither
    if n == 0:
        return NAN, NAN
    k1, k2 = both + only_1, both + only_2
    denominator = k1 * (n - k1) * k2 * (n - k2)
    cross = both * neither - only_1 * only_2
    cross = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = cross / math.sqrt(denominator) if denominator > 0 else 0.0
    return _newcombe(k1 / n, k2 / n, wilson_interval(k1, n, confidence), wilson_interval(k2, n, confidence), phi)


def _newcombe(p1, p2, ci1, ci2, phi) -> tuple[float, float]:
    (l1, u1), (l2, u2) = ci1, ci2
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)


def two_sided_exact_p(flips_1: int, n_1: int, flips_2: int, n_2: int) -> float:
    """Two-sided Fisher exact p-value for H0: both flip rates are equal (independent samples)."""
    if n_1 == 0 or n_2 == 0:
        return NAN
    table = [[flips_1, n_1 - flips_1], [flips_2, n_2 - flips_2]]
    return float(stats.fisher_exact(table, alternative="two-sided").pvalue)


def clustered_rate_interval(flips_per_seed: list[int], items_per_seed: list[int],
                            confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, high, effective n) for the pooled flip rate of items clustered in seeds (Korn & Graubard
    1998): the variance of the ratio estimate between seeds gives a design effect, clamped to
    [1, largest cluster], with which n items count as n / deff; that effective n is shrunk by (z / t)^2
    with t on seeds - 1 degrees of freedom, and the interval is Clopper-Pearson's at it (beta quantiles,
    which take non-integer counts). With no flip (or all) the design effect cannot be measured and the
    largest one is used, so the interval is as wide as if each seed counted once."""
    seeds = len(flips_per_seed)
    total = float(sum(items_per_seed))
    if seeds == 0 or total == 0:
        return NAN, NAN, 0.0
    rate = sum(flips_per_seed) / total
    largest = float(max(items_per_seed))
    if 0.0 < rate < 1.0 and seeds > 1:
        between = seeds / (seeds - 1) * sum((f - rate * m) ** 2 for f, m in zip(flips_per_seed, items_per_seed))
        deff = min(max(between / total ** 2 / (rate * (1 - rate) / total), 1.0), largest)
    else:
        deff = largest
    alpha = 1 - confidence
    shrink = (stats.norm.ppf(1 - alpha / 2) / stats.t.ppf(1 - alpha / 2, seeds - 1)) ** 2 if seeds > 1 else 1.0
    n = total / deff * shrink
    k = rate * n
    low = 0.0 if k <= 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high, n


def seed_permutation_p(shares_1: list[float], shares_2: list[float], paired: bool) -> float:
    """Two-sided permutation p-value for equal mean per-seed flip shares: seeds exchanged between the
    runs (independent) or each seed's two shares swapped (paired, same seeds in the same order).
    9999 resamples from a fixed generator, so a report is reproducible."""
    import numpy as np

    if not shares_1 or not shares_2:
        return NAN
    if len(set(shares_1) | set(shares_2)) == 1:
        return 1.0
    result = stats.permutation_test(
        (np.asarray(shares_1, float), np.asarray(shares_2, float)),
        lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis), vectorized=True,
        permutation_type="samples" if paired else "independent", n_resamples=9999, alternative="two-sided",
        rng=np.random.default_rng(0))
    return float(result.pvalue)


def interval_difference(rate_1: float, ci_1: tuple, rate_2: float, ci_2: tuple) -> tuple[float, float]:
    """Newcombe's square-and-add combination of two rates' own intervals into one for rate_1 - rate_2
    (independent; for paired rates it is conservative)."""
    return _newcombe(rate_1, rate_2, ci_1, ci_2, 0.0)


def censored_quantiles(flipped: list[float], censored: list[float], probs=(0.25, 0.5, 0.75)) -> list[float | None]:
    """Kaplan-Meier quantiles of the strength to flip: `flipped` are strengths at which seeds flipped,
    `censored` the strengths unflipped seeds reached without flipping (right-censored). A quantile the
    estimate never passes (too few flips) is None: "more than the search reached". Where the estimate
    sits exactly at q over an interval (a plateau), the quantile is that interval's midpoint, as the
    sample median of 1, 2, 3, 4 is 2.5."""
    if not flipped:
        return [None] * len(probs)
    result = stats.ecdf(stats.CensoredData(uncensored=list(flipped), right=list(censored)))
    xs, cdf = result.cdf.quantiles, result.cdf.probabilities
    out = []
    for q in probs:
        above = [i for i, p in enumerate(cdf) if p > q + 1e-12]  # smallest t with F(t) > q
        if not above:
            out.append(None)
            continue
        i = above[0]
        plateau = i > 0 and abs(cdf[i - 1] - q) <= 1e-12
        out.append(float((xs[i - 1] + xs[i]) / 2) if plateau else float(xs[i]))
    return out
