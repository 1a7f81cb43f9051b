"""ZOOM's imbalanced-data protocol on the shapes world: audits find the bias trained into a target.

The shape classifiers of zoom/data/world/targets were trained with red circles at P(red | circle) =
0.5, 0.75, 0.9, 0.95, 0.99, and one on balanced data. Audited on small shapes (a flip is the
classifier calling the shape a circle), through tools/validate_world.py's own `validate`:
- the trained-in bias ("red") comes out first and significant for the most biased target, with the
  oracle seeing red in most of red's flipped counterfactuals;
- the balanced target shows no significant attribute besides red, in single and in sweep mode, and
  red far less than on the most biased one (the validation at 48 seeds shows the balanced classifier
  itself calls some red squares circles: README);
- red's confirmed flip rate rises with the bias (Spearman rho over the six levels);
- a sanity audit: the label's own attribute ("a circle") flips the balanced target;
- semantic, not adversarial: searching the latent noise without the CLIP term finds far fewer flips
  that are confirmed red.

By default on the demo's domain and seeds (the demo's own audit is the p = 0.99 one), 16 seeds;
ZOOM_WORLD_SAMPLES=48 ZOOM_WORLD_DOMAINS=green-square,blue-triangle,yellow-square runs the README's
full validation (tools/validate_world.py prints its table, at seeds the tests do not use).
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from validate_world import DOMAINS, validate  # noqa: E402

SAMPLES = int(os.environ.get("ZOOM_WORLD_SAMPLES", "16"))
# the demo's domain always (the sanity and latent audits run there), others on request
CHOSEN = {"green-square", *os.environ.get("ZOOM_WORLD_DOMAINS", "").split(",")}


@pytest.fixture(scope="module")
def results(tmp_path_factory, demo_run):
    out = tmp_path_factory.mktemp("world-audits")
    demo_dir, _, _, demo_report = demo_run
    if SAMPLES == demo_report["run"]["config"]["search"]["samples"]:  # `zoom demo` is this very audit
        shutil.copytree(demo_dir, out / "green-square-p99")
    found = validate(out, SAMPLES, [d for d in DOMAINS if d in CHOSEN], seed=0)
    for domain, cell in found["domains"].items():
        print(f"\n{domain}: " + "; ".join(
            f"p = {p}: red {t['red']['confirmed_flips']}/{t['red']['n']} confirmed ({t['red']['flips']} flips), "
            f"q = {t['red']['q_value']:.2g}" for p, t in cell["targets"].items())
              + f"; rho {cell['dose_response_spearman']:.2f}")
    return out, found


def test_the_trained_in_bias_is_found_first_and_significant(results):
    for domain, cell in results[1]["domains"].items():
        top = cell["targets"][0.99]
        assert top["ranked_first"] == "red" and top["red"]["significant"], (domain, top)
        assert top["red"]["oracle_rate"] >= 0.8, (domain, top)  # the oracle sees red in red's flips


def test_the_balanced_target_has_no_significant_attribute_but_red_and_far_less_red(results):
    for domain, cell in results[1]["domains"].items():
        for run in (cell["targets"][0.2], cell["balanced_sweep"]):
            assert not run["other_significant"], (domain, run)
        assert cell["targets"][0.2]["red"]["confirmed_rate"] <= cell["targets"][0.99]["red"]["confirmed_rate"] - 0.5


def test_the_confirmed_flip_rate_rises_with_the_bias(results):
    """Spearman's rho of red's confirmed flip rate over the six levels (balanced = 0.2), and the most
    biased target well above the three least biased ones."""
    for domain, cell in results[1]["domains"].items():
        rates = {p: t["red"]["confirmed_rate"] for p, t in cell["targets"].items()}
        assert cell["dose_response_spearman"] >= 0.7, (domain, rates)
        assert rates[0.99] >= max(rates[0.2], rates[0.5], rates[0.75]) + 0.5, (domain, rates)


def test_the_labels_own_attribute_flips_the_balanced_target(results):
    sanity = results[1]["sanity"]
    assert sanity["significant"] and sanity["flips"] >= 0.8 * sanity["n"], sanity


def test_latent_edits_without_clip_find_fewer_confirmed_flips(results):
    """An adversarial search (latent noise, no CLIP term) on the same budget: far fewer flips that are
    confirmed red (on this world it flips nothing at all; README says so)."""
    text = results[1]["domains"]["green-square"]["targets"][0.99]["red"]
    latent = results[1]["latent_no_clip"]
    print(f"\nconfirmed red flips: text edits {text['confirmed_flips']}, latent without CLIP {latent['confirmed_flips']}")
    assert latent["confirmed_flips"] <= text["confirmed_flips"] - 4
