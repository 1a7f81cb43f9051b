"""The statistics of the report, all from scipy.stats (nothing hand-rolled).

- Wilson score interval for a flip rate (95% by default);
- one-sided Fisher exact test: is an attribute's flip rate greater than the null control's?
- Benjamini-Hochberg q-values across the attributes of one run.
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
