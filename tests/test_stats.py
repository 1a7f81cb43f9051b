"""zoom.stats checked against independent implementations (statsmodels, exact binomial sums, simulation)."""

import math
from fractions import Fraction

import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from zoom.stats import (bh_qvalues, censored_quantiles, difference_interval, exact_lower_bound, holm_adjusted,
                        mcnemar_greater_p, mcnemar_two_sided_p, paired_difference_interval, rate_above_p,
                        wilson_interval)

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
# Exact McNemar tests vs binomial tails and statsmodels
# ---------------------------------------------------------------------------------------------


def textbook_binomial_upper_tail(k, m):
    """P(X >= k), X ~ Binomial(m, 1/2), exactly."""
    return float(Fraction(sum(math.comb(m, x) for x in range(k, m + 1)), 2 ** m))


DISCORDANT = [(0, 0), (1, 0), (0, 1), (5, 0), (0, 5), (3, 3), (7, 2), (2, 7), (12, 4), (20, 20), (40, 25)]


@pytest.mark.parametrize("b,c", DISCORDANT)
def test_mcnemar_one_sided_matches_binomial_tail(b, c):
    p = mcnemar_greater_p(b, c)
    assert p == pytest.approx(textbook_binomial_upper_tail(b, b + c) if b + c else 1.0, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("b,c", DISCORDANT)
def test_mcnemar_two_sided_matches_statsmodels(b, c):
    from statsmodels.stats.contingency_tables import mcnemar

    ref = mcnemar([[10, b], [c, 10]], exact=True).pvalue
    assert mcnemar_two_sided_p(b, c) == pytest.approx(min(1.0, ref), rel=1e-9, abs=1e-15)


def test_mcnemar_ignores_concordant_pairs_and_is_one_sided():
    # attribute-only 8 vs null-only 0: 1/2^8 whatever the concordant seeds
    assert mcnemar_greater_p(8, 0) == pytest.approx(1 / 256)
    assert mcnemar_greater_p(0, 8) == pytest.approx(1.0)
    assert mcnemar_greater_p(0, 0) == 1.0


# ---------------------------------------------------------------------------------------------
# Holm, Clopper-Pearson, the gate's rate test
# ---------------------------------------------------------------------------------------------


def test_holm_matches_statsmodels():
    pvalues = [0.01, 0.04, 0.03, 0.2, 0.0001, 0.5, 0.049]
    ref = multipletests(pvalues, method="holm")[1]
    assert holm_adjusted(pvalues) == pytest.approx(list(ref), rel=1e-12)
    with_nan = holm_adjusted([0.01, float("nan"), 0.04])
    assert math.isnan(with_nan[1]) and with_nan[0] == pytest.approx(0.02) and with_nan[2] == pytest.approx(0.04)


@pytest.mark.parametrize("k,n", [(0, 16), (3, 16), (16, 16), (10, 64), (50, 128), (1, 1)])
def test_exact_lower_bound_is_clopper_pearson(k, n):
    low, _ = proportion_confint(k, n, alpha=0.10, method="beta")  # one-sided 95% = two-sided 90%
    assert exact_lower_bound(k, n) == pytest.approx(low, abs=1e-9)


def test_rate_above_is_the_exact_binomial_tail():
    from scipy.stats import binom

    assert rate_above_p(7, 20, 0.2) == pytest.approx(binom.sf(6, 20, 0.2), rel=1e-9)
    assert rate_above_p(0, 20, 0.2) == pytest.approx(1.0)
    assert rate_above_p(3, 20, 1.0) == 1.0 and math.isnan(rate_above_p(0, 0, 0.2))


# ---------------------------------------------------------------------------------------------
# Newcombe's paired interval
# ---------------------------------------------------------------------------------------------


def newcombe_paired_reference(a, b, c, d, confidence=0.95):
    """Method 10 of Newcombe (1998b, Statistics in Medicine 17:2635), written from the paper's formula
    with statsmodels' Wilson limits: a = both, b = only the first, c = only the second, d = neither."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = proportion_confint(a + b, n, alpha=1 - confidence, method="wilson")
    l2, u2 = proportion_confint(a + c, n, alpha=1 - confidence, method="wilson")
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    corrected = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    delta = math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    epsilon = math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    return p1 - p2 - delta, p1 - p2 + epsilon


def test_paired_interval_reproduces_a_published_example():
    """Cavo et al. (2012), complete response before and after consolidation therapy, 161 patients: both 59,
    before only 6, after only 16, neither 80. Newcombe's square-and-add interval as published in Fagerland,
    Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8 (and the R package
    contingencytables' tests): -0.0621 (95% CI -0.1186 to -0.0046)."""
    low, high = paired_difference_interval(both=59, only_1=6, only_2=16, neither=80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)


def test_paired_interval_equals_newcombes_formula_on_every_small_table():
    """Every 2x2 table of up to 12 pairs (1,819 tables), against the paper's formula written independently."""
    tables = [(a, b, c, n - a - b - c) for n in range(1, 13) for a in range(n + 1) for b in range(n + 1 - a)
              for c in range(n + 1 - a - b)]
    assert len(tables) == 1819
    for table in tables:
        assert paired_difference_interval(*table) == pytest.approx(newcombe_paired_reference(*table), abs=1e-12), table
    for confidence in (0.8, 0.99):
        assert paired_difference_interval(30, 9, 2, 40, confidence) == pytest.approx(
            newcombe_paired_reference(30, 9, 2, 40, confidence), abs=1e-12)


@pytest.mark.parametrize("table,correlation", [((4, 4, 4, 4), "none"), ((3, 3, 3, 4), "none"), ((0, 0, 6, 10), "none"),
                                               ((2, 1, 1, 2), "none"), ((0, 5, 3, 0), "negative"),
                                               ((2, 7, 1, 0), "negative"), ((3, 12, 9, 8), "negative")])
def test_paired_interval_against_statsmodels_newcombe_hybrid_of_the_margins(table, correlation):
    """With AD - BC in [0, n/2] (phi = 0 after Newcombe's shrinkage by n/2) the paired interval is Newcombe's
    hybrid interval for independent samples of the margins, which statsmodels computes; a negative
    correlation between the pairs makes it wider on both sides."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    a, b, c, d = table
    n = a + b + c + d
    assert (0 <= a * d - b * c <= n / 2) == (correlation == "none")
    reference = tuple(map(float, confint_proportions_2indep(a + b, n, a + c, n, method="newcomb", compare="diff")))
    low, high = paired_difference_interval(*table)
    if correlation == "none":
        assert (low, high) == pytest.approx(reference, abs=1e-12)
    else:
        assert low < reference[0] and high > reference[1]


def test_paired_interval_narrows_with_positive_correlation_and_stays_in_range():
    independent = paired_difference_interval(25, 25, 5, 45)
    correlated = paired_difference_interval(45, 5, 0, 50)  # same margins shifted: most pairs agree
    assert correlated[1] - correlated[0] < independent[1] - independent[0]
    for table in [(0, 0, 0, 10), (10, 0, 0, 0), (0, 10, 0, 0), (0, 0, 10, 0), (3, 0, 0, 0)]:
        low, high = paired_difference_interval(*table)
        assert -1.0 <= low <= high <= 1.0


def test_paired_interval_covers_the_true_difference():
    """Simulated coverage of the 95% interval on correlated pairs: at least 93% in every setting."""
    import numpy as np

    rng = np.random.default_rng(3)
    for n, p1, p2, rho in [(32, 0.3, 0.3, 0.5), (64, 0.4, 0.2, 0.3), (32, 0.1, 0.05, 0.6), (128, 0.5, 0.45, 0.8)]:
        hits = 0
        for _ in range(1000):
            z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
            from scipy.stats import norm

            x1, x2 = z[:, 0] < norm.ppf(p1), z[:, 1] < norm.ppf(p2)
            a, b, c = int((x1 & x2).sum()), int((x1 & ~x2).sum()), int((~x1 & x2).sum())
            low, high = paired_difference_interval(a, b, c, n - a - b - c)
            hits += low <= p1 - p2 <= high
        assert hits / 1000 >= 0.93, (n, p1, p2, rho, hits)


# ---------------------------------------------------------------------------------------------
# Kaplan-Meier strength quantiles vs statsmodels' SurvfuncRight
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flipped,censored", [
    ([0.5, 1.0, 1.5, 2.0], []),
    ([0.2, 0.4, 0.9], [3.0, 3.0, 3.0, 3.0, 3.0]),
    ([0.3, 1.2, 2.2, 2.9], [1.0, 1.5, 3.0]),
    ([1.0] * 6, [0.5, 2.0]),
])
def test_censored_quantiles_match_statsmodels(flipped, censored):
    """statsmodels' quantile, except on a plateau (the estimate exactly q between two event times), where
    zoom takes the midpoint as the sample median does (1, 2, 3, 4 -> 2.5; statsmodels says 3)."""
    from statsmodels.duration.survfunc import SurvfuncRight

    times = flipped + censored
    status = [1] * len(flipped) + [0] * len(censored)
    sf = SurvfuncRight(times, status)
    events, cdf = list(sf.surv_times), [1 - s for s in sf.surv_prob]
    for q, ours in zip((0.25, 0.5, 0.75), censored_quantiles(flipped, censored)):
        ref = sf.quantile(q)
        on_plateau = [i for i, f in enumerate(cdf[:-1]) if abs(f - q) < 1e-12]
        if on_plateau:
            ref = (events[on_plateau[0]] + events[on_plateau[0] + 1]) / 2
        if ours is None:
            assert math.isnan(ref)
        else:
            assert ours == pytest.approx(ref)


def test_the_median_of_a_plateau_is_its_midpoint():
    assert censored_quantiles([1.0, 2.0, 3.0, 4.0], [])[1] == pytest.approx(2.5)


def test_censored_median_is_not_the_median_of_the_flipped():
    # 8 of 64 seeds flip at 0.2: the median strength is not reached ("> limit"), not 0.2
    q25, q50, q75 = censored_quantiles([0.2] * 8, [3.0] * 56)
    assert q25 is None and q50 is None and q75 is None
    assert censored_quantiles([1.5] * 64, [])[1] == pytest.approx(1.5)
    assert censored_quantiles([], [3.0]) == [None, None, None]
