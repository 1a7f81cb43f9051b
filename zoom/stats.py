"""The statistics of the report, all from scipy.stats (nothing hand-rolled).

- Wilson score interval for a flip rate (95% by default);
- one-sided Fisher exact test: is an attribute's flip rate greater than the null control's?
- Benjamini-Hochberg q-values across the attributes of one run;
- for `zoom compare`: Newcombe's hybrid score interval for a difference of two flip rates (built
  from the two scipy Wilson intervals) and a two-sided Fisher exact test of equal flip rates.
"""

from __future__ import annotations

import math

from scipy import stats

NAN = float("nan")


def wilson_interval(flips: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    if n == 0:
        return NAN, NAN
    ci = stats.binomtest(flips, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def greater_than_null_p(flips: int, n: int, null_flips: int, null_n: int) -> float:
    """One-sided exact p-value for H1: attribute flip rate > null flip rate (Fisher's exact test)."""
    if n == 0 or null_n == 0:
        return NAN
    table = [[flips, n - flips], [null_flips, null_n - null_flips]]
    return float(stats.fisher_exact(table, alternative="greater").pvalue)


def bh_qvalues(pvalues: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values; NaN (untestable) entries stay NaN and are not counted."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    q = [NAN] * len(pvalues)
    if idx:
        adjusted = stats.false_discovery_control([pvalues[i] for i in idx], method="bh")
        for i, v in zip(idx, adjusted):
            q[i] = float(v)
    return q


def difference_interval(flips_1: int, n_1: int, flips_2: int, n_2: int,
                        confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p1 - p2 (method 10 of Newcombe 1998).

    It combines the two Wilson intervals (l_i, u_i) of the rates p_i:
    [d - sqrt((p1 - l1)^2 + (u2 - p2)^2), d + sqrt((u1 - p1)^2 + (p2 - l2)^2)], d = p1 - p2.
    It stays inside [-1, 1] and behaves well at 0 and n flips, unlike the Wald interval.
    """
    if n_1 == 0 or n_2 == 0:
        return NAN, NAN
    p1, p2 = flips_1 / n_1, flips_2 / n_2
    l1, u1 = wilson_interval(flips_1, n_1, confidence)
    l2, u2 = wilson_interval(flips_2, n_2, confidence)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, low), min(1.0, high)


def two_sided_exact_p(flips_1: int, n_1: int, flips_2: int, n_2: int) -> float:
    """Two-sided Fisher exact p-value for H0: both flip rates are equal."""
    if n_1 == 0 or n_2 == 0:
        return NAN
    table = [[flips_1, n_1 - flips_1], [flips_2, n_2 - flips_2]]
    return float(stats.fisher_exact(table, alternative="two-sided").pvalue)
