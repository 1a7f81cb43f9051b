"""The counterfactual search over a batch of seeds.

For each seed the base image is the generator's output for the domain prompt. An *edit* is a set
of directions in the text-conditioning space, `dir_k = E(prompt_k) - E(domain)`; the edited
conditioning is `E(domain) + sum_k alpha_k * dir_k` with 0 <= alpha_k <= alpha_max (alpha = 1 is
the attribute's own caption; an edit never goes *away* from its attribute), plus (edit spaces
`latent` / `both`) a residual `delta` on the initial noise with |delta| <= delta_max |noise|.

- `bracket` (single mode, text edits: one degree of freedom): forward passes only. The target on a
  coarse grid of alpha in (0, alpha_max], batched over seeds; a seed the grid brought at least
  halfway to its decision boundary without a flip is probed around its closest grid point (step
  halved each round, REFINE_ROUNDS rounds), since a flip can hide in a band narrower than the grid;
  then bisection between the last point that keeps the decision and the first that flips, to
  `tolerance`. The strength is the smallest flipping alpha found, and the flip lies in (low, strength].
- `optimise` (joint mode; latent and both edit spaces): Adam on alpha/delta only (every model is
  frozen) minimising
      relu(margin + kappa) + lambda_clip * directional CLIP loss + lambda_alpha * |alpha|_1
      + lambda_delta * |delta| / |noise|,
  where margin > 0 while the target keeps its base decision, alpha projected to [0, alpha_max]
  after every step. It starts from the brackets: a seed that some direction flips on its own keeps
  that bracket's flip (its smallest edit); the others start at the best direction's most
  decision-moving grid point. Each sample stops at the first evaluation that flips it.
- `sweep`: no gradients; the target along a grid of alpha in [0, alpha_max] (dose-response).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from .guide import directional_loss

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
REFINE_ROUNDS = 3  # bracket: probe rounds around the closest grid point (2 probes each, step halved)
REFINE_SHARE = 0.5  # ... for seeds whose grid margin fell to at most this share of the base margin
ALPHA_INIT = 0.05  # start off zero: the directional loss is undefined at zero change
DELTA_INIT = 1e-3  # relative norm of the initial latent residual


@dataclass
class Base:
    """What the search needs to know about the seeds' base images."""

    seeds: list[int]
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    pred: torch.Tensor  # [B] base decision
    prob: torch.Tensor  # [B] probability of the base decision
    guide_emb: torch.Tensor  # [B, D] guide CLIP embedding
    noise_norm: torch.Tensor  # [B] norm of the initial noise (unit of the latent residual)
    loop_pred: torch.Tensor  # [B] base decision on the loop decoder's image (= pred without one)
    margin: torch.Tensor  # [B] the target's margin for its base decision on the base image


