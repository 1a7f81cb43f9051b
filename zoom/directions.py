"""Conditioning-space directions for `zoom discover`: the gradient screen and the free direction.

Both work in the space the search edits (zoom/search.py): the text conditioning E(domain), moved along
directions dir = E(prompt) - E(domain).

- gradient_screen: one backward pass per screening seed gives g = d margin / d conditioning at the base
  (alpha = 0); the first-order change of the margin along any direction is then g . dir, for every
  proposal and every null twin at once (no image per proposal). A seed's term is how much of its base
  margin one full edit (alpha_max) would remove to first order, clipped to [-1, 1] so that a seed counts
  at most as one flip (a flip-rate analogue) and a seed with a tiny margin cannot dominate; a proposal's
  score is its mean term minus its null twins' (the twins of zoom/edits.py, same seeds, same norms).
- free_direction: a direction v in conditioning space, unconstrained but for its norm, optimised (Adam,
  the search's relu(margin + kappa) loss) to flip the target on the screening seeds; then named by the
  cosine between the guide CLIP image-embedding change it causes and each proposal's CLIP text direction.
  The easiest way to flip a shape classifier is to draw the other shape: that is the label, not a bias.
  So the image change is kept off the guide CLIP text directions of the proposals that change the label
  (a hinge on its cosine with each, as the search's directional CLIP term, with the opposite sign).
"""

from __future__ import annotations

import time

import torch

from .errors import ZoomError

FREE_STEPS = 30  # optimiser steps of the free direction
FREE_LR = 0.3  # Adam's step, in units of a typical coordinate of a vocabulary direction
FREE_LABEL_WEIGHT = 2.0  # weight of the hinge that keeps the image change off the label's text directions


def _setup(config, seeds, models=None):
    """(models, searcher, edits, base) for the config's prompt set on seeds, through the audit's own loaders."""
    from .edits import Edits
    from .models import configure_threads, load_models, pick_device
    from .prompts import load_prompts
    from .search import Searcher
    from .tasks import base_outputs

    device = pick_device(config)
    models = models or load_models(config, device)
    configure_threads(device, models.generator)
    prompts = load_prompts(config.prompts)
    edits = Edits(models.generator, models.guide, prompts, config.search.seed)
    searcher = Searcher(models.generator, models.guide, models.target, models.criterion, config.search,
                        config.precision)
    with base_outputs(models.criterion):
        base = searcher.base(list(seeds), prompts.domain)
    return models, searcher, edits, base


def _margin_gradient(searcher, base, domain: str, rows: list[int]):
    """(g [b, T, D], loop margin [b]): the margin's gradient w.r.t. each seed's conditioning at alpha = 0."""
    from .search import Edit

    embeds = searcher.generator.embed(domain)
    cond = embeds.expand(len(rows), -1, -1).clone().requires_grad_(True)
    still = Edit(["base"], torch.zeros_like(embeds), None)  # no edit: the gradient is taken at the base
    _, _, logits = searcher._render([base.seeds[i] for i in rows], torch.zeros(len(rows), 1, device=cond.device),
                                    still, cond)
    margin = searcher.criterion.margin(logits, base.loop_pred[rows])
    # Seeds are independent in the batch, so the summed margin's gradient is each seed's own.
    (grad,) = torch.autograd.grad(margin.sum(), cond)
    return grad.float(), margin.detach().float()


def gradient_screen(config, seeds: list[int], models=None) -> dict:
    """Scores {name: {score, derivative, null_derivative, n}} of every attribute of config.prompts on seeds,
    and the cost (UNet calls: one forward and one backward pass per seed, each counted as `steps` calls)."""
    from .edits import Arm

    start = time.perf_counter()
    models, searcher, edits, base = _setup(config, seeds, models)
    B, step = len(base.seeds), config.search.batch_size
    alpha_max = config.search.alpha_max
    K = len(edits.directions)
    mine = torch.zeros(B, K)  # per seed and proposal: share of the margin a full edit removes, to first order
    null = torch.zeros(B, K)
    for first in range(0, B, step):
        rows = list(range(first, min(B, first + step)))
        grad, margin = _margin_gradient(searcher, base, edits.prompts.domain, rows)
        scale = alpha_max / margin.clamp_min(1e-6)
        seeds = [base.seeds[i] for i in rows]
        for k, attribute in enumerate(edits.prompts.attributes):
            own = -(grad * edits.directions[k]).flatten(1).sum(1)
            twin = edits.edit(Arm(attribute, k, pair=attribute.name), seeds).directions[:, 0]
            other = -(grad * twin).flatten(1).sum(1)
            mine[rows, k] = (own * scale).clamp(-1, 1).cpu()
            null[rows, k] = (other * scale).clamp(-1, 1).cpu()
    scores = {a.name: {"score": round(float((mine[:, k] - null[:, k]).mean()), 6),
                       "derivative": round(float(mine[:, k].mean()), 6),
                       "null_derivative": round(float(null[:, k].mean()), 6), "n": B}
              for k, a in enumerate(edits.prompts.attributes)}
    calls = 2 * B * models.generator.steps
    return {"scores": scores, "cost": {"counterfactuals": 0, "unet_calls": calls,
                                       "search_seconds": round(time.perf_counter() - start, 2)}}


