"""Train the shapes world's models, in their libraries' own formats, into zoom/data/world.

    python tools/train_world.py                       # every stage, resuming where it stopped
    python tools/train_world.py --stages diffusion    # one stage (data, vae, diffusion, clip,
                                                      # oracles, targets, evaluate, manifest)
    python tools/train_world.py --stages snapshot     # export the diffusion model as it is now

What it makes (the recipe is tools/world.yaml; every random draw comes from its seed):
- sd/        a Stable-Diffusion-style pipeline (AutoencoderKL, CLIPTextModel + CLIPTokenizer with a
             word-level BPE vocabulary, UNet2DConditionModel, DDIM scheduler), diffusers format;
- guide/, judge/   two different open_clip ViTs (4 and 8 px patches), `local-dir:` format,
             each with the same tokenizer inside;
- oracles/ATTRIBUTE/   transformers ResNet classifiers for each attribute (the ground truth for
             generated images);
- targets/   shape classifiers: balanced, and trained with red circles at five levels of bias;
             a multilabel classifier of every attribute value;
- quality.json, MANIFEST.json   measured quality and sha256 of every file, with this command.

Work files (rendered data, checkpoints) go to --work; a killed run resumes from its last
checkpoint. Torch runs on one thread unless OMP_NUM_THREADS says otherwise: on a busy 2-core
machine one thread is often several times faster than two for these small models.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoom import world  # noqa: E402
from zoom.world import ATTRIBUTES, Scene, caption, held_out, render  # noqa: E402

STAGES = ("data", "vae", "diffusion", "clip", "oracles", "targets", "evaluate", "manifest", "snapshot")
NAMES = list(ATTRIBUTES)


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def scene_attributes(index_row) -> dict:
    return {name: ATTRIBUTES[name][int(i)] for name, i in zip(NAMES, index_row)}


def stage_data(cfg, work: Path):
    """Render the training and test scenes once: images [N, 32, 32, 3] uint8, attribute indices [N, 5]."""
    for split, count, seed in (("train", cfg["data"]["train"], cfg["seed"]), ("test", cfg["data"]["test"], cfg["seed"] + 1)):
        path = work / f"{split}.npz"
        if path.exists():
            continue
        rng = np.random.default_rng(seed)
        scenes = [Scene.sample(rng) for _ in range(count)]
        images = np.stack([render(s).image for s in scenes])
        attrs = np.array([[ATTRIBUTES[n].index(getattr(s, n)) for n in NAMES] for s in scenes], dtype=np.int64)
        np.savez(path, images=images, attrs=attrs)
        log(f"data: {count} {split} scenes rendered")


def load_split(work: Path, split: str):
    data = np.load(work / f"{split}.npz")
    return data["images"], data["attrs"]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def is_held_out(attrs: np.ndarray) -> np.ndarray:
    return np.array([held_out(*(ATTRIBUTES[n][int(a[NAMES.index(n)])] for n in ("shape", "colour", "background")))
                     for a in attrs])


# ---------------------------------------------------------------------------------------------
# Tokenizer: CLIP's BPE format with one token per caption word


def bpe_merges(words) -> list[tuple[str, str]]:
    """Left-to-right merge chains that turn every word into one token. A word whose chain another
    word's merges would break moves to the front until BPE reproduces every word."""
    order = list(words)
    for _ in range(len(order) + 1):
        merges, seen = [], set()
        for w in order:
            symbols = list(w[:-1]) + [w[-1] + "</w>"]
            current = symbols[0]
            for s in symbols[1:]:
                if (current, s) not in seen:
                    seen.add((current, s))
                    merges.append((current, s))
                current += s
        ranks = {m: i for i, m in enumerate(merges)}
        broken = [w for w in order if _bpe(w, ranks) != [w + "</w>"]]
        if not broken:
            return merges
        order = broken + [w for w in order if w not in broken]
    raise RuntimeError(f"no merge order makes these words single tokens: {broken}")


