"""zoom.stats checked against independent implementations (statsmodels, exact hypergeometric sums)."""

import math
from fractions import Fraction

import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from zoom.stats import bh_qvalues, greater_than_null_p, wilson_interval

# ---------------------------------------------------------------------------------------------
# Wilson interval
# ---------------------------------------------------------------------------------------------

WILSON_GRID = [(0, 1), (1, 1), (0, 2), (1, 2), (2, 2), (0, 5), (5, 5), (3, 7), (0, 64), (1, 64),
               (32, 64), (63, 64), (64, 64), (17, 100), (0, 1000), (999, 1000), (500, 1000)]


@pytest.mark.parametrize("k,n", WILSON_GRID)
def test_wilson_matches_statsmodels(k, n):
    low, high = wilson_interval(k, n)
    ref_low, ref_high = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


@pytest.mark.parametrize("k,n,confidence", [(3, 10, 0.90), (0, 20, 0.99), (20, 20, 0.80), (1, 1, 0.5)])
def test_wilson_other_confidence_levels(k, n, confidence):
    low, high = wilson_interval(k, n, confidence)
    ref_low, ref_high = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    assert (low, high) == pytest.approx((ref_low, ref_high), abs=1e-9)


def test_wilson_extremes_touch_bounds():
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)
    # n = 1 is still a proper, non-degenerate interval
    low, high = wilson_interval(1, 1)
    assert 0.0 < low < 1.0 and high == pytest.approx(1.0)


def test_wilson_n_zero_is_nan():
    low, high = wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)


# ---------------------------------------------------------------------------------------------
# Benjamini-Hochberg
# ---------------------------------------------------------------------------------------------

BH_LISTS = [
    [0.01],
    [0.5, 0.5],
    [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216],
    [0.03, 0.03, 0.03, 0.2, 0.2, 0.9],  # ties
    [1.0, 0.0, 0.04, 0.04, 1.0],  # 0 and 1 and ties
    [0.9, 0.8, 0.7, 0.6, 0.05, 0.04, 0.03, 0.02, 0.01],  # decreasing order
    [0.2, 0.01, 0.5, 0.04, 0.049, 0.3, 0.02, 0.7, 0.011, 0.6, 0.012, 0.8],
]


@pytest.mark.parametrize("pvalues", BH_LISTS)
def test_bh_matches_statsmodels(pvalues):
    q = bh_qvalues(pvalues)
    ref = multipletests(pvalues, method="fdr_bh")[1]
    assert len(q) == len(pvalues)
    assert q == pytest.approx(list(ref), abs=1e-12)
    assert all(p <= qi + 1e-15 <= 1.0 + 1e-15 for p, qi in zip(pvalues, q))


@pytest.mark.parametrize("pvalues", [
    [0.01, float("nan"), 0.04, 0.03],
    [float("nan"), 0.02, 0.02, 0.5, float("nan"), 0.001],
    [0.04, 0.04, float("nan")],
])
def test_bh_nan_stays_nan_and_is_not_counted(pvalues):
    q = bh_qvalues(pvalues)
    keep = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    ref = multipletests([pvalues[i] for i in keep], method="fdr_bh")[1]
    for i, p in enumerate(pvalues):
        if math.isnan(p):
            assert math.isnan(q[i])
    assert [q[i] for i in keep] == pytest.approx(list(ref), abs=1e-12)
    # counting the NaN entries as tests would have given different (larger) q-values
    m_all = len(pvalues)
    inflated = multipletests([pvalues[i] for i in keep] + [1.0] * (m_all - len(keep)), method="fdr_bh")[1]
    assert any(abs(a - b) > 1e-9 for a, b in zip([q[i] for i in keep], inflated[:len(keep)]))


def test_bh_edge_cases():
    assert bh_qvalues([]) == []
    q = bh_qvalues([float("nan"), float("nan")])
    assert len(q) == 2 and all(math.isnan(x) for x in q)
    # the input list is not modified
    p = [0.3, float("nan"), 0.01]
    bh_qvalues(p)
    assert p[0] == 0.3 and math.isnan(p[1]) and p[2] == 0.01


# ---------------------------------------------------------------------------------------------
# One-sided Fisher exact test vs an exact hypergeometric tail
# ---------------------------------------------------------------------------------------------


def textbook_fisher_greater(flips, n, null_flips, null_n):
    """P(X >= flips), X ~ Hypergeom(population n + null_n, successes flips + null_flips, draws n)."""
    total = n + null_n
    successes = flips + null_flips
    denom = math.comb(total, n)
    tail = sum(math.comb(successes, x) * math.comb(total - successes, n - x)
               for x in range(flips, min(n, successes) + 1))
    return float(Fraction(tail, denom))


FISHER_TABLES = [
    (0, 10, 0, 10),  # no flips anywhere -> p = 1
    (10, 10, 0, 10),  # all attribute samples flip, none of the null
    (0, 10, 10, 10),  # attribute never flips, null always -> p = 1
    (10, 10, 10, 10),  # everything flips -> p = 1
    (0, 8, 3, 8),
    (5, 8, 1, 8),
    (3, 8, 3, 8),
    (7, 20, 2, 20),
    (20, 64, 4, 64),
    (1, 1, 0, 1),
    (1, 1, 0, 5),
    (12, 30, 0, 50),
    (2, 5, 4, 40),
    (64, 64, 0, 64),
]


@pytest.mark.parametrize("flips,n,null_flips,null_n", FISHER_TABLES)
def test_fisher_matches_hypergeometric_tail(flips, n, null_flips, null_n):
    p = greater_than_null_p(flips, n, null_flips, null_n)
    ref = textbook_fisher_greater(flips, n, null_flips, null_n)
    assert p == pytest.approx(ref, rel=1e-9, abs=1e-15)
    assert 0.0 <= p <= 1.0


def test_fisher_known_values():
    assert greater_than_null_p(0, 10, 0, 10) == pytest.approx(1.0)
    assert greater_than_null_p(10, 10, 10, 10) == pytest.approx(1.0)
    # 10/10 vs 0/10: only one table this extreme, 1 / C(20, 10)
    assert greater_than_null_p(10, 10, 0, 10) == pytest.approx(1 / math.comb(20, 10), rel=1e-9)
    # one-sided: more flips in the attribute gives a smaller p-value
    assert greater_than_null_p(8, 20, 2, 20) < greater_than_null_p(4, 20, 2, 20) < greater_than_null_p(1, 20, 2, 20)


@pytest.mark.parametrize("args", [(0, 0, 3, 10), (3, 10, 0, 0), (0, 0, 0, 0)])
def test_fisher_empty_group_is_nan(args):
    assert math.isnan(greater_than_null_p(*args))
