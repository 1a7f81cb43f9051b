"""Calibration of the report's significance calls, by simulation on synthetic records (no models).

Blind audits: every edit (each attribute and the null control) flips a seed with the same probability,
so any attribute called `significant` is a false positive. Over hundreds of simulated audits the share
with at least one false call (the family-wise error, which is what Benjamini-Hochberg controls under the
global null) must stay at or under 5%, within simulation error. The same holds for `zoom compare` on
two blind runs, and `zoom check` on a blind run can fail no more often than that. With a planted effect
the power (share of audits that call the planted attribute significant) is measured and printed.

Seeds are heterogeneous in the first scenario: an easy seed flips under every edit (seed propensities
drawn from a Beta distribution), as with real base images that sit near the target's decision boundary.
Run with `-s` to see the figures; with ZOOM_ARTIFACTS set they are also written to artifacts/calibration.json.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from synthetic import base_config, records_for
from zoom.check import evaluate
from zoom.compare import compare_reports
from zoom.prompts import NULL_NAME
from zoom.report import aggregate
from zoom.stats import wilson_interval

FIGURES = {}


def _audit(flip_probs: dict, n: int, rng: np.random.Generator, seed_propensity=None):
    """One simulated audit: {name: flip probability} (or per-seed propensities shared by every edit)."""
    names = [k for k in flip_probs if k != NULL_NAME]
    config = base_config(names, samples=n)
    flips = {}
    for name, p in flip_probs.items():
        probs = seed_propensity if p is None else np.full(n, p)
        flips[name] = list(rng.random(n) < probs)
    records = records_for(flips, config, rng=random.Random(int(rng.integers(1 << 30))))
    return aggregate(records, config, {}, [])


def _share(k, total):
    low, high = wilson_interval(k, total)
    return {"share": k / total, "ci_low": low, "ci_high": high, "count": k, "audits": total}


def _report(key, figure):
    FIGURES[key] = figure
    print(f"\n{key}: {json.dumps(figure)}")
    if os.environ.get("ZOOM_ARTIFACTS"):
        folder = Path(__file__).parents[1] / "artifacts"
        folder.mkdir(exist_ok=True)
        (folder / "calibration.json").write_text(json.dumps(FIGURES, indent=1))


BLIND_AUDITS = 400


@pytest.fixture(scope="module")
def blind_heterogeneous():
    """400 blind audits: 4 attributes + null, 32 seeds, seed propensities ~ Beta(2, 6) (mean 0.25)."""
    rng = np.random.default_rng(20240601)
    names = ["eyeglasses", "smile", "beard", "hat", NULL_NAME]
    reports = []
    for _ in range(BLIND_AUDITS):
        propensity = rng.beta(2, 6, size=32)
        reports.append(_audit({name: None for name in names}, 32, rng, seed_propensity=propensity))
    return reports


def test_blind_audits_rarely_call_anything_significant(blind_heterogeneous):
    false = sum(any(a["significant"] for a in r["attributes"]) for r in blind_heterogeneous)
    figure = _share(false, len(blind_heterogeneous))
    figure["setup"] = "4 attributes + null, 32 seeds, shared seed propensity ~ Beta(2, 6)"
    _report("blind_any_significant", figure)
    assert figure["ci_low"] <= 0.05, figure  # not above 5% beyond simulation error
    assert figure["share"] <= 0.05 + 2 * (0.05 * 0.95 / len(blind_heterogeneous)) ** 0.5, figure
    # p-values under the null are not anti-conservative: P(p <= 0.05) <= 5% per attribute
    pvalues = [a["p_value"] for r in blind_heterogeneous for a in r["attributes"]]
    per_test = _share(sum(p <= 0.05 for p in pvalues), len(pvalues))
    _report("blind_per_test_p_below_0.05", per_test)
    assert per_test["ci_low"] <= 0.05, per_test


def test_blind_iid_many_attributes():
    """10 attributes + null, 64 seeds, every item flips independently with p = 0.3."""
    rng = np.random.default_rng(7)
    names = [f"attribute {i}" for i in range(10)] + [NULL_NAME]
    audits = [_audit({name: 0.3 for name in names}, 64, rng) for _ in range(200)]
    false = sum(any(a["significant"] for a in r["attributes"]) for r in audits)
    figure = _share(false, len(audits))
    figure["setup"] = "10 attributes + null, 64 seeds, iid p = 0.3"
    _report("blind_iid_any_significant", figure)
    assert figure["ci_low"] <= 0.05, figure


def test_check_on_blind_runs_fails_no_more_often_than_the_false_calls(blind_heterogeneous):
    fails = sum(not evaluate(r, 0.0)["passed"] for r in blind_heterogeneous)
    false = sum(any(a["significant"] for a in r["attributes"]) for r in blind_heterogeneous)
    figure = _share(fails, len(blind_heterogeneous))
    _report("blind_check_fails_at_R_0", figure)
    assert fails <= false and figure["ci_low"] <= 0.05


def test_compare_of_two_blind_runs_rarely_finds_a_difference(blind_heterogeneous):
    pairs = list(zip(blind_heterogeneous[0::2], blind_heterogeneous[1::2]))
    found = sum(any(r["significant"] for r in compare_reports(a, b)["attributes"]) for a, b in pairs)
    figure = _share(found, len(pairs))
    figure["setup"] = "pairs of independent blind audits (same rates)"
    _report("compare_blind_any_different", figure)
    assert figure["ci_low"] <= 0.05, figure


def test_power_with_a_planted_effect():
    """One attribute flips with the planted rate, three others and the null with 0.2; 32 seeds, 200 audits
    per rate. Power: the share of audits calling the planted attribute significant. False discovery
    proportion: false calls over all calls, averaged over audits (what Benjamini-Hochberg controls)."""
    powers = []
    for planted_rate in (0.4, 0.5, 0.6, 0.7):
        rng = np.random.default_rng(int(planted_rate * 1000))
        probs = {"planted": planted_rate, "blind 1": 0.2, "blind 2": 0.2, "blind 3": 0.2, NULL_NAME: 0.2}
        audits = [_audit(probs, 32, rng) for _ in range(200)]
        found = sum(next(a for a in r["attributes"] if a["name"] == "planted")["significant"] for r in audits)
        fdp = []
        for r in audits:
            calls = [a["name"] for a in r["attributes"] if a["significant"]]
            fdp.append(sum(name != "planted" for name in calls) / max(len(calls), 1))
        gate = sum("planted" in evaluate(r, 0.2)["failing"] for r in audits)
        power = _share(found, len(audits))
        power["setup"] = f"planted {planted_rate} vs 0.2 (3 blind attributes, null), 32 seeds"
        power["check_fails_at_R_0.2"] = gate / len(audits)
        power["false_discovery_proportion"] = float(np.mean(fdp))
        _report(f"power_planted_{planted_rate}", power)
        fdr_se = float(np.std(fdp)) / len(fdp) ** 0.5
        assert power["false_discovery_proportion"] <= 0.05 + 2 * fdr_se, power
        powers.append(power["share"])
    assert powers == sorted(powers), powers  # a larger effect is found more often
    assert powers[2] >= 0.8 and powers[3] >= 0.95, powers  # 0.6 and 0.7 vs 0.2 at 32 seeds
