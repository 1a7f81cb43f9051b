"""`zoom discover --screen gradient` and `--free-direction` (zoom/directions.py) on the shapes world."""

import json

import pytest
import torch
from click.testing import CliRunner
from test_hostile import assert_one_line_exit_2

from zoom.cli import main
from zoom.config import load_config
from zoom.discover import load_vocabulary, plan_sizes, propose
from zoom.errors import ZoomError
from zoom.prompts import load_prompts
from zoom.search import Edit


def world_config(seed=300):
    domain = load_prompts(load_config("demo").prompts)
    proposals = propose(domain.domain, load_vocabulary("world"))
    prompts = {"domain": domain.domain, "attributes": [{"name": p.name, "prompt": p.prompt} for p in proposals],
               "null": list(domain.nulls)}
    return load_config("demo", {"prompts": prompts, "search.seed": seed})


def test_screen_must_be_bracket_or_gradient(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["discover", "--config", "demo", "--screen", "foo", "--out", str(out)])
    assert_one_line_exit_2(result, "--screen", "bracket, gradient", "'foo'")
    assert not out.exists()


def test_the_gradient_screen_needs_no_screening_budget():
    assert plan_sizes(12, 8, 16, 5, 2 * 16 * 5, screen_costs=False) == (8, 5)
    with pytest.raises(ZoomError, match="too small"):
        plan_sizes(12, 8, 16, 5, 2 * 16 * 5 - 1, screen_costs=False)


def test_gradient_scores_are_the_margins_directional_derivatives():
    from zoom.directions import _margin_gradient, _setup, gradient_screen

    config = world_config()
    models, searcher, edits, base = _setup(config, [300, 301])
    grad, margin = _margin_gradient(searcher, base, edits.prompts.domain, [0, 1])
    k = [a.name for a in edits.prompts.attributes].index("red")
    direction, eps = edits.directions[k], 1e-3
    with torch.no_grad():  # finite difference of the margin along red's direction
        _, _, logits = searcher._render(base.seeds, torch.full((2, 1), eps), Edit(["red"], direction, None),
                                        models.generator.embed(edits.prompts.domain))
    stepped = searcher.criterion.margin(logits, base.loop_pred)
    derivative = (grad * direction).flatten(1).sum(1)
    assert torch.allclose((stepped - margin) / eps, derivative, rtol=0.05, atol=0.05 * float(derivative.abs().max()))
    # the screen's terms: the share of each seed's margin one full edit removes, clipped, averaged
    screen = gradient_screen(config, [300, 301], models)
    expected = float((-derivative * config.search.alpha_max / margin).clamp(-1, 1).mean())
    assert screen["scores"]["red"]["derivative"] == pytest.approx(expected, abs=1e-4)
    s = screen["scores"]["red"]
    assert s["score"] == pytest.approx(s["derivative"] - s["null_derivative"], abs=2e-6) and s["n"] == 2
    assert screen["cost"]["unet_calls"] == 2 * 2 * models.generator.steps


def test_discover_with_the_gradient_screen_and_a_free_direction_end_to_end(tmp_path):
    out = tmp_path / "found"
    args = ["discover", "--config", "demo", "--screen", "gradient", "--free-direction", "--screen-samples", "3",
            "--samples", "4", "--top-k", "2", "--seed", "300", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    found = json.loads((out / "discover.json").read_text())
    assert found["screen"]["name"] == "gradient" and "directional derivative" in found["screen"]["method"]
    assert found["screen"]["seeds"] == [300, 302] and found["confirm"]["seeds"] == [303, 306]
    assert not (out / "screen").exists() and (out / "screen-gradient.json").exists()
    cost = found["cost"]
    assert cost["screening"]["counterfactuals"] == 0 and cost["screening"]["unet_calls"] == 2 * 3 * 8
    assert cost["free_direction"]["unet_calls"] > 0 and "free direction" in result.output
    assert [p["rank"] for p in found["proposals"]] == list(range(1, 13))
    assert all(p["screening"]["n"] == 3 for p in found["proposals"])
    chosen = found["confirm"]["chosen"]
    assert 1 <= len(chosen) <= 2 and {c["name"] for c in found["confirmed"]} == set(chosen)
    # the free direction: bounded, named by three proposals that keep the label, each marked once
    free = found["free_direction"]
    assert free["norm"] <= free["bound"] + 1e-3 and free["of"] == 3 and len(free["nearest"]) == 10
    marked = {p["name"]: p["free_direction"] for p in found["proposals"] if p["free_direction"]}
    assert list(marked) and set(marked) == set(free["named"]) and len(free["named"]) == 3
    assert sorted(m["rank"] for m in marked.values()) == [1, 2, 3]
    assert not any(p["changes_label"] for p in found["proposals"] if p["name"] in marked)
    assert len({p["name"] for p in found["proposals"]}) == 12  # named ones are not proposed twice
    # resumed: the screen and the free direction are read back, the answer is the same
    again = CliRunner().invoke(main, args + ["--resume"])
    assert again.exit_code == 0, (again.output, again.exception)
    assert json.loads((out / "discover.json").read_text())["proposals"] == found["proposals"]
    # the screen is part of what a resume must match
    other = [a if a != "gradient" else "bracket" for a in args]
    assert_one_line_exit_2(CliRunner().invoke(main, other + ["--resume"]), "differs")