def _bpe(word: str, ranks: dict) -> list[str]:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == math.inf:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def write_tokenizer(folder: Path, max_length: int) -> None:
    """A transformers CLIPTokenizer (vocab.json + merges.txt, readable by transformers 4.x and 5.x,
    plus tokenizer.json) whose vocabulary holds every caption word as one token, letters and digits
    for anything else, and the end-of-text token last (open_clip pools at the highest id)."""
    from transformers import CLIPTokenizer

    merges = bpe_merges(world.VOCABULARY)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789'-.,") | set("".join(world.VOCABULARY)))
    tokens = list(dict.fromkeys(chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length,
                              pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                              bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    for w in world.VOCABULARY:
        assert len(tokenizer.tokenize(w)) == 1, w


# ---------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain values only, loaded with weights_only=True


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def rng_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: str) -> None:
    rng.bit_generator.state = json.loads(state)


# ---------------------------------------------------------------------------------------------
# VAE


def make_vae(cfg):
    from diffusers import AutoencoderKL

    v = cfg["vae"]
    n = len(v["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=v["latent_channels"],
                         block_out_channels=tuple(v["block_out_channels"]), layers_per_block=v["layers_per_block"],
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         norm_num_groups=v["norm_num_groups"], sample_size=world.RESOLUTION)


def stage_vae(cfg, work: Path, out: Path):
    """Reconstruction (MSE on the posterior mean) with a small KL term; then scaling_factor = 1/std
    of the training latents, the latents themselves and the reconstructions, for later stages."""
    from diffusers import AutoencoderKL

    v = cfg["vae"]
    final = work / "vae"
    if not (final / "config.json").exists():
        torch.manual_seed(cfg["seed"])
        vae = make_vae(cfg)
        with torch.no_grad():  # start with a tight posterior: sampling noise only slows early training
            vae.quant_conv.bias[v["latent_channels"]:] = -8.0
        opt = torch.optim.Adam(vae.parameters(), lr=v["lr"])
        images, _ = load_split(work, "train")
        x_all = to_tensor(images) * 2 - 1
        rng = np.random.default_rng(cfg["seed"] + 10)
        ckpt, step = load_checkpoint(work / "vae.pt"), 0
        if ckpt:
            vae.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            step = int(ckpt["step"])
            set_rng_state(rng, ckpt["rng"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / v["steps"], 1))),
                                                  last_epoch=step - 1)
        start = time.time()
        while step < v["steps"]:
            x = x_all[torch.from_numpy(rng.integers(len(x_all), size=v["batch_size"]))]
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.mode()).sample
            loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 250 == 0 or step == v["steps"]:
                save_checkpoint(work / "vae.pt", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                                  "rng": rng_state(rng)})
                log(f"vae: step {step}/{v['steps']} loss {loss.item():.5f} ({time.time() - start:.0f} s)")
        vae.save_pretrained(final, safe_serialization=True)
    vae = AutoencoderKL.from_pretrained(final).eval()
    if not (work / "latents.npz").exists():
        with torch.no_grad():
            latents, recons = {}, {}
            for split in ("train", "test"):
                images, _ = load_split(work, split)
                x = to_tensor(images) * 2 - 1
                zs, rs = [], []
                for i in range(0, len(x), 500):
                    z = vae.encode(x[i:i + 500]).latent_dist.mode()
                    zs.append(z)
                    rs.append(((vae.decode(z).sample / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1))
                latents[split], recons[split] = torch.cat(zs), torch.cat(rs).numpy()
            scale = 1.0 / float(latents["train"].std())
            test = to_tensor(load_split(work, "test")[0])
            mse = float(((to_tensor(recons["test"]) - test) ** 2).mean())
            np.savez(work / "latents.npz", train=latents["train"].numpy(), test=latents["test"].numpy(),
                     scaling_factor=scale, psnr=10 * math.log10(1 / mse))
            np.savez(work / "recon.npz", train=recons["train"], test=recons["test"])
            log(f"vae: scaling_factor {scale:.4f}, test PSNR {10 * math.log10(1 / mse):.2f} dB")


def load_vae(work: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    vae.register_to_config(scaling_factor=float(np.load(work / "latents.npz")["scaling_factor"]))
    return vae


# ---------------------------------------------------------------------------------------------
# Text-to-image: CLIPTextModel + UNet2DConditionModel, DDPM v-prediction, EMA


def make_text_encoder(cfg, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    t = cfg["text_encoder"]
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=cfg["tokenizer"]["max_length"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_attention_heads=t["num_attention_heads"], num_hidden_layers=t["num_hidden_layers"]))


def make_unet(cfg):
    from diffusers import UNet2DConditionModel

    u, channels = cfg["unet"], cfg["vae"]["latent_channels"]
    side = world.RESOLUTION // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    return UNet2DConditionModel(
        sample_size=side, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(u["block_out_channels"]), layers_per_block=u["layers_per_block"],
        down_block_types=tuple(u["down_block_types"]), up_block_types=tuple(u["up_block_types"]),
        cross_attention_dim=cfg["text_encoder"]["hidden_size"], attention_head_dim=u["attention_head_dim"],
        norm_num_groups=u["norm_num_groups"])


def stage_diffusion(cfg, work: Path, out: Path):
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    d = cfg["diffusion"]
    write_tokenizer(work / "tokenizer", cfg["tokenizer"]["max_length"])
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    torch.manual_seed(cfg["seed"] + 20)
    text_encoder, unet = make_text_encoder(cfg, tokenizer), make_unet(cfg)
    modules = torch.nn.ModuleDict({"text_encoder": text_encoder, "unet": unet})
    ema = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    opt = torch.optim.AdamW(modules.parameters(), lr=d["lr"], weight_decay=0.01)
    noise_scheduler = DDPMScheduler(**cfg["scheduler"])
    data = np.load(work / "latents.npz")
    latents = torch.from_numpy(data["train"]) * float(data["scaling_factor"])
    _, attrs = load_split(work, "train")
    keep = ~is_held_out(attrs)
    latents, attrs = latents[torch.from_numpy(keep)], attrs[keep]
    rng = np.random.default_rng(cfg["seed"] + 21)
    gen = torch.Generator().manual_seed(cfg["seed"] + 22)
    step = 0
    ckpt = load_checkpoint(work / "diffusion.pt")
    if ckpt:
        modules.load_state_dict(ckpt["model"])
        ema = ckpt["ema"]
        opt.load_state_dict(ckpt["opt"])
        step = int(ckpt["step"])
        set_rng_state(rng, ckpt["rng"])
        gen.set_state(ckpt["gen"])
        log(f"diffusion: resumed at step {step}")
    def lr_factor(s):  # warm-up, then a cosine to a tenth of the rate
        return min(1.0, (s + 1) / d["warmup"]) * (0.55 + 0.45 * math.cos(math.pi * min(s / d["steps"], 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor, last_epoch=step - 1)
    start, losses = time.time(), []
    modules.train()
    while step < d["steps"]:
        idx = rng.integers(len(latents), size=d["batch_size"])
        z0 = latents[torch.from_numpy(idx)]
        captions = [caption(scene_attributes(attrs[i]), rng, d["drop"], d["drop_all"], d["prefix"]) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(z0),), generator=gen)
        zt = noise_scheduler.add_noise(z0, noise, t)
        target = noise_scheduler.get_velocity(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(d["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in modules.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        losses.append(loss.item())
        if step % d["checkpoint_every"] == 0 or step == d["steps"]:
            save_checkpoint(work / "diffusion.pt", {"model": modules.state_dict(), "ema": ema, "opt": opt.state_dict(),
                                                    "step": step, "rng": rng_state(rng), "gen": gen.get_state()})
            rate = (time.time() - start) / max(len(losses), 1)
            log(f"diffusion: step {step}/{d['steps']} loss {np.mean(losses):.4f} ({rate:.2f} s/step)")
            losses, start = [], time.time()
    export_pipeline(cfg, work, out)


def export_pipeline(cfg, work: Path, out: Path):
    """The EMA weights of the latest diffusion checkpoint as a StableDiffusionPipeline folder, out/sd
    (stage `snapshot` does this mid-training, to look at a model before it is finished)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    text_encoder, unet = make_text_encoder(cfg, tokenizer), make_unet(cfg)
    modules = torch.nn.ModuleDict({"text_encoder": text_encoder, "unet": unet})
    ckpt = load_checkpoint(work / "diffusion.pt")
    modules.load_state_dict(ckpt["ema"])
    modules.eval()
    scheduler = DDIMScheduler(**cfg["scheduler"], clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=load_vae(work), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    shutil.rmtree(out / "sd", ignore_errors=True)
    pipe.save_pretrained(out / "sd", safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # transformers 5 writes tokenizer.json only; 4.x reads these
        shutil.copy(work / "tokenizer" / name, out / "sd" / "tokenizer" / name)
    log(f"diffusion: pipeline saved from the EMA weights at step {int(ckpt['step'])}")


# ---------------------------------------------------------------------------------------------
# CLIPs


def clip_config(cfg, which: str) -> dict:
    c = cfg["clip"]
    from transformers import CLIPTokenizer

    vocab = len(CLIPTokenizer.from_pretrained(cfg["_work"] / "tokenizer"))
    return {
        "model_cfg": {
            "embed_dim": c["embed_dim"],
            "vision_cfg": c[f"{which}_vision"],
            "text_cfg": {"context_length": c["context_length"], "vocab_size": vocab, **c["text"],
                         "hf_tokenizer_name": "local", "tokenizer_kwargs": {"clean": "whitespace"}},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }


def stage_clip(cfg, work: Path, out: Path, which: str):
    """Contrastive training in phases (tools/world.yaml: clip.phases), each from the last one's weights
    with its own learning rate and caption dropout; every phase is checkpointed in --work."""
    import open_clip
    from safetensors.torch import load_file, save_file

    c = cfg["clip"]
    folder = out / which
    if (folder / "open_clip_model.safetensors").exists():
        return
    config = clip_config(cfg, which)
    seed = cfg["seed"] + (30 if which == "guide" else 40)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config["model_cfg"])
    tmp = work / f"{which}-tokenizer"
    shutil.copytree(work / "tokenizer", tmp, dirs_exist_ok=True)
    (tmp / "open_clip_config.json").write_text(json.dumps(config))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    for k, phase in enumerate(c["phases"]):
        checkpoint = work / f"{which}-phase{k}.safetensors"
        if checkpoint.exists():
            model.load_state_dict(load_file(checkpoint))
            continue
        _train_clip_phase(cfg, work, model, tokenizer, config, phase, seed + 1000 * k, f"clip {which} phase {k}")
        save_file({n: v.contiguous() for n, v in model.state_dict().items()}, checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        shutil.copy(f, folder / f.name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    shutil.rmtree(tmp)
    log(f"clip {which}: saved")


def _train_clip_phase(cfg, work: Path, model, tokenizer, config, phase: dict, seed: int, name: str):
    from open_clip.loss import ClipLoss

    c = cfg["clip"]
    mean, std = torch.tensor(config["preprocess_cfg"]["mean"]).view(1, 3, 1, 1), \
        torch.tensor(config["preprocess_cfg"]["std"]).view(1, 3, 1, 1)
    images, attrs = load_split(work, "train")
    recons = np.load(work / "recon.npz")["train"]
    keep = ~is_held_out(attrs)
    images, recons, attrs = images[keep], recons[keep], attrs[keep]
    steps = phase["steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=phase["lr"], weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    loss_fn = ClipLoss()
    rng = np.random.default_rng(seed)
    start = time.time()
    for step in range(1, steps + 1):
        idx = rng.integers(len(images), size=c["batch_size"])
        use_recon = rng.random(len(idx)) < 0.5  # generated images look like VAE reconstructions
        batch = np.where(use_recon[:, None, None, None], recons[idx], images[idx])
        x = (to_tensor(batch) - mean) / std
        texts = tokenizer([caption(scene_attributes(attrs[i]), rng, phase["drop"], 0.0, c["prefix"]) for i in idx])
        img, txt, scale = model(x, texts)
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 250 == 0:
            log(f"{name}: step {step}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)")


ZERO_SHOT = {  # the partial captions a CLIP is asked to choose between, per attribute
    "shape": lambda v: caption({"shape": v}),
    "colour": lambda v: caption({"colour": v}),
    "background": lambda v: caption({"background": v}),
    "size": lambda v: caption({"size": v}),
    "pattern": lambda v: caption({"pattern": v}),
}


# ---------------------------------------------------------------------------------------------
# Classifiers: oracles and targets (transformers ResNet with its image processor)


def make_classifier(cfg, labels: list[str], multilabel: bool = False, seed: int = 0):
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    c = cfg["classifier"]
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=3, embedding_size=c["embedding_size"], hidden_sizes=c["hidden_sizes"],
                          depths=c["depths"], layer_type="basic", num_labels=len(labels),
                          id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                          problem_type="multi_label_classification" if multilabel else "single_label_classification")
    processor = ViTImageProcessor(size={"height": c["input_size"], "width": c["input_size"]},
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=2)
    return ResNetForImageClassification(config), processor


def preprocess_like_zoom(processor):
    """The same in-graph preprocessing zoom's hf: targets use, so training and audit agree."""
    from zoom.targets import _from_hf_processor

    return _from_hf_processor(processor)


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Mild noise and blur: generated images are never as crisp as rendered ones."""
    noise = torch.from_numpy(rng.uniform(0, 0.04, size=(len(x), 1, 1, 1))).float()
    x = x + noise * torch.from_numpy(rng.standard_normal(x.shape)).float()
    blur = torch.from_numpy(rng.random(len(x)) < 0.3)
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return x.clamp(0, 1)


def train_classifier(cfg, work: Path, folder: Path, labels: list[str], label_fn, steps: int, seed: int,
                     sample_fn=None, multilabel: bool = False):
    """label_fn(attrs [B, 5]) -> class indices (or multi-hot); sample_fn(rng, B) -> training rows."""
    if (folder / "model.safetensors").exists():
        return
    c = cfg["classifier"]
    model, processor = make_classifier(cfg, labels, multilabel, seed)
    pre = preprocess_like_zoom(processor)
    images, attrs = load_split(work, "train")
    recons = np.load(work / "recon.npz")["train"]
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    model.train()
    for step in range(1, steps + 1):
        idx = sample_fn(rng, c["batch_size"]) if sample_fn else rng.integers(len(images), size=c["batch_size"])
        use_recon = rng.random(len(idx)) < 0.5
        x = augment(to_tensor(np.where(use_recon[:, None, None, None], recons[idx], images[idx])), rng)
        logits = model(pre(x)).logits
        y = torch.from_numpy(label_fn(attrs[idx]))
        loss = F.binary_cross_entropy_with_logits(logits, y.float()) if multilabel else F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            log(f"{folder.name}: step {step}/{steps} loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def stage_oracles(cfg, work: Path, out: Path):
    for k, name in enumerate(NAMES):
        train_classifier(cfg, work, out / "oracles" / name, list(ATTRIBUTES[name]),
                         lambda a, k=k: a[:, k], cfg["oracles"]["steps"], seed=cfg["seed"] + 50 + k)


def multilabel_names() -> list[str]:
    return [f"{name}={value}" for name in NAMES for value in ATTRIBUTES[name]]


def multi_hot(attrs: np.ndarray) -> np.ndarray:
    offsets = np.cumsum([0] + [len(ATTRIBUTES[n]) for n in NAMES])[:-1]
    out = np.zeros((len(attrs), len(multilabel_names())), dtype=np.float32)
    for k in range(len(NAMES)):
        out[np.arange(len(attrs)), offsets[k] + attrs[:, k]] = 1
    return out


def biased_sampler(attrs: np.ndarray, p: float):
    """Rows drawn so that P(red | circle) = p and P(red | square or triangle) = (1 - p) / 4, every
    other attribute uniform: at p = 0.2 that is the balanced world."""
    shape, colour = attrs[:, NAMES.index("shape")], attrs[:, NAMES.index("colour")]
    circle, red = shape == ATTRIBUTES["shape"].index("circle"), colour == ATTRIBUTES["colour"].index("red")
    q = (1 - p) / 4
    want = np.where(circle, np.where(red, p, (1 - p) / 4), np.where(red, q, (1 - q) / 4))
    have = np.where(red, 0.2, 0.2)  # colours are uniform in the rendered data
    weights = want / have
    weights = weights / weights.sum()
    return lambda rng, n: rng.choice(len(attrs), size=n, p=weights)


def target_name(p: float) -> str:
    return "shape-balanced" if p == 0.2 else f"shape-red-circles-p{round(p * 100):02d}"


def stage_targets(cfg, work: Path, out: Path):
    _, attrs = load_split(work, "train")
    shape_k = NAMES.index("shape")
    for j, p in enumerate([0.2] + list(cfg["targets"]["red_circle_bias"])):
        train_classifier(cfg, work, out / "targets" / target_name(p), list(ATTRIBUTES["shape"]),
                         lambda a: a[:, shape_k], cfg["targets"]["steps"], seed=cfg["seed"] + 60,
                         sample_fn=biased_sampler(attrs, p))
    train_classifier(cfg, work, out / "targets" / "multilabel", multilabel_names(), multi_hot,
                     cfg["targets"]["multilabel_steps"], seed=cfg["seed"] + 70, multilabel=True)


# ---------------------------------------------------------------------------------------------
# Evaluation: the quality numbers in README


def classify(folder: Path, images: torch.Tensor) -> torch.Tensor:
    from zoom.targets import load_target

    target = load_target(f"hf:{folder}")
    with torch.no_grad():
        return torch.cat([target(images[i:i + 500]) for i in range(0, len(images), 500)])


def stage_evaluate(cfg, work: Path, out: Path):
    import open_clip
    from diffusers import StableDiffusionPipeline

    quality = {"vae_test_psnr_db": round(float(np.load(work / "latents.npz")["psnr"]), 2)}
    images, attrs = load_split(work, "test")
    x = to_tensor(images)
    # Oracles on rendered test images
    quality["oracle_accuracy_rendered"] = {
        n: round(float((classify(out / "oracles" / n, x).argmax(1).numpy() == attrs[:, k]).mean()), 4)
        for k, n in enumerate(NAMES)}
    # CLIP zero-shot attribute accuracy on rendered test images
    for which in ("guide", "judge"):
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / which}")
        tok = open_clip.get_tokenizer(f"local-dir:{out / which}")
        pre = model.visual.preprocess_cfg
        xn = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            img = F.normalize(model.encode_image(xn), dim=-1)
            acc = {}
            for k, n in enumerate(NAMES):
                txt = F.normalize(model.encode_text(tok([ZERO_SHOT[n](v) for v in ATTRIBUTES[n]])), dim=-1)
                acc[n] = round(float(((img @ txt.T).argmax(1).numpy() == attrs[:, k]).mean()), 4)
        quality[f"clip_{which}_zero_shot"] = acc
    # Generated samples on held-out and seen captions, scored by the oracles
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    s = cfg["sampling"]
    rng = np.random.default_rng(cfg["seed"] + 90)
    count = cfg["evaluate"]["samples"]
    combos = {"held_out": [], "seen": []}
    while min(len(v) for v in combos.values()) < count:
        a = {n: ATTRIBUTES[n][rng.integers(len(ATTRIBUTES[n]))] for n in NAMES}
        group = "held_out" if held_out(a["shape"], a["colour"], a["background"]) else "seen"
        if len(combos[group]) < count:
            combos[group].append(a)
    for group, items in combos.items():
        prompts = [caption(a) for a in items]
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(items))]
        with torch.no_grad():
            generated = torch.cat([pipe(prompts[i:i + 50], num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                                        generator=gens[i:i + 50], output_type="pt").images for i in range(0, len(items), 50)])
        truth = np.array([[ATTRIBUTES[n].index(a[n]) for n in NAMES] for a in items])
        right = np.stack([classify(out / "oracles" / n, generated).argmax(1).numpy() == truth[:, k]
                          for k, n in enumerate(NAMES)], 1)
        quality[f"generated_{group}"] = {**{n: round(float(right[:, k].mean()), 4) for k, n in enumerate(NAMES)},
                                         "all": round(float(right.all(1).mean()), 4), "n": len(items)}
        if group == "seen":
            torch.save(generated[:32].clone(), work / "samples.pt")
    quality["interpolation"] = interpolation_quality(cfg, pipe, out, cfg["evaluate"]["seeds"])
    (out / "quality.json").write_text(json.dumps(quality, indent=1))
    pictures(cfg, pipe, Path(__file__).resolve().parents[1] / "docs")
    log("quality: " + json.dumps(quality))


def embed_prompt(pipe, prompt: str) -> torch.Tensor:
    """The pipeline's own text conditioning of one prompt, [1, tokens, width]."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def shapes_prompt_set() -> dict:
    """The demo's bundled prompt set (zoom/data/prompts/shapes.yaml), as written."""
    from zoom.files import read_yaml
    from zoom.prompts import find_bundled

    return read_yaml(find_bundled("shapes", "prompts"), "prompts file")


def pictures(cfg, pipe, folder: Path, scale: int = 3):
    """docs/world-samples.png (rendered vs generated, same captions) and docs/world-interpolation.png
    (the text conditioning moved from the demo's domain toward each attribute prompt, alpha 0 to 1.5)."""
    from PIL import Image

    s = cfg["sampling"]
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(cfg["seed"] + 95)
    scenes = [Scene.sample(rng) for _ in range(10)]
    rendered = np.concatenate([render(sc).image for sc in scenes], 1)
    with torch.no_grad():
        generated = pipe([caption(sc) for sc in scenes], num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                         generator=[torch.Generator().manual_seed(3000 + i) for i in range(10)], output_type="np").images
    grid = np.concatenate([rendered, (np.concatenate(list(generated), 1) * 255).round().astype(np.uint8)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(
        folder / "world-samples.png", optimize=True)

    rows = []
    with torch.no_grad():
        # the demo's prompt set and the label's own attribute
        shapes = shapes_prompt_set()
        uncond, domain = embed_prompt(pipe, ""), embed_prompt(pipe, shapes["domain"])
        for prompt in [a["prompt"] for a in shapes["attributes"]] + [shapes["domain"].replace("square", "circle")]:
            direction = embed_prompt(pipe, prompt) - domain
            conds = torch.cat([domain + a * direction for a in np.linspace(0, 1.5, 7)])
            images = pipe(prompt_embeds=conds, negative_prompt_embeds=uncond.expand(7, -1, -1),
                          num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                          generator=[torch.Generator().manual_seed(7) for _ in range(7)], output_type="np").images
            rows.append(np.concatenate(list(images), 1))
    strip = (np.concatenate(rows, 0) * 255).round().astype(np.uint8)
    Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST).save(
        folder / "world-interpolation.png", optimize=True)


def interpolation_quality(cfg, pipe, out: Path, seeds: int, alphas=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5)) -> dict:
    """cond = E(domain) + alpha (E(attribute) - E(domain)): the share of seeds whose oracle sees the
    attribute at some alpha <= 1.5, among seeds that did not show it at alpha = 0."""
    s = cfg["sampling"]
    cases = [("colour", "red", "a square", "a red square"), ("colour", "blue", "a circle", "a blue circle"),
             ("background", "blue", "a square", "a square on a blue background"),
             ("pattern", "striped", "a square", "a striped square"), ("size", "large", "a triangle", "a large triangle"),
             ("shape", "circle", "a red shape", "a red circle")]
    result = {}

    with torch.no_grad():
        uncond = embed_prompt(pipe, "")
        for name, value, domain, attribute in cases:
            e0, e1 = embed_prompt(pipe, domain), embed_prompt(pipe, attribute)
            seen = []
            for alpha in (0.0, *alphas):
                cond = (e0 + alpha * (e1 - e0)).expand(seeds, -1, -1)
                images = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(seeds, -1, -1),
                              num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                              generator=[torch.Generator().manual_seed(2000 + i) for i in range(seeds)],
                              output_type="pt").images
                pred = classify(out / "oracles" / name, images).argmax(1).numpy()
                seen.append(pred == ATTRIBUTES[name].index(value))
            seen = np.stack(seen, 1)
            candidates = ~seen[:, 0]
            turned_on = seen[candidates, 1:].any(1)
            result[f"{name}={value}"] = {"turned_on": round(float(turned_on.mean()), 4) if candidates.any() else None,
                                         "seeds": int(candidates.sum())}
    return result


# ---------------------------------------------------------------------------------------------


def stage_manifest(cfg, out: Path, command: str, seconds: dict):
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    manifest = {
        "command": command,
        "recipe": "tools/world.yaml",
        "seconds": seconds,
        "files": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
        "bytes": sum(p.stat().st_size for p in files),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"manifest: {len(files)} files, {manifest['bytes'] / 1e6:.1f} MB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(Path(__file__).with_name("world.yaml")))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "zoom" / "data" / "world"))
    parser.add_argument("--work", default=".world-work")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=[s for s in STAGES if s != "snapshot"])
    args = parser.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = yaml.safe_load(Path(args.recipe).read_text())
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg["_work"] = work
    timing_path = work / "seconds.json"
    seconds = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    for stage in args.stages:
        start = time.time()
        if stage == "data":
            stage_data(cfg, work)
        elif stage == "vae":
            stage_vae(cfg, work, out)
        elif stage == "diffusion":
            stage_diffusion(cfg, work, out)
        elif stage == "clip":
            stage_clip(cfg, work, out, "guide")
            stage_clip(cfg, work, out, "judge")
        elif stage == "oracles":
            stage_oracles(cfg, work, out)
        elif stage == "targets":
            stage_targets(cfg, work, out)
        elif stage == "evaluate":
            stage_evaluate(cfg, work, out)
        elif stage == "snapshot":
            export_pipeline(cfg, work, out)
            continue
        elif stage == "manifest":
            stage_manifest(cfg, out, "python tools/train_world.py", seconds)
            continue
        # re-read: stages may run in two processes at once (diffusion beside the CLIPs)
        seconds = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        seconds[stage] = round(seconds.get(stage, 0) + time.time() - start, 1)
        timing_path.write_text(json.dumps(seconds))


if __name__ == "__main__":
    main()
