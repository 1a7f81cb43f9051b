"""Edit directions: one per attribute, and a null control matched to each of them.

An attribute's direction is `E(attribute prompt) - E(domain)` in the text-conditioning space,
with the guide CLIP's text direction from domain to attribute for the CLIP term.

The null control answers "how often does the search flip the target with an edit of the same
size and the same objective, but no attribute?". So every attribute gets its own null *twin*:
  - the direction of a paraphrase of the domain (`null:` in the prompt file, one or a list; the
    twin of attribute k on seed s uses paraphrase (s + k) mod P, so the null pools over wordings),
    rescaled to the attribute direction's norm, with the paraphrase's CLIP text direction;
  - without paraphrases, a random Gaussian direction of the attribute direction's norm and a
    random unit CLIP direction (seeded per seed and attribute).
The twin is searched exactly like the attribute (same loss terms, bounds and budget), on the same
seeds, so the test against it is paired and compares like with like.

Joint mode optimises all attribute directions at once, plus one null slot (a paraphrase or random
direction per seed, rescaled to the median attribute direction's norm: the size of a typical
attribute edit). Attribute directions keep their own size, so alpha_k = 1 is attribute k's own
caption in joint mode too, and weights, the L1 penalty and the credited share are in those units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ZoomError, shown
from .prompts import NULL_NAME, Attribute
from .search import Edit, random_direction
from .words import check_readable, same_encoding

RANDOM_NULL = "(random direction)"


@dataclass(frozen=True)
class Arm:
    """What one search in single/sweep mode is about: an attribute, or the null twin of one."""

    attribute: Attribute  # records are filed under attribute.name / attribute.slug
    index: int  # the attribute's position in the prompt set
    pair: str | None = None  # a null twin: the name of the attribute it controls

    @property
    def is_null(self) -> bool:
        return self.pair is not None


class Edits:
    def __init__(self, generator, guide, prompts, seed: int = 0):
        self.prompts, self.seed = prompts, seed
        # Words a tokenizer cannot read (load_models checks them as each model loads; this covers models
        # handed in from Python), before any prompt is encoded.
        check_readable(prompts, getattr(getattr(generator, "pipe", None), "tokenizer", None), "generator's tokenizer")
        check_readable(prompts, getattr(guide, "tokenizer", None), "guide CLIP's tokenizer")
        self.domain_embeds = generator.embed(prompts.domain)
        self.directions = [generator.embed(a.prompt) - self.domain_embeds for a in prompts.attributes]
        self.text_dirs = [guide.text_direction(prompts.domain, a.prompt) for a in prompts.attributes]
        self.null_dirs = [generator.embed(p) - self.domain_embeds for p in prompts.nulls]
        self.null_text_dirs = [guide.text_direction(prompts.domain, p) for p in prompts.nulls]
        self.guide_dim = self.text_dirs[0].shape[-1]
        # Prompts compare equal as strings only before tokenizing: past the text encoder's token limit, or
        # where the tokenizer ignores their difference (case), two different prompts can encode to the same
        # conditioning, and their edit would be zero.
        for what, prompt, direction in [*((f"attribute {shown(a.name)}", a.prompt, d)
                                          for a, d in zip(prompts.attributes, self.directions)),
                                        *((f"null paraphrase {shown(p)}", p, d) for p, d in zip(prompts.nulls, self.null_dirs))]:
            if float(direction.norm()) <= 1e-6 * float(self.domain_embeds.norm()):
                raise ZoomError(f"{what}: {same_encoding(generator.pipe.tokenizer, prompt, prompts.domain)}")

    # -- single / sweep --------------------------------------------------------------------
    def arms(self) -> list[Arm]:
        out = []
        for k, a in enumerate(self.prompts.attributes):
            out.append(Arm(a, k))
            out.append(Arm(Attribute(NULL_NAME, self.null_prompt_label(), f"{NULL_NAME}-{a.slug}"), k, pair=a.name))
        return out

    def edit(self, arm: Arm, seeds: list[int]) -> Edit:
        k = arm.index
        if not arm.is_null:
            return Edit([arm.attribute.name], self.directions[k], self.text_dirs[k][None])
        norm = float(self.directions[k].norm())
        dirs, texts = zip(*(self._null(seed, k, norm) for seed in seeds))
        return Edit([NULL_NAME], torch.stack(dirs)[:, None], torch.stack(texts)[:, None])

    def prompt(self, arm: Arm, seed: int) -> str:
        """The prompt an item's record names: the attribute's, or the paraphrase its null twin used."""
        if not arm.is_null:
            return arm.attribute.prompt
        return self.prompts.nulls[self._paraphrase(seed, arm.index)] if self.prompts.nulls else RANDOM_NULL

    def null_prompt_label(self) -> str:
        nulls = self.prompts.nulls
        return RANDOM_NULL if not nulls else nulls[0] if len(nulls) == 1 else " | ".join(nulls)

    # -- joint ------------------------------------------------------------------------------
    def joint(self, seeds: list[int]) -> tuple[Edit, list[Attribute]]:
        """K attribute directions and a null slot per seed of the median attribute direction's norm."""
        common = float(torch.stack([d.norm() for d in self.directions]).median())
        dirs = torch.stack([d[0] for d in self.directions])  # [K, T, D]
        texts = torch.stack(self.text_dirs)
        slot = len(self.directions)
        per_seed = [self._null(seed, slot, common) for seed in seeds]
        directions = torch.cat([dirs[None].expand(len(seeds), -1, -1, -1),
                                torch.stack([d for d, _ in per_seed])[:, None]], dim=1)
        text_dirs = torch.cat([texts[None].expand(len(seeds), -1, -1),
                               torch.stack([t for _, t in per_seed])[:, None]], dim=1)
        names = [a.name for a in self.prompts.attributes] + [NULL_NAME]
        null_attr = Attribute(NULL_NAME, self.null_prompt_label(), NULL_NAME)
        return Edit(names, directions, text_dirs), [*self.prompts.attributes, null_attr]

    def joint_null_prompt(self, seed: int) -> str:
        return self.prompts.nulls[self._paraphrase(seed, len(self.directions))] if self.prompts.nulls else RANDOM_NULL

    # -- the null direction for one seed ------------------------------------------------------
    def _paraphrase(self, seed: int, k: int) -> int:
        return (int(seed) + k) % len(self.prompts.nulls)

    def _null(self, seed: int, k: int, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning direction [T, D] of the given norm, unit guide direction [E]) for seed and slot k."""
        if self.prompts.nulls:
            j = self._paraphrase(seed, k)
            d = self.null_dirs[j][0]
            return d * (norm / float(d.norm().clamp_min(1e-12))), self.null_text_dirs[j]
        draw = 7_919 * (int(seed) - self.seed) + 104_729 * (k + 1) + self.seed  # same on every rank
        d = random_direction(self.domain_embeds[0], norm, seed=draw)
        g = torch.Generator().manual_seed(draw + 1)
        t = torch.randn(self.guide_dim, generator=g).to(d.device)
        return d, t / t.norm()
