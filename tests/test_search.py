"""The search finds what is there and credits only what the attribute did.

A one-dimensional world with an exactly known answer: the "generator" renders an image whose every
pixel is the conditioning's mean shift along the edit (so alpha itself, for a unit direction), and the
"target" flips seed s when that value crosses seed s's own boundary. Then the bracketing search must
find each flip within `tolerance` of the boundary, never search at alpha < 0, count a flip that comes
back at its first flip (non-monotone), and the gradient search must stay in [0, alpha_max]. A small
version of tools/recall.py runs the same comparison on the shapes world.
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from zoom.config import SearchConfig
from zoom.search import Edit, Searcher
from zoom.targets import make_criterion


class LineGenerator:
    """Images whose first two channels equal <cond - E(domain), unit> (alpha along a unit direction)
    and whose third carries the seed, so the target knows whose boundary to apply in any batch."""

    steps = 1
    loop_decoder = None
    device = torch.device("cpu")

    def __init__(self):
        self.domain = torch.zeros(1, 2, 3)
        self.unit = torch.zeros(1, 2, 3)
        self.unit[0, 0, 0] = 1.0
        self.evaluated = []  # every alpha the search rendered

    def embed(self, prompt):
        return self.domain

    def initial_noise(self, seeds):
        return torch.ones(len(seeds), 1, 2, 2)

    def sample_latents(self, seeds, cond, delta=None):
        value = ((cond - self.domain) * self.unit).sum((1, 2))
        self.evaluated += value.detach().tolist()
        latents = value.view(-1, 1, 1, 1).expand(-1, 1, 2, 2) + (delta if delta is not None else 0)
        seed = torch.tensor(seeds, dtype=latents.dtype).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        return torch.cat([latents, seed], dim=1)

    def decode(self, latents, in_loop=False):
        return torch.cat([latents[:, :1], latents[:, :1], latents[:, 1:]], dim=1)


class Boundaries(torch.nn.Module):
    """Two classes; seed s's image flips to class 1 for values inside its (low[s], high[s]) band."""

    def __init__(self, low, high):
        super().__init__()
        self.low, self.high = torch.tensor(low), torch.tensor(high)

    def forward(self, images):
        v, seed = images[:, 0].mean((1, 2)), images[:, 2, 0, 0].round().long()
        inside = torch.minimum(v - self.low[seed], self.high[seed] - v)
        return torch.stack([torch.zeros_like(v), 50 * inside], dim=1)


class Guide:
    def embed_images(self, images):
        return torch.cat([images[:, 0].mean((1, 2))[:, None], torch.ones(len(images), 1)], dim=1)


def searcher(low, high, **search):
    generator = LineGenerator()
    cfg = dataclasses.replace(SearchConfig(), **search)
    return generator, Searcher(generator, Guide(), Boundaries(low, high), make_criterion("multiclass"), cfg)


def line_edit(generator, batch):
    return Edit(["a"], generator.unit.clone(), torch.tensor([[1.0, 0.0]]))


def test_the_bracket_finds_each_boundary_within_tolerance_and_never_goes_negative():
    lows = [0.07, 0.33, 0.5, 0.91, -0.6]  # the last flips only at alpha < 0: away from the attribute
    highs = [9.0, 9.0, 9.0, 9.0, -0.1]
    generator, s = searcher(lows, highs, tolerance=0.01)
    base = s.base(list(range(5)), "domain")
    outcome = s.bracket_search(base, line_edit(generator, 5), "domain")
    assert outcome.flipped == [True, True, True, True, False]
    for i, boundary in enumerate(lows[:4]):
        strength, low = float(outcome.alpha[i, 0]), float(outcome.low[i, 0])
        assert low <= boundary < strength <= low + 0.01, (i, low, strength)
    assert min(generator.evaluated) >= 0.0  # nothing rendered away from the attribute
    assert max(generator.evaluated) <= 1.0
    # grid points, then bisection only for the flipped seeds: forward passes, counted
    assert outcome.steps[4] == s.cfg.grid_points
    assert max(outcome.steps) == s.cfg.grid_points + s.bisections()


def test_a_flip_that_comes_back_counts_at_its_first_flip_and_is_marked_non_monotone():
    generator, s = searcher([0.4, 0.2], [0.6, 9.0], tolerance=0.01, grid_points=4)
    base = s.base([0, 1], "domain")
    outcome = s.bracket_search(base, line_edit(generator, 2), "domain")
    assert outcome.flipped == [True, True]
    assert outcome.monotone == [False, True]  # seed 0 flips at 0.5 and is back by 0.75
    assert 0.4 < float(outcome.alpha[0, 0]) <= 0.41


def test_a_narrow_band_between_grid_points_is_found_where_the_margin_dips():
    """Seed 0 flips only inside (0.42, 0.45), between the grid points 0.25 and 0.5: the grid's margin
    is smallest at 0.5, the probes around it find the band. Seed 1 never comes halfway to a boundary
    (it flips only at alpha < 0): no probes, the grid's four evaluations only."""
    generator, s = searcher([0.42, -0.6], [0.45, -0.1], tolerance=0.01, grid_points=4)
    base = s.base([0, 1], "domain")
    outcome = s.bracket_search(base, line_edit(generator, 2), "domain")
    assert outcome.flipped == [True, False]
    assert outcome.monotone[0] is False
    low, strength = float(outcome.low[0, 0]), float(outcome.alpha[0, 0])
    assert low <= 0.42 < strength <= low + 0.01
    assert outcome.steps[1] == s.cfg.grid_points
    assert min(generator.evaluated) >= 0.0 and max(generator.evaluated) <= 1.0


