"""The counterfactual search over a batch of seeds.

For each seed the base image is the generator's output for the domain prompt. An *edit* is a set
of directions in the text-conditioning space, `dir_k = E(prompt_k) - E(domain)`; the edited
conditioning is `E(domain) + sum_k alpha_k * dir_k` with |alpha_k| <= alpha_max, plus (edit
spaces `latent` / `both`) a residual `delta` on the initial noise with |delta| <= delta_max |noise|.

- `optimise` (modes `single` with one direction, `joint` with all of them): Adam on alpha/delta
  only (every model is frozen) minimising
      relu(margin + kappa) + lambda_clip * directional CLIP loss + lambda_alpha * |alpha|_1
      + lambda_delta * |delta| / |noise|,
  where margin > 0 while the target keeps its base decision. Each sample stops at the first
  evaluation that flips it; its strength at that point is recorded.
- `sweep`: no gradients; the target along a grid of alpha in [-alpha_max, alpha_max].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .guide import directional_loss

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
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

    def _confirm_with_full_vae(self, outcome: "Outcome", latents: torch.Tensor, base: "Base") -> None:
        """With a fast loop decoder, the verdict and the saved image come from the full VAE."""
        with torch.no_grad(), self.autocast():
            images = self.generator.decode(latents)
            logits = self.target(images).float()
        margin = self.criterion.margin(logits, base.pred)
        outcome.images = images.float()
        outcome.flipped = [bool(f) and bool(m < 0) for f, m in zip(outcome.flipped, margin)]
        outcome.final_pred = self.criterion.decision(logits).tolist()
        outcome.final_prob = self.criterion.base_prob(logits, base.pred).tolist()

    # -----------------------------------------------------------------------------------------
    def base(self, seeds, domain: str) -> Base:
        embeds = self.generator.embed(domain)
        with torch.no_grad(), self.autocast():
            latents = self.generator.sample_latents(seeds, embeds.expand(len(seeds), -1, -1))
            images = self.generator.decode(latents).float()
            logits = self.target(images).float()
            pred = self.criterion.decision(logits)
            prob = self.criterion.base_prob(logits, pred)
            # The CLIP change is measured between images from the same decoder as in the loop.
            loop_pred = pred
            loop_images = images
            if self.generator.loop_decoder is not None:
                loop_images = self.generator.decode(latents, in_loop=True)
                loop_pred = self.criterion.decision(self.target(loop_images).float())
            guide_emb = self.guide.embed_images(loop_images).float()
            noise_norm = self.generator.initial_noise(seeds).flatten(1).norm(dim=1)
        return Base(list(seeds), images, pred, prob, guide_emb, noise_norm, loop_pred)

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

    def optimise(self, base: Base, edit: Edit, domain: str, edit_space: str, item_seeds=None) -> Outcome:
        """Adam on the edit parameters, per-sample early stop at the first flip."""
        cfg, B, K = self.cfg, len(base.seeds), edit.directions.shape[-3]
        embeds = self.generator.embed(domain)
        use_text, use_latent = edit_space in ("text", "both"), edit_space in ("latent", "both")

        alpha = torch.full((B, K), ALPHA_INIT if use_text else 0.0, device=self.device)
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
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        flipped = [False] * B
        steps = [0] * B
        calls = [0] * B
        final_pred = base.pred.tolist()
        final_prob = base.prob.tolist()
        status = ["ok"] * B
        images_out = base.images.clone()
        latents_out = None
        alpha_out = alpha.detach().clone()
        delta_out = torch.zeros(B)
        reach = alpha.detach().abs().clone()  # censoring point of an unflipped seed's strength
        reach_delta = torch.zeros(B)
        per_eval_calls = self.generator.steps

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
                calls[i] += per_eval_calls
                reach[i] = torch.maximum(reach[i], a[j].detach().abs())
                if d is not None:
                    reach_delta[i] = max(float(reach_delta[i]), float(d[j].detach().norm() / base.noise_norm[i]))
                if now_flipped[j] or last or not finite[j]:
                    done[i] = True
                    flipped[i] = bool(now_flipped[j])
                    steps[i] = step
                    final_pred[i] = int(pred[j])
                    final_prob[i] = float(prob[j])
                    images_out[i] = images[j].detach()
                    latents_out[i] = latents[j].detach().float()
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
                done[i], status[i], steps[i] = True, "failed: non-finite loss", step
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
                    alpha.clamp_(-cfg.alpha_max, cfg.alpha_max)
                    alpha[done] = frozen_alpha[done]
                if delta is not None:
                    limit = cfg.delta_max * base.noise_norm
                    scale = (limit / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                    delta.mul_(scale.view(-1, 1, 1, 1))
                    delta[done] = frozen_delta[done]

        outcome = Outcome(flipped, steps, alpha_out, delta_out.tolist(), final_pred, final_prob,
                          images_out, calls, status, reach=reach, reach_delta=reach_delta.tolist())
        if self.generator.loop_decoder is not None and latents_out is not None:
            self._confirm_with_full_vae(outcome, latents_out, base)
        return outcome

    # -----------------------------------------------------------------------------------------
    def sweep(self, base: Base, edit: Edit, domain: str) -> Outcome:
        """No gradients: the target along alpha in [-alpha_max, alpha_max]; strength = smallest flipping |alpha|."""
        cfg, B = self.cfg, len(base.seeds)
        embeds = self.generator.embed(domain)
        grid = torch.linspace(-cfg.alpha_max, cfg.alpha_max, cfg.sweep_points).tolist()
        order = sorted(range(len(grid)), key=lambda i: (abs(grid[i]), grid[i] < 0))
        curves = [[None] * len(grid) for _ in range(B)]
        flipped, alpha_out = [False] * B, torch.zeros(B, 1)
        final_pred, final_prob = base.pred.tolist(), base.prob.tolist()
        images_out = base.images.clone()
        status = ["ok"] * B
        with torch.no_grad():
            for gi in order:
                value = grid[gi]
                alpha = torch.full((B, 1), value, device=self.device)
                with self.autocast():  # sweeps judge with the full VAE: no gradients to save
                    latents = self.generator.sample_latents(base.seeds, edit.conditioning(embeds, alpha))
                    images = self.generator.decode(latents).float()
                    logits = self.target(images).float()
                pred = self.criterion.decision(logits)
                prob = self.criterion.base_prob(logits, base.pred)
                is_flip = self.criterion.margin(logits, base.pred) < 0
                for i in range(B):
                    curves[i][gi] = [round(value, 6), float(prob[i]), int(pred[i])]
                    if not torch.isfinite(logits[i]).all():
                        status[i] = "failed: non-finite target output"
                    # First flip by increasing |alpha| wins; without any flip show the +alpha_max edit.
                    if not flipped[i] and (is_flip[i] or (gi == len(grid) - 1)):
                        flipped[i] = bool(is_flip[i])
                        alpha_out[i, 0] = value
                        final_pred[i], final_prob[i] = int(pred[i]), float(prob[i])
                        images_out[i] = images[i]
        calls = [len(grid) * self.generator.steps] * B
        reach = torch.full((B, 1), float(max(abs(v) for v in grid)))
        return Outcome(flipped, [len(grid)] * B, alpha_out, [0.0] * B, final_pred, final_prob,
                       images_out, calls, status, reach=reach, reach_delta=[0.0] * B, curves=curves)


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
