"""Edit directions and their null twins (zoom/edits.py): matched in size, searched with the same
objective, pooled over paraphrases, the same on every process."""

import pytest
import torch

from zoom.edits import RANDOM_NULL, Edits
from zoom.prompts import load_prompts

DOMAIN = "a photo of a person's face"
ATTRIBUTES = [{"name": "eyeglasses", "prompt": "a photo of a person's face wearing eyeglasses"},
              {"name": "beard", "prompt": "a photo of a person's face with a beard"}]
PARAPHRASES = ["a picture of a person's face", "an image of a person's face", "a photograph of a person's face"]


def _edits(models, nulls):
    prompts = load_prompts({"domain": DOMAIN, "attributes": ATTRIBUTES, **({"null": nulls} if nulls else {})})
    return Edits(models.generator, models.guide, prompts, seed=0)


@pytest.mark.parametrize("nulls", [PARAPHRASES, None], ids=["paraphrases", "random"])
def test_each_null_twin_is_as_large_as_its_attribute_and_has_a_clip_term(demo_models, nulls):
    edits = _edits(demo_models, nulls)
    seeds = [0, 1, 2, 3, 4, 5]
    arms = edits.arms()
    assert [a.attribute.name for a in arms] == ["eyeglasses", "null", "beard", "null"]
    for attribute, twin in zip(arms[0::2], arms[1::2]):
        assert twin.pair == attribute.attribute.name and twin.attribute.slug == f"null-{attribute.attribute.slug}"
        size = float(edits.edit(attribute, seeds).directions.norm())
        null = edits.edit(twin, seeds)
        assert null.per_sample and null.directions.shape[:2] == (len(seeds), 1)
        for k in range(len(seeds)):  # matched in size, per seed
            assert float(null.directions[k].norm()) == pytest.approx(size, rel=1e-5)
        assert null.text_dirs is not None  # the same loss terms as the attribute: a CLIP direction too
        assert torch.allclose(null.text_dirs.norm(dim=-1), torch.ones(len(seeds), 1), atol=1e-5)
    # paraphrases are pooled: the twin of attribute k on seed s uses paraphrase (s + k) mod P
    if nulls:
        assert [edits.prompt(arms[1], s) for s in seeds] == [PARAPHRASES[s % 3] for s in seeds]
        assert [edits.prompt(arms[3], s) for s in seeds] == [PARAPHRASES[(s + 1) % 3] for s in seeds]
    else:
        assert {edits.prompt(arms[1], s) for s in seeds} == {RANDOM_NULL}
        first, again = edits.edit(arms[1], [3]), _edits(demo_models, None).edit(arms[1], [3])
        assert torch.equal(first.directions, again.directions)  # seeded: every process draws the same
        assert not torch.allclose(edits.edit(arms[1], [4]).directions, first.directions)


def test_a_twin_depends_only_on_its_seed_not_on_its_batch(demo_models):
    edits = _edits(demo_models, PARAPHRASES)
    twin = edits.arms()[1]
    alone = edits.edit(twin, [5]).directions[0]
    batched = edits.edit(twin, [3, 4, 5, 6]).directions[2]
    assert torch.equal(alone, batched)


def test_joint_directions_keep_their_size_and_carry_a_null_slot_of_the_median_size(demo_models):
    """alpha_k = 1 is attribute k's own caption in joint mode too; the null slot is a typical edit."""
    edits = _edits(demo_models, PARAPHRASES)
    edit, attributes = edits.joint([0, 1, 2])
    assert [a.name for a in attributes] == ["eyeglasses", "beard", "null"]
    norms = edit.directions.flatten(2).norm(dim=-1)  # [B, K + 1]
    own = torch.stack([d.norm() for d in edits.directions])
    assert torch.allclose(norms[:, :2], own.expand(3, -1), rtol=1e-5)
    assert torch.allclose(norms[:, 2], own.median().expand(3), rtol=1e-5)
    assert edit.text_dirs.shape == (3, 3, edit.text_dirs.shape[-1])