@dataclass
class Edit:
    """One or more directions in conditioning space and the CLIP text directions that go with them.

    Directions are shared by the batch ([K, T, D], text_dirs [K, E]) or given per sample
    ([B, K, T, D], [B, K, E]): the null control draws a different paraphrase for each seed.
    """

    names: list[str]
    directions: torch.Tensor
    text_dirs: torch.Tensor | None  # unit vectors in guide space; None: no CLIP term

    @property
    def per_sample(self) -> bool:
        return self.directions.dim() == 4

    def take(self, idx: torch.Tensor) -> "Edit":
        """The edit for the samples idx of the batch."""
        if not self.per_sample:
            return self
        return Edit(self.names, self.directions[idx], None if self.text_dirs is None else self.text_dirs[idx])

    def conditioning(self, embeds: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """E(domain) + sum_k alpha_k dir_k for per-sample weights alpha [B, K] -> [B, T, D]."""
        pattern = "bk,bktd->btd" if self.per_sample else "bk,ktd->btd"
        return embeds + torch.einsum(pattern, alpha, self.directions)

    def text_direction(self, alpha: torch.Tensor) -> torch.Tensor:
        """The CLIP-space direction the image should move along: the alpha-weighted text directions."""
        pattern = "bk,bke->be" if self.per_sample else "bk,ke->be"
        return torch.nn.functional.normalize(torch.einsum(pattern, alpha, self.text_dirs), dim=-1)


@dataclass
class Outcome:
    """Per-sample results of one search (lists of length B)."""

    flipped: list[bool]
    steps: list[int]
    alpha: torch.Tensor  # [B, K]
    delta_rel: list[float]  # |delta| / |noise|
    final_pred: list[int]
    final_prob: list[float]  # probability of the *base* decision at the final edit
    images: torch.Tensor  # [B, 3, H, W] counterfactual images
    unet_calls: list[int]
    status: list[str]
    reach: torch.Tensor | None = None  # [B, K] largest |alpha_k| the search evaluated
    reach_delta: list[float] | None = None  # largest |delta| / |noise| the search evaluated
    curves: list[list] | None = None  # sweep: [[alpha, base_prob, pred], ...] per sample
    low: torch.Tensor | None = None  # [B, K] the largest alpha known to keep the decision (NaN: unknown)
    monotone: list[bool] | None = None  # False: the decision came back further along the grid

    def part(self, rows: slice) -> "Outcome":
        """The outcome of the samples `rows` of the batch."""
        def cut(x):
            return None if x is None else x[rows]

        return Outcome(*(cut(getattr(self, f.name)) for f in dataclasses.fields(self)))


@dataclass
class Bracket:
    """One direction's bracketing search (lists of length B). A flipped seed flips in (low, high];
    an unflipped one kept its decision on the whole grid, where `start` had the smallest margin."""

    flipped: list[bool]
    low: list[float]
    high: list[float]  # the smallest flipping alpha found (alpha_max when unflipped)
    start: list[float]  # flipped: low; unflipped: the grid point with the smallest margin
    min_margin: list[float]
    monotone: list[bool]
    final_pred: list[int]
    final_prob: list[float]
    images: torch.Tensor  # at high (unflipped: at alpha_max)
    evaluations: list[int]
    status: list[str]


class Searcher:
    def __init__(self, generator, guide, target, criterion, config, precision="fp32"):
        self.generator, self.guide, self.target, self.criterion = generator, guide, target, criterion
        self.cfg = config  # SearchConfig
        self.precision = precision
        self.device = generator.device

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISION_DTYPES[self.precision])

    def _render(self, seeds, alpha, edit: Edit, domain_embeds, delta=None):
        """Per-sample weights alpha [b, K] (and latent residual delta) -> (latents, loop images, logits)."""
        cond = edit.conditioning(domain_embeds, alpha)
        with self.autocast():
            latents = self.generator.sample_latents(seeds, cond, delta)
            images = self.generator.decode(latents, in_loop=True)
            logits = self.target(images)
        return latents, images.float(), logits.float()

    def _confirm_with_full_vae(self, outcome: "Outcome", latents: torch.Tensor, base: "Base", idx: list[int]) -> None:
        """With a fast loop decoder, the verdict and the saved image of the seeds decided in the loop
        (idx) come from the full VAE."""
        if not idx:
            return
        sub = torch.tensor(idx, device=self.device)
        with torch.no_grad(), self.autocast():
            images = self.generator.decode(latents[sub])
            logits = self.target(images).float()
        margin = self.criterion.margin(logits, base.pred[sub])
        pred = self.criterion.decision(logits).tolist()
        prob = self.criterion.base_prob(logits, base.pred[sub]).tolist()
        for j, i in enumerate(idx):
            outcome.images[i] = images[j].float()
            outcome.flipped[i] = bool(outcome.flipped[i]) and bool(margin[j] < 0)
            outcome.final_pred[i], outcome.final_prob[i] = pred[j], prob[j]

    def _evaluate(self, seeds, edit: Edit, embeds, alpha):
        """Forward only, with the full VAE: (images, logits) at per-sample weights alpha [b, K]."""
        with torch.no_grad(), self.autocast():
            latents = self.generator.sample_latents(seeds, edit.conditioning(embeds, alpha))
            images = self.generator.decode(latents).float()
            logits = self.target(images).float()
        return images, logits

    def _judge_rows(self, base: Base, edit: Edit, embeds, one_hot, rows: list[int], alphas: list[float]):
        """The bracket's one forward pass: seeds `rows` of the batch, each at its alpha along `one_hot`
        -> (images, margin, decision, base probability), the criterion asked in that order."""
        idx = torch.tensor(rows, device=self.device)
        alpha = torch.tensor(alphas, device=self.device)[:, None] * one_hot
        images, logits = self._evaluate([base.seeds[i] for i in rows], edit.take(idx), embeds, alpha)
        margin = self.criterion.margin(logits, base.pred[idx])
        return images, margin, self.criterion.decision(logits), self.criterion.base_prob(logits, base.pred[idx])

    def grid(self) -> list[float]:
        """The bracket's coarse grid: grid_points evenly spaced alphas in (0, alpha_max]."""
        n = self.cfg.grid_points
        return [self.cfg.alpha_max * (i + 1) / n for i in range(n)]

    def bisections(self) -> int:
        """Bisection steps that shrink one grid interval to at most `tolerance`."""
        return max(0, math.ceil(math.log2(self.cfg.alpha_max / self.cfg.grid_points / self.cfg.tolerance)))

    def bracket(self, base: Base, edit: Edit, domain: str, arm: int = 0) -> Bracket:
        """Direction `arm` of the edit alone, forward passes only: its weight on the coarse grid (all
        seeds batched), then bisection of each flipped seed's first flipping interval."""
        B, K = len(base.seeds), edit.directions.shape[-3]
        embeds = self.generator.embed(domain)
        one_hot = torch.zeros(K, device=self.device)
        one_hot[arm] = 1.0
        flipped, monotone = [False] * B, [True] * B
        low, high, start = [0.0] * B, [self.cfg.alpha_max] * B, [self.cfg.alpha_max] * B
        min_margin = [math.inf] * B
        final_pred, final_prob = base.pred.tolist(), base.prob.tolist()
        images_out = base.images.clone()
        status = ["ok"] * B
        grid = self.grid()
        # 1. The coarse grid, every seed at every point (a flip that comes back is seen).
        for value in grid:
            images, margin, pred, prob = self._judge_rows(base, edit, embeds, one_hot, list(range(B)), [value] * B)
            for i in range(B):
                if not torch.isfinite(margin[i]):
                    status[i] = "failed: non-finite target output"
                    continue
                m = float(margin[i])
                if flipped[i]:
                    monotone[i] = monotone[i] and m < 0
                    continue
                if m < 0:
                    flipped[i], high[i] = True, value
                    final_pred[i], final_prob[i], images_out[i] = int(pred[i]), float(prob[i]), images[i]
                    continue
                low[i] = value
                if m < min_margin[i]:
                    min_margin[i], start[i] = m, value
                if value == grid[-1]:
                    final_pred[i], final_prob[i], images_out[i] = int(pred[i]), float(prob[i]), images[i]
        evaluations = [len(grid)] * B
        # 2. A seed whose grid came at least halfway to the boundary without crossing it is probed
        # around its closest point, the step halved each round: a flip confined to a band narrower than
        # the grid's spacing hides near where the margin dips. Null twins get the same probes.
        kept = [[value for value in grid if value <= low[i]] for i in range(B)]
        step = self.cfg.alpha_max / len(grid) / 2
        for _ in range(REFINE_ROUNDS):
            idx = [i for i in range(B) if not flipped[i] and status[i] == "ok"
                   and min_margin[i] <= REFINE_SHARE * float(base.margin[i])]
            probes = [(i, a) for i in idx for a in (start[i] - step, start[i] + step) if 0 < a <= self.cfg.alpha_max]
            if not probes:
                break
            images, margin, pred, prob = self._judge_rows(base, edit, embeds, one_hot, [i for i, _ in probes],
                                                          [a for _, a in probes])
            for j, (i, a) in enumerate(probes):
                evaluations[i] += 1
                m = float(margin[j])
                if not math.isfinite(m):
                    status[i] = "failed: non-finite target output"
                elif m < 0 and (not flipped[i] or a < high[i]):
                    flipped[i], high[i], monotone[i] = True, a, False  # the grid above it kept the decision
                    final_pred[i], final_prob[i], images_out[i] = int(pred[j]), float(prob[j]), images[j]
                elif m >= 0:
                    kept[i].append(a)
                    if m < min_margin[i]:
                        min_margin[i], start[i] = m, a
            for i in idx:
                if flipped[i]:
                    low[i] = max([a for a in kept[i] if a < high[i]], default=0.0)
            step /= 2
        # 3. Bisection inside each flipped seed's first flipping interval (low, high].
        for _ in range(self.bisections()):
            idx = [i for i in range(B) if flipped[i] and status[i] == "ok" and high[i] - low[i] > self.cfg.tolerance]
            if not idx:
                break
            mid = [(low[i] + high[i]) / 2 for i in idx]
            images, margin, pred, prob = self._judge_rows(base, edit, embeds, one_hot, idx, mid)
            for j, i in enumerate(idx):
                evaluations[i] += 1
                if not torch.isfinite(margin[j]):
                    status[i] = "failed: non-finite target output"
                elif margin[j] < 0:
                    high[i] = float(mid[j])
                    final_pred[i], final_prob[i], images_out[i] = int(pred[j]), float(prob[j]), images[j]
                else:
                    low[i] = float(mid[j])
        for i in range(B):
            if flipped[i]:
                start[i] = low[i]
        return Bracket(flipped, low, high, start, min_margin, monotone, final_pred, final_prob, images_out,
                       evaluations, status)

    def bracket_arms(self, base: Base, edits: list[Edit], domain: str) -> list[Outcome]:
        """bracket_search for several edits of the same seeds in one batch (forward passes are cheaper
        per image in larger batches); every number is per sample, so it equals searching them apart."""
        B, n = len(base.seeds), len(edits)
        if n == 1:
            return [self.bracket_search(base, edits[0], domain)]
        stacked = Base(base.seeds * n, *(t.repeat(n, *([1] * (t.dim() - 1))) for t in
                                         (base.images, base.pred, base.prob, base.guide_emb, base.noise_norm,
                                          base.loop_pred, base.margin)))
        per_sample = [e if e.per_sample else Edit(e.names, e.directions.expand(B, -1, -1, -1),
                                                  e.text_dirs.expand(B, -1, -1)) for e in edits]
        edit = Edit(edits[0].names, torch.cat([e.directions for e in per_sample]),
                    torch.cat([e.text_dirs for e in per_sample]))
        both = self.bracket_search(stacked, edit, domain)
        return [both.part(slice(a * B, (a + 1) * B)) for a in range(n)]

    def bracket_search(self, base: Base, edit: Edit, domain: str) -> Outcome:
        """Single mode, text edits: the bracket as the search's outcome."""
        b = self.bracket(base, edit, domain)
        calls = [n * self.generator.steps for n in b.evaluations]
        return Outcome([f and s == "ok" for f, s in zip(b.flipped, b.status)], b.evaluations,
                       torch.tensor(b.high)[:, None], [0.0] * len(b.high), b.final_pred, b.final_prob, b.images,
                       calls, b.status, reach=torch.full((len(b.high), 1), self.cfg.alpha_max),
                       reach_delta=[0.0] * len(b.high), low=torch.tensor(b.low)[:, None], monotone=b.monotone)

    # -----------------------------------------------------------------------------------------
    def base(self, seeds, domain: str) -> Base:
        embeds = self.generator.embed(domain)
        with torch.no_grad(), self.autocast():
            latents = self.generator.sample_latents(seeds, embeds.expand(len(seeds), -1, -1))
            images = self.generator.decode(latents).float()
            logits = self.target(images).float()
            pred = self.criterion.decision(logits)
            prob = self.criterion.base_prob(logits, pred)
            margin = self.criterion.margin(logits, pred)
            # The CLIP change is measured between images from the same decoder as in the loop.
            loop_pred = pred
            loop_images = images
            if self.generator.loop_decoder is not None:
                loop_images = self.generator.decode(latents, in_loop=True)
                loop_pred = self.criterion.decision(self.target(loop_images).float())
            guide_emb = self.guide.embed_images(loop_images).float()
            noise_norm = self.generator.initial_noise(seeds).flatten(1).norm(dim=1)
        return Base(list(seeds), images, pred, prob, guide_emb, noise_norm, loop_pred, margin)

    # -----------------------------------------------------------------------------------------
    def objective(self, base: Base, idx: torch.Tensor, edit: Edit, embeds, alpha, delta, use_text=True):
        """Images, logits and the per-sample loss for the samples idx of base at edit (alpha, delta).

        loss = relu(margin + kappa) + lambda_clip * directional CLIP loss
               + lambda_alpha * |alpha|_1 + lambda_delta * |delta| / |noise|
        """
        cfg = self.cfg
        seeds = [base.seeds[i] for i in idx.tolist()]
        edit = edit.take(idx)
        latents, images, logits = self._render(seeds, alpha, edit, embeds, delta)
        # In the loop, a flip is a change of the loop image's decision; the full VAE confirms it after.
        loss = torch.relu(self.criterion.margin(logits, base.loop_pred[idx]) + cfg.kappa)
        if cfg.lambda_clip and edit.text_dirs is not None:
            with self.autocast():
                emb = self.guide.embed_images(images).float()
            if use_text:  # the image should change the way the weighted text directions do
                text_dir = edit.text_direction(alpha)
            else:
                text_dir = edit.text_direction(torch.ones_like(alpha))
            loss = loss + cfg.lambda_clip * directional_loss(emb, base.guide_emb[idx], text_dir)
        if use_text:
            loss = loss + cfg.lambda_alpha * alpha.abs().sum(-1)
        if delta is not None:
            loss = loss + cfg.lambda_delta * delta.flatten(1).norm(dim=1) / base.noise_norm[idx]
        return latents, images, logits, loss

    def _start_from_brackets(self, base: Base, brackets: list[Bracket]):
        """Per seed: the direction whose bracket flipped it with the smallest alpha (settled: the
        search keeps that flip), or else the start point of the direction whose grid came closest to a
        flip. Ties go to a direction drawn with the seed, so no direction (the null slot included) is
        favoured by its position."""
        B, K = len(base.seeds), len(brackets)
        alpha0 = torch.full((B, K), ALPHA_INIT)
        settled = {}
        for i, seed in enumerate(base.seeds):
            ok = [k for k in range(K) if brackets[k].status[i] == "ok"]
            flipped = [k for k in ok if brackets[k].flipped[i]]
            if flipped:
                best = min(brackets[k].high[i] for k in flipped)
                settled[i] = tie_break([k for k in flipped if brackets[k].high[i] <= best + 1e-9], seed)
            elif ok:
                best = min(brackets[k].min_margin[i] for k in ok)
                k = tie_break([k for k in ok if brackets[k].min_margin[i] <= best + 1e-9 * (1 + abs(best))], seed)
                alpha0[i, k] = max(brackets[k].start[i], ALPHA_INIT)
        return alpha0.to(self.device), settled

    def optimise(self, base: Base, edit: Edit, domain: str, edit_space: str, item_seeds=None) -> Outcome:
        """Adam on the edit parameters from the brackets' start, per-sample early stop at the first flip."""
        cfg, B, K = self.cfg, len(base.seeds), edit.directions.shape[-3]
        embeds = self.generator.embed(domain)
        use_text, use_latent = edit_space in ("text", "both"), edit_space in ("latent", "both")

        # 1. Each direction's own bracket (forward passes): where they flip alone, and where to start.
        brackets = [self.bracket(base, edit, domain, k) for k in range(K)] if use_text else []
        settled = {}
        if use_text:
            alpha, settled = self._start_from_brackets(base, brackets)
        else:
            alpha = torch.zeros((B, K), device=self.device)
        delta = None
        params = []
        if use_text:
            alpha.requires_grad_(True)
            params.append(alpha)
        if use_latent:
            # A small seeded start: the CLIP change direction is undefined at exactly zero.
            noise_shape = self.generator.initial_noise(base.seeds[:1]).shape[1:]
            starts = []
            for s in (item_seeds or base.seeds):
                g = torch.Generator().manual_seed(int(s) + 1_000_003)
                starts.append(torch.randn(noise_shape, generator=g))
            delta = torch.stack(starts).to(self.device)
            delta = delta * (DELTA_INIT * base.noise_norm / delta.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
            delta.requires_grad_(True)
            params.append(delta)
        optimizer = torch.optim.Adam(params, lr=cfg.lr)  # edit parameters and Adam state stay fp32
        # 2**10, not torch's 2**16: a search lasts a few steps, and each overflow skips one (from 2**16 the
        # tiny models skipped 6 of 8)
        scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** 10, enabled=self.precision == "fp16")

        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        flipped = [False] * B
        evaluations = [sum(b.evaluations[i] for b in brackets) for i in range(B)]
        final_pred = base.pred.tolist()
        final_prob = base.prob.tolist()
        status = ["ok"] * B
        images_out = base.images.clone()
        latents_out = None
        in_loop = [False] * B  # decided on the loop decoder's image: the full VAE confirms it after
        alpha_out = alpha.detach().clone()
        low = torch.full((B, K), float("nan"))
        delta_out = torch.zeros(B)
        # censoring point of an unflipped seed's strength: the brackets reached alpha_max on every direction
        reach = torch.full((B, K), cfg.alpha_max) if use_text else alpha.detach().abs().clone()
        reach_delta = torch.zeros(B)
        for i, k in settled.items():  # a direction alone flips it: its bracket is the outcome
            b = brackets[k]
            done[i], flipped[i] = True, True
            final_pred[i], final_prob[i], images_out[i] = b.final_pred[i], b.final_prob[i], b.images[i]
            alpha_out[i] = 0.0
            alpha_out[i, k] = b.high[i]
            low[i, k] = b.low[i]
        for i in range(B):
            if brackets and all(b.status[i] != "ok" for b in brackets):
                done[i], status[i] = True, brackets[0].status[i]

        for step in range(cfg.max_steps + 1):
            active = (~done).nonzero()[:, 0]
            if len(active) == 0:
                break
            a = alpha[active]
            d = delta[active] if delta is not None else None
            latents, images, logits, loss = self.objective(base, active, edit, embeds, a, d, use_text)
            if latents_out is None:
                latents_out = torch.zeros((B, *latents.shape[1:]), device=self.device)
            margin = self.criterion.margin(logits, base.loop_pred[active]).detach()
            pred = self.criterion.decision(logits)
            prob = self.criterion.base_prob(logits, base.pred[active]).detach()
            finite = torch.isfinite(margin)
            now_flipped = (margin < 0) & finite
            last = step == cfg.max_steps
            for j, i in enumerate(active.tolist()):
                evaluations[i] += 1
                reach[i] = torch.maximum(reach[i], a[j].detach().abs().cpu())
                if d is not None:
                    reach_delta[i] = max(float(reach_delta[i]), float(d[j].detach().norm() / base.noise_norm[i]))
                if now_flipped[j] or last or not finite[j]:
                    done[i] = True
                    flipped[i] = bool(now_flipped[j])
                    final_pred[i] = int(pred[j])
                    final_prob[i] = float(prob[j])
                    images_out[i] = images[j].detach()
                    latents_out[i] = latents[j].detach().float()
                    in_loop[i] = True
                    alpha_out[i] = a[j].detach()
                    if d is not None:
                        delta_out[i] = float(d[j].detach().norm() / base.noise_norm[i])
                    if not finite[j]:
                        status[i] = "failed: non-finite target output"
            keep = (~now_flipped) & finite
            if last or not keep.any():
                break

            bad = keep & ~torch.isfinite(loss.detach())
            for j in bad.nonzero()[:, 0].tolist():
                i = int(active[j])
                done[i], status[i] = True, "failed: non-finite loss"
            keep = keep & ~bad
            if not keep.any():
                continue
            # Summed over the samples still searching, so each sample's gradient is its own.
            loss = torch.where(keep, loss, torch.zeros_like(loss)).sum()

            frozen_alpha = alpha.detach().clone()
            frozen_delta = delta.detach().clone() if delta is not None else None
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # loss scaling only under fp16 (a no-op otherwise)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                if use_text:
                    alpha.clamp_(0.0, cfg.alpha_max)  # toward the attribute, never away from it
                    alpha[done] = frozen_alpha[done]
                if delta is not None:
                    limit = cfg.delta_max * base.noise_norm
                    scale = (limit / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                    delta.mul_(scale.view(-1, 1, 1, 1))
                    delta[done] = frozen_delta[done]

        calls = [n * self.generator.steps for n in evaluations]
        outcome = Outcome(flipped, evaluations, alpha_out, delta_out.tolist(), final_pred, final_prob,
                          images_out, calls, status, reach=reach, reach_delta=reach_delta.tolist(),
                          low=low if use_text else None)
        if self.generator.loop_decoder is not None and latents_out is not None:
            self._confirm_with_full_vae(outcome, latents_out, base, [i for i in range(B) if in_loop[i]])
        return outcome

    # -----------------------------------------------------------------------------------------
    def sweep(self, base: Base, edit: Edit, domain: str) -> Outcome:
        """No gradients: the target along alpha in [0, alpha_max]; strength = the first flipping alpha."""
        cfg, B = self.cfg, len(base.seeds)
        embeds = self.generator.embed(domain)
        grid = torch.linspace(0.0, cfg.alpha_max, cfg.sweep_points).tolist()
        # alpha = 0 is the base image itself: its point of the curve needs no pass
        curves = [[[0.0, float(base.prob[i]), int(base.pred[i])]] for i in range(B)]
        flipped, monotone = [False] * B, [True] * B
        alpha_out, low = torch.full((B, 1), cfg.alpha_max), torch.zeros(B, 1)
        final_pred, final_prob = base.pred.tolist(), base.prob.tolist()
        images_out = base.images.clone()
        status = ["ok"] * B
        for value in grid[1:]:
            images, logits = self._evaluate(base.seeds, edit, embeds, torch.full((B, 1), value, device=self.device))
            pred = self.criterion.decision(logits)
            prob = self.criterion.base_prob(logits, base.pred)
            is_flip = self.criterion.margin(logits, base.pred) < 0
            for i in range(B):
                curves[i].append([round(value, 6), float(prob[i]), int(pred[i])])
                if not torch.isfinite(logits[i]).all():
                    status[i] = "failed: non-finite target output"
                if flipped[i]:
                    monotone[i] = monotone[i] and bool(is_flip[i])
                elif is_flip[i] or value == grid[-1]:  # first flip wins; without one show the alpha_max edit
                    flipped[i] = bool(is_flip[i])
                    alpha_out[i, 0] = value
                    final_pred[i], final_prob[i] = int(pred[i]), float(prob[i])
                    images_out[i] = images[i]
                if not flipped[i]:
                    low[i, 0] = value
        evaluations = [len(grid) - 1] * B
        calls = [n * self.generator.steps for n in evaluations]
        return Outcome(flipped, evaluations, alpha_out, [0.0] * B, final_pred, final_prob, images_out, calls, status,
                       reach=torch.full((B, 1), cfg.alpha_max), reach_delta=[0.0] * B, curves=curves, low=low,
                       monotone=monotone)


def tie_break(candidates: list[int], seed: int) -> int:
    """One of several equally good directions, drawn with the seed: never the first by position."""
    if len(candidates) == 1:
        return candidates[0]
    return candidates[int(torch.randint(len(candidates), (1,), generator=torch.Generator().manual_seed(int(seed))))]


def strength(alpha_row, delta_rel: float, edit_space: str) -> float:
    """How far the edit went: |alpha| (summed over directions) or the latent residual's relative norm."""
    if edit_space == "latent":
        return float(delta_rel)
    return float(alpha_row.abs().sum())


def random_direction(like: torch.Tensor, norm: float, seed: int) -> torch.Tensor:
    """A Gaussian direction shaped like `like`, of the given norm (seeded: the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(like.shape, generator=g).to(like.device)
    return v * (norm / v.norm())
