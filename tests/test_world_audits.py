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
- semantic, not adversarial: searching the latent noise without the CLIP term, with a residual as large
  as the noise, moves the target's decision on some seeds but makes few squares circles, none red.

By default on the demo's domain and seeds (the demo's own audit is the p = 0.99 one), 16 seeds;
ZOOM_WORLD_SEED=100 (or any first seed) reruns them on other seeds;
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
SEED = int(os.environ.get("ZOOM_WORLD_SEED", "0"))  # README: the assertions below held at 0, 100 and 200
# the demo's domain always (the sanity and latent audits run there), others on request
CHOSEN = {"green-square", *os.environ.get("ZOOM_WORLD_DOMAINS", "").split(",")}


@pytest.fixture(scope="module")
def results(tmp_path_factory, demo_run):
    out = tmp_path_factory.mktemp("world-audits")
    demo_dir, _, _, demo_report = demo_run
    config = demo_report["run"]["config"]["search"]
    if (SAMPLES, SEED) == (config["samples"], config["seed"]):  # `zoom demo` is this very audit
        shutil.copytree(demo_dir, out / "green-square-p99")
    found = validate(out, SAMPLES, [d for d in DOMAINS if d in CHOSEN], seed=SEED)
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


def test_adversarial_latent_edits_flip_far_fewer_seeds_and_none_is_confirmed_red(results):
    """The flips need the attribute's text: an adversarial search of the latent noise (no CLIP term, Adam with
    the same steps) with a residual up to the size of the noise itself, which the seeds it does not flip
    mostly use to the full and which moves the classifier's decision on some seeds, makes at most a
    quarter as many squares circles as the text edit toward red, and none of them red (README: at the
    validation seeds, 2/48 latent flips, 0 confirmed; on the demo's 16 seeds, none)."""
    text = results[1]["domains"]["green-square"]["targets"][0.99]["red"]
    latent = results[1]["latent_no_clip"]
    print(f"\nred flips: text edits {text['flips']} ({text['confirmed_flips']} confirmed), latent noise without CLIP "
          f"{latent['flips']} ({latent['confirmed_flips']} confirmed; decision moved on {latent['decision_moved']}, "
          f"unflipped seeds' |delta| / |noise|: min, median {latent['unflipped_delta_rel']})")
    least, median = latent["unflipped_delta_rel"]
    assert latent["delta_max"] >= 1 and median >= 0.9 * latent["delta_max"] and least >= 0.5  # room, and used
    assert latent["decision_moved"] >= 1  # it can move the target
    assert text["confirmed_flips"] >= 0.5 * text["n"]
    assert latent["flips"] <= text["flips"] / 4 and latent["confirmed_flips"] == 0


def test_the_balanced_targets_red_flips_on_the_validation_seeds_are_red_squares_to_the_oracles(tmp_path):
    """README (validation, the demo's domain, seeds 1000-1047): the balanced classifier calls some small red
    squares circles (8 of 47 there), every one red to the colour oracle and a square to the shape oracle: a
    colour shortcut of that network, not an edit that turned the square into a circle. Re-run here (red and
    its null twin only, ~20 s) and every flipped counterfactual re-scored by both oracles. (On seeds 0-47
    the picture differs: README says so.)"""
    import json

    import numpy as np
    import torch
    from PIL import Image

    from validate_world import audit, red_only, row, target_spec
    from zoom import world
    from zoom.targets import load_target

    report = audit(tmp_path, "balanced-red", 48, seed=1000, target_spec=target_spec(0.2), **red_only("green-square"))
    run = tmp_path / "balanced-red"
    records = [json.loads(line) for path in (run / "records").glob("rank-*.jsonl")
               for line in path.read_text().splitlines()]
    flipped = [r for r in records if r["attribute"] == "red" and r["flipped"]]
    print(f"\nbalanced target, red, seeds 1000-1047: {len(flipped)} flips of {row(report, 'red')['n']}")
    assert len(flipped) >= 4 and len(flipped) == row(report, "red")["flips"]
    images = torch.stack([torch.from_numpy(np.array(Image.open(run / r["counterfactual_image"]))).permute(2, 0, 1)
                          for r in flipped]).float() / 255
    seen = {}
    with torch.no_grad():
        for oracle in ("colour", "shape"):
            pred = load_target(f"hf:{world.models_dir() / 'oracles' / oracle}")(images).argmax(1).tolist()
            seen[oracle] = [world.ATTRIBUTES[oracle][p] for p in pred]
    assert seen["colour"] == ["red"] * len(flipped), seen
    assert seen["shape"] == ["square"] * len(flipped), seen
    assert all(r["final_label"] == "circle" for r in flipped)  # and the classifier calls each a circle