def test_the_sweep_grid_starts_at_zero():
    generator, s = searcher([0.3, -0.5], [9.0, -0.2], sweep_points=11)
    base = s.base([0, 1], "domain")
    outcome = s.sweep(base, line_edit(generator, 2), "domain")
    assert [p[0] for p in outcome.curves[0]] == pytest.approx([i / 10 for i in range(11)])
    assert outcome.flipped == [True, False]
    assert float(outcome.alpha[0, 0]) == pytest.approx(0.4) and float(outcome.low[0, 0]) == pytest.approx(0.3)
    assert min(generator.evaluated) >= 0.0


@pytest.mark.parametrize("edit_space", ["both", "text"])
def test_the_gradient_search_stays_toward_the_attribute(edit_space):
    """Seed 0 flips only at alpha < 0, so the margin's gradient points away from the attribute: Adam
    must stay clamped at 0, and nothing may be credited; seed 1 flips at 0.62 and is found."""
    generator, s = searcher([-0.8, 0.62], [-0.2, 9.0], max_steps=6, lr=0.5, lambda_clip=0.0)
    base = s.base([0, 1], "domain")
    edit = line_edit(generator, 2)
    outcome = s.optimise(base, edit, "domain", edit_space)
    assert outcome.flipped == [False, True]
    assert (outcome.alpha >= 0).all() and min(generator.evaluated) >= -1e-6
    assert max(generator.evaluated) <= s.cfg.alpha_max + 1e-6


def test_joint_mode_starts_from_the_brackets_and_credits_the_direction_that_flips():
    """Two directions along the same line, one four times stronger: the joint search keeps the
    stronger direction's bracket flip (the smallest edit) and credits it."""
    from zoom.runner import credit

    generator, s = searcher([0.5], [9.0], max_steps=3)
    base = s.base([0], "domain")
    directions = torch.stack([generator.unit[0] * 0.25, generator.unit[0]])
    edit = Edit(["weak", "strong"], directions, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    outcome = s.optimise(base, edit, "domain", "text")
    assert outcome.flipped == [True]
    assert credit(outcome.alpha[0], 0) == 1
    assert 0.5 < float(outcome.alpha[0, 1]) <= 0.5 + s.cfg.tolerance and float(outcome.alpha[0, 0]) == 0.0


def test_ties_go_to_a_direction_drawn_with_the_seed():
    from zoom.runner import credit

    row = torch.tensor([1.0, 1.0, 1.0])
    winners = {credit(row, seed) for seed in range(40)}
    assert winners == {0, 1, 2}  # never always the first by position


# ---------------------------------------------------------------------------------------------
# The shapes world: the bracket against a dense grid (a small tools/recall.py)

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))


@pytest.fixture(scope="module")
def world():
    from zoom.config import load_config
    from zoom.models import load_models

    config = load_config("demo")
    return config, load_models(config, torch.device("cpu"))


def test_on_the_world_the_bracket_finds_what_a_dense_grid_finds(world, domain="blue-triangle", seed=7000):
    """The p = 0.99 classifier on the issue's domain, red and its null twin on 6 seeds: every flip the
    41-point grid over [0, 1] finds, the bracket finds, and the two agree on where: the dense grid says
    the flip lies in (d - 0.025, d], the bracket in (low, strength] with strength - low <= tolerance,
    and the two intervals overlap. (tools/recall.py runs this on more seeds, targets and domains.)"""
    from recall import DENSE_POINTS, DENSE_STEP
    from validate_world import domain_prompts, target_spec

    from zoom.edits import Edits
    from zoom.prompts import load_prompts
    from zoom.targets import load_target

    config, models = world
    prompts = load_prompts(domain_prompts(domain)["prompts"])
    target = load_target(target_spec(0.99))
    criterion = make_criterion("multiclass", None, "circle", target.labels)
    edits = Edits(models.generator, models.guide, prompts, seed)
    seeds = list(range(seed, seed + 6))
    found = there = 0
    for arm in [a for a in edits.arms() if a.index == 0]:  # red and its twin
        outcomes = {}
        for kind, search in (("dense", dataclasses.replace(config.search, sweep_points=DENSE_POINTS)),
                             ("bracket", config.search)):
            s = Searcher(models.generator, models.guide, target, criterion, search)
            base = s.base(seeds, prompts.domain)
            edit = edits.edit(arm, seeds)
            outcomes[kind] = s.sweep(base, edit, prompts.domain) if kind == "dense" else \
                s.bracket_search(base, edit, prompts.domain)
        dense, bracket = outcomes["dense"], outcomes["bracket"]
        for i in range(len(seeds)):
            if dense.flipped[i]:
                there += 1
                found += bracket.flipped[i]
                d, strength, low = float(dense.alpha[i, 0]), float(bracket.alpha[i, 0]), float(bracket.low[i, 0])
                assert strength - low <= config.search.tolerance + 1e-9
                assert low < d + 1e-6 and strength > d - DENSE_STEP - 1e-6, (arm.attribute.name, i, low, strength, d)
        print(f"\n{domain} {arm.attribute.name}: dense grid flips {sum(dense.flipped)}, bracket "
              f"{sum(bracket.flipped)}, UNet calls per item {max(bracket.unet_calls)} vs {max(dense.unet_calls)}")
    assert found == there