def free_direction(config, seeds: list[int], models=None, keep_out: tuple[str, ...] = (),
                   steps: int = FREE_STEPS) -> dict:
    """A direction v with |v| <= alpha_max * (the median attribute direction's norm) that flips the target
    on `seeds`, and the attributes of config.prompts nearest to it in the guide CLIP's space. keep_out: the
    attributes (by name) that change the label, whose CLIP text directions the image change must avoid.

    Returns {norm, bound, flipped, of, steps, nearest: [{name, cosine, conditioning_cosine}] (all, best
    first), cost}."""
    from .search import Edit

    start = time.perf_counter()
    models, searcher, edits, base = _setup(config, seeds, models)
    domain, cfg = edits.prompts.domain, config.search
    embeds = searcher.generator.embed(domain)
    norms = torch.stack([d.norm() for d in edits.directions])
    bound = float(cfg.alpha_max * norms.median())
    # Adam moves every coordinate by about lr: the parameter is in units of a typical coordinate of a
    # vocabulary direction, so that lr means the same for any text encoder.
    unit = float(norms.median()) / embeds.numel() ** 0.5
    w = torch.zeros_like(embeds, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=FREE_LR)
    idx = torch.arange(len(base.seeds), device=embeds.device)
    ones = torch.ones(len(base.seeds), 1, device=embeds.device)
    names = [a.name for a in edits.prompts.attributes]
    label_dirs = [edits.text_dirs[names.index(n)] for n in keep_out]
    best, evaluations = (-1, float("inf"), torch.zeros_like(embeds)), 0
    for step in range(steps + 1):
        v = w * unit
        _, images, logits, loss = searcher.objective(base, idx, Edit(["free"], v, None), embeds, ones, None,
                                                     use_text=False)
        if label_dirs:
            with searcher.autocast():
                change = searcher.guide.embed_images(images).float() - base.guide_emb
            change = change / change.norm(dim=-1, keepdim=True).clamp_min(1e-4)  # guarded as directional_loss
            loss = loss + FREE_LABEL_WEIGHT * torch.relu(change @ torch.stack(label_dirs).T).sum(-1)
        evaluations += 1
        flipped = int((searcher.criterion.margin(logits.detach(), base.loop_pred) < 0).sum())
        total = float(loss.detach().sum())
        if step and (flipped, -total) > (best[0], -best[1]):  # (step 0 is v = 0: no direction)
            best = (flipped, total, v.detach().clone())
        if step == steps or flipped == len(base.seeds):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        with torch.no_grad():  # project onto the norm ball
            w.mul_((bound / unit / w.norm().clamp_min(1e-12)).clamp(max=1.0))
    flipped, _, v = best
    if float(v.norm()) == 0:
        raise ZoomError("the free direction did not move: the target's margin has no gradient on the screening seeds")
    # The image change v causes, seen by the guide CLIP, compared with each attribute's CLIP text direction.
    with torch.no_grad():
        _, images, _ = searcher._render(base.seeds, ones, Edit(["free"], v, None), embeds)
        change = torch.nn.functional.normalize(searcher.guide.embed_images(images).float() - base.guide_emb, dim=-1)
        change = torch.nn.functional.normalize(change.mean(0), dim=-1)
        cosines = [float(change @ t) for t in edits.text_dirs]
        cond = [float(torch.nn.functional.cosine_similarity(v.flatten(), d.flatten(), dim=0)) for d in edits.directions]
    nearest = sorted(({"name": a.name, "cosine": round(c, 4), "conditioning_cosine": round(cc, 4)}
                      for a, c, cc in zip(edits.prompts.attributes, cosines, cond)), key=lambda r: -r["cosine"])
    calls = (2 * evaluations - 1) * len(base.seeds) * models.generator.steps  # forward + backward but the last
    return {"norm": round(float(v.norm()), 4), "bound": round(bound, 4), "flipped": flipped, "of": len(base.seeds),
            "steps": evaluations - 1, "nearest": nearest,
            "cost": {"counterfactuals": 0, "unet_calls": calls, "search_seconds": round(time.perf_counter() - start, 2)}}
