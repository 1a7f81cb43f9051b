"""ZOOM's imbalanced-data protocol on the shapes world: audits find the bias trained into a target.

The shape classifiers of zoom/data/world/targets were trained with red circles at P(red | circle) =
0.5, 0.75, 0.9, 0.95, 0.99, and one on balanced data. Audited on small green squares (prompt set
`shapes`, a flip is the classifier calling the square a circle):
- the trained-in bias ("red") comes out first and significant for the most biased target, with
  the oracle seeing red in most of red's flipped counterfactuals;
- the balanced target shows no significant attribute: none of these four causes its label;
- red's flip rate rises with the bias (Spearman rho over the five biased levels);
- a sanity audit: the label's own attribute ("a circle") flips the balanced target;
- semantic, not adversarial: searching the latent noise without the CLIP term finds far fewer flips
  in which the oracle sees red.

The audits run once per session (the demo's own audit is the p = 0.99 one); tools/validate_world.py
prints the README's table from the same audits.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from validate_world import BIAS_LEVELS, FULL_SET_LEVELS, RED_ONLY_RUN, SANITY_RUN, audit, row, target_spec  # noqa: E402

SAMPLES = 16


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_run):
    """The four attributes on the balanced and the most biased target (`zoom demo` is the p = 0.99
    one); red alone, with its null twin, on the other levels (the dose-response needs no more)."""
    out = tmp_path_factory.mktemp("world-audits")
    reports = {0.99: demo_run[3]}
    for p in (0.2, *BIAS_LEVELS):
        if p not in reports:
            overrides = {} if p in FULL_SET_LEVELS else RED_ONLY_RUN
            reports[p] = audit(out, f"shapes-p{round(p * 100):02d}", SAMPLES, target_spec=target_spec(p), **overrides)
    for p, r in sorted(reports.items()):
        print(f"\np = {p}: " + ", ".join(f"{a['name']} {a['flips']}/{a['n']} q={a['q_value']:.2g}"
                                         for a in r["attributes"]) + f"; null {r['null']['flip_rate']:.2f}")
    return out, reports


def test_the_trained_in_bias_is_found_first_and_significant(runs):
    _, reports = runs
    ranked = reports[0.99]["attributes"]
    assert ranked[0]["name"] == "red" and ranked[0]["significant"], ranked[0]
    assert ranked[0]["oracle_rate"] >= 0.8, ranked[0]  # the oracle sees red in red's flips


def test_the_balanced_target_has_no_significant_non_causal_attribute(runs):
    _, reports = runs
    assert not [a["name"] for a in reports[0.2]["attributes"] if a["significant"]]


def test_the_flip_rate_rises_with_the_bias(runs):
    """Spearman's rho over the five biased levels (the issue's dose-response), and the most biased
    target well above the balanced one."""
    from scipy import stats

    _, reports = runs
    rates = {p: row(reports[p], "red")["flip_rate"] for p in (0.2, *BIAS_LEVELS)}
    rho = stats.spearmanr(BIAS_LEVELS, [rates[p] for p in BIAS_LEVELS]).statistic
    print(f"\nred's flip rate by bias level {rates}: Spearman rho {rho:.2f}")
    assert rho >= 0.9 and rates[0.99] > rates[0.2] + 0.25


def test_the_labels_own_attribute_flips_the_balanced_target(runs):
    out, _ = runs
    report = audit(out, "sanity-circle", SAMPLES, target_spec=target_spec(0.2), **SANITY_RUN)
    circle = row(report, "circle")
    assert circle["significant"] and circle["flip_rate"] >= 0.8, circle


def test_latent_edits_without_clip_find_fewer_valid_flips(runs):
    """An adversarial search (latent noise, no CLIP term) on the same budget: far fewer flips in which
    the oracle sees red (on this world it flips nothing at all; README says so)."""
    out, reports = runs
    text = row(reports[0.99], "red")
    latent = row(audit(out, "shapes-p99-latent-no-clip", SAMPLES, target_spec=target_spec(0.99), **RED_ONLY_RUN,
                       edit_space="latent", search_lambda_clip=0.0), "red")

    def valid_flips(r):
        return r["flips"] * (r.get("oracle_rate") or 0.0)

    print(f"\nflips the oracle sees as red: text edits {valid_flips(text):.0f}, latent without CLIP {valid_flips(latent):.0f}")
    assert valid_flips(latent) <= valid_flips(text) - 4
