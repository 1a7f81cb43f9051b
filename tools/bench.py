"""Measure zoom's search: speed, UNet calls, where the time goes, and the engine's overhead.

    python tools/bench.py --tiny                       # CPU, the tiny offline models
    python tools/bench.py --full-size --precision bf16 # GPU, sd-turbo-class shapes with random weights

Prints one JSON line:
- counterfactuals_per_s, steps_per_counterfactual, unet_calls_per_counterfactual (medians) from the
  default search (single mode, text edits: the bracket, forward passes only) on a *planted* target (a
  readout along one attribute's mean image change, the null's projected out; the real target still
  runs, at weight 0, so its cost counts) over --samples seeds, attribute and null; `by_mode` gives
  the same figures for the gradient searches (single mode with latent+text edits, joint mode);
- time_split: the bare forward+backward time of generator (UNet sampling), decoder, guide and target,
  as shares of their sum;
- overhead_ratio: the engine's step time (Searcher.optimise, nothing stopping early) over the bare
  forward+backward of the same modules chained by hand, measured in the same run;
- cpu_step_s_by_threads (CPU only): the engine's step time with 1 torch thread and with one per core,
  measured in the same run (zoom picks 1 thread for small models, see models.configure_threads);
- peak_memory_bytes (CUDA peak allocated, or the process's peak RSS on CPU), device, precision.
Speed never depends on weights, so full-size models are random.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

DOMAIN = "a photo of a person's face"
ATTRIBUTE = "a photo of a smiling person's face"
NULL = "a picture of a person's face"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=3):
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def tiny_models(device):
    from zoom.config import load_config
    from zoom.models import load_models
    from zoom.tiny import build_tiny_models

    paths = build_tiny_models()
    os.environ["ZOOM_TINY"] = str(paths["sd"].parent)
    config = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    return load_models(config, device), config.search, paths


def full_size_models(device, loop_decoder: bool, resolution: int | None = None):
    """sd-turbo-class UNet/VAE, ViT-B-32 open_clip and ResNet-50, random weights, built in memory."""
    import open_clip
    import torchvision
    from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionPipeline, \
        UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from zoom.config import SearchConfig
    from zoom.generator import Generator
    from zoom.guide import Clip
    from zoom.models import Models
    from zoom.targets import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Target, make_criterion
    from zoom.tiny import build_tiny_models

    shape = json.loads((Path(__file__).parent / "full_size.json").read_text())
    tokenizer = CLIPTokenizer.from_pretrained(build_tiny_models()["sd"] / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**shape["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**shape["text_encoder"])),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**shape["unet"]),
        scheduler=EulerDiscreteScheduler(**shape["scheduler"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    generator = Generator(pipe, steps=1, guidance_scale=0.0, resolution=resolution or shape["resolution"], device=device,
                          loop_decoder=AutoencoderTiny(**shape["taesd"]) if loop_decoder else None)
    clip = open_clip.create_model(shape["guide"], pretrained=None)
    guide = Clip(clip, open_clip.get_tokenizer(shape["guide"]), device, name=shape["guide"])
    model = torchvision.models.get_model(shape["target"], weights=None)
    target = Target(model, Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD)).to(device)
    models = Models(generator, guide, guide, target, make_criterion("multiclass"))
    return models, SearchConfig(batch_size=8, max_steps=20), None


class NeverFlips:
    """Wraps a criterion so no sample ever stops: every step of the timing run does full work."""

    def __init__(self, inner):
        self.inner = inner

    def decision(self, logits):
        return self.inner.decision(logits)

    def base_prob(self, logits, base):
        return self.inner.base_prob(logits, base)

    def margin(self, logits, base):
        return self.inner.margin(logits, base).abs() + 1e3

    def skip_reason(self, base):
        return None


class WithTargetCost(torch.nn.Module):
    """The planted readout's decisions at the real target's cost: the target runs, forward and backward,
    but its logits enter with weight 0."""

    def __init__(self, readout, target):
        super().__init__()
        self.readout, self.target = readout, target

    def forward(self, images):
        return self.readout(images) + 0 * self.target(images).sum(-1, keepdim=True)


def planted_target(generator, seeds, real_target):
    from zoom.targets import DirectionReadout, Target

    with torch.no_grad():
        dom = generator.embed(DOMAIN)
        n = len(seeds)
        base = generator.images(seeds, dom.expand(n, -1, -1)).flatten(1)
        change = {}
        for prompt in (ATTRIBUTE, NULL):
            cond = dom + 1.5 * (generator.embed(prompt) - dom)
            change[prompt] = (generator.images(seeds, cond.expand(n, -1, -1)).flatten(1) - base).mean(0)
        null = change[NULL] / change[NULL].norm()
        direction = change[ATTRIBUTE] - (change[ATTRIBUTE] @ null) * null
        direction = direction / direction.norm()
        center = base.mean(0)
        spread = float(((base - center) @ direction).std().clamp_min(1e-6))
    return Target(WithTargetCost(DirectionReadout(direction, center, 2.0 * spread, 4.0 / spread), real_target))


def bare_step_times(models, seeds, precision, device):
    """Forward+backward of each module alone, and of the whole chain, written without the engine."""
    from zoom.search import PRECISION_DTYPES

    gen, guide, target = models.generator, models.guide, models.target
    autocast = (torch.autocast(device.type, dtype=PRECISION_DTYPES[precision]) if precision != "fp32"
                else contextlib.nullcontext())
    n = len(seeds)
    dom = gen.embed(DOMAIN).expand(n, -1, -1)
    direction = gen.embed(ATTRIBUTE) - gen.embed(DOMAIN)
    noise = gen.initial_noise(seeds)
    decoder = gen.loop_decoder or gen.vae

    def unet_sample(cond):
        gen.scheduler.set_timesteps(gen.steps, device=device)
        latents = noise * gen.scheduler.init_noise_sigma
        for t in gen.scheduler.timesteps:
            eps = gen.unet(gen.scheduler.scale_model_input(latents, t), t, encoder_hidden_states=cond).sample
            latents = gen.scheduler.step(eps, t, latents).prev_sample
        return latents

    def decode(latents):
        return (decoder.decode(latents / decoder.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    def generator_only():
        alpha = torch.full((n, 1, 1), 0.1, device=device, requires_grad=True)
        with autocast:
            out = unet_sample(dom + alpha * direction)
        out.float().sum().backward()

    with torch.no_grad(), autocast:
        latents0 = unet_sample(dom)
        images0 = decode(latents0).float()

    def decoder_only():
        latents = latents0.detach().clone().requires_grad_(True)
        with autocast:
            out = decode(latents)
        out.float().sum().backward()

    def guide_only():
        images = images0.clone().requires_grad_(True)
        with autocast:
            out = guide.model.encode_image(guide.preprocess(images))
        out.float().sum().backward()

    def target_only():
        images = images0.clone().requires_grad_(True)
        with autocast:
            out = target(images)
        out.float().sum().backward()

    def chain():
        alpha = torch.full((n, 1, 1), 0.1, device=device, requires_grad=True)
        with autocast:
            images = decode(unet_sample(dom + alpha * direction)).float()
            loss = target(images).float().sum() + guide.model.encode_image(guide.preprocess(images)).float().sum()
        loss.backward()

    split = {name: timed(fn, device) for name, fn in
             [("generator", generator_only), ("decoder", decoder_only), ("guide", guide_only),
              ("target", target_only)]}
    return split, timed(chain, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", action="store_true", help="tiny random models on CPU")
    size.add_argument("--full-size", action="store_true", help="sd-turbo-class shapes, random weights (GPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--samples", type=int, default=16, help="seeds in the planted speed run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--timing-steps", type=int, default=5, help="optimiser steps in the overhead measurement")
    parser.add_argument("--loop-decoder", action="store_true", help="decode with TAESD inside the loop")
    parser.add_argument("--device", default=None)
    parser.add_argument("--resolution", type=int, default=None, help="full-size: image side (default 512)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from zoom.prompts import load_prompts
    from zoom.edits import Edits
    from zoom.search import Searcher
    from zoom.targets import make_criterion

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.tiny:
        models, search, paths = tiny_models(device)
        if args.loop_decoder:
            from diffusers import AutoencoderTiny

            models.generator.loop_decoder = AutoencoderTiny.from_pretrained(paths["taesd"]).to(device).eval()
            models.generator.loop_decoder.requires_grad_(False)
    else:
        models, search, _ = full_size_models(device, args.loop_decoder, args.resolution)
    batch = args.batch_size or search.batch_size
    search = dataclasses.replace(search, batch_size=batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 1. The planted speed run: attribute + null, early stop at the first flip, as an audit runs.
    real_target = models.target
    models.target = planted_target(models.generator, list(range(10_000, 10_000 + max(8, batch))), real_target)
    models.criterion = make_criterion("multiclass")  # the readout's two classes
    prompts = load_prompts({"domain": DOMAIN, "attributes": [{"name": "smile", "prompt": ATTRIBUTE}], "null": NULL})
    edits = Edits(models.generator, models.guide, prompts, seed=0)
    arms = edits.arms()
    searcher = Searcher(models.generator, models.guide, models.target, models.criterion, search, precision)
    seeds = list(range(args.samples))

    def speed_run(mode: str, edit_space: str) -> dict:
        """Every seed's attribute and null items as an audit searches them in this mode."""
        outcomes = []
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(seeds), batch):
            base = searcher.base(seeds[i:i + batch], DOMAIN)
            if mode == "joint":
                outcomes.append(searcher.optimise(base, edits.joint(base.seeds)[0], DOMAIN, edit_space))
                continue
            for arm in arms:
                edit = edits.edit(arm, base.seeds)
                outcomes.append(searcher.bracket_search(base, edit, DOMAIN) if edit_space == "text" else
                                searcher.optimise(base, edit, DOMAIN, edit_space))
        sync(device)
        elapsed = time.perf_counter() - start
        count = len(seeds) * len(arms)  # joint: one search covers the attribute and the null slot
        per_item = 1 if mode != "joint" else len(arms)
        return {"counterfactuals_per_s": round(count / elapsed, 4),
                "flip_rate": round(sum(f for o in outcomes for f in o.flipped) / (count / per_item), 4),
                "steps_per_counterfactual": statistics.median(s for o in outcomes for s in o.steps),
                "unet_calls_per_counterfactual": statistics.median(c for o in outcomes for c in o.unet_calls)}

    by_mode = {"single (text, bracket)": speed_run("single", "text"),
               "single (both, gradients)": speed_run("single", "both"),
               "joint (text, gradients)": speed_run("joint", "text")}
    default = by_mode["single (text, bracket)"]
    count = len(seeds) * len(arms)

    # 2. Engine step vs bare forward+backward of the same modules, on one full batch.
    timing_seeds = list(range(batch))
    timing = dataclasses.replace(search, max_steps=args.timing_steps)
    engine = Searcher(models.generator, models.guide, models.target, NeverFlips(models.criterion), timing, precision)
    base = engine.base(timing_seeds, DOMAIN)
    edit = edits.edit(arms[0], timing_seeds)

    def engine_run(steps):
        engine.cfg = dataclasses.replace(timing, max_steps=steps)
        return timed(lambda: engine.optimise(base, edit, DOMAIN, search.edit_space), device, repeats=1)

    # The difference of two run lengths cancels what every run pays once (set-up, the last forward).
    engine_step = (engine_run(1 + args.timing_steps) - engine_run(1)) / args.timing_steps
    by_threads = {}
    if device.type == "cpu":
        chosen = torch.get_num_threads()
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            by_threads[threads] = round((engine_run(1 + args.timing_steps) - engine_run(1)) / args.timing_steps, 6)
        torch.set_num_threads(chosen)
    split, chain = bare_step_times(models, timing_seeds, precision, device)
    total = sum(split.values())

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "size": "tiny" if args.tiny else "full-size",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "precision": precision,
        "resolution": models.generator.resolution,
        "batch_size": batch,
        "loop_decoder": "taesd" if args.loop_decoder else "vae",
        "counterfactuals": count,
        **default,
        "by_mode": by_mode,
        "time_split": {k: round(v / total, 4) for k, v in split.items()},
        "bare_step_s": round(chain, 6),
        "engine_step_s": round(engine_step, 6),
        "overhead_ratio": round(engine_step / chain, 4),
        "cpu_step_s_by_threads": by_threads,
        "threads": torch.get_num_threads(),
        "peak_memory_bytes": int(peak),
        "torch": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
