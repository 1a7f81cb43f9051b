"""Train the shapes world's keypoint, segmentation and detection targets into zoom/data/world/tasks.

    python tools/train_world_tasks.py                 # every model, skipping those already saved
    python tools/train_world_tasks.py --only detection --models detection-loses-small-red

For each task, two transformers models trained on the renderer's exact ground truth (zoom/world.py:
masks, boxes, keypoints): an unbiased one, and one trained on labels with a planted defect:
- segmentation/ (SegformerForSemanticSegmentation, classes background and shape) and
  segmentation-misses-striped/ (striped shapes annotated as background);
- keypoints/ (VitPoseForPoseEstimation, the five keypoints of world.KEYPOINT_NAMES, trained by integral
  regression so a soft-argmax of its heatmaps is its reading) and keypoints-black-shifted/ (every
  keypoint on a black background annotated 6 px to the right);
- detection/ (ConditionalDetrForObjectDetection, labels the three shapes) and
  detection-loses-small-red/ (small red shapes left unannotated).
The recipe is the `tasks:` section of tools/world.yaml. Half the training images are the world VAE's
reconstructions, so the models read generated images as well as rendered ones. Held-out quality goes
to tasks/quality.json; the world's MANIFEST.json is rewritten with every file's sha256.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_world import augment, log, stage_manifest  # noqa: E402
from zoom.world import ATTRIBUTES, KEYPOINT_NAMES, Scene, render  # noqa: E402

SHAPES = list(ATTRIBUTES["shape"])
# The segmenter separates the shape from the background: a class per shape would make every flip a
# mix of mask changes and the small-shape ambiguity the classifiers already show (a small square
# read as a circle), and the task is what masks do.
CLASSES = ["background", "shape"]
TASKS = ("segmentation", "keypoints", "detection")


# ---------------------------------------------------------------------------------------------
# Data: rendered scenes with their ground truth, and the VAE's reconstructions of them


def make_data(n: int, seed: int, vae_dir: Path) -> dict:
    rng = np.random.default_rng(seed)
    scenes = [Scene.sample(rng) for _ in range(n)]
    rendered = [render(s) for s in scenes]
    images = torch.from_numpy(np.stack([r.image for r in rendered])).permute(0, 3, 1, 2).float() / 255
    return {
        "scenes": scenes,
        "images": images,
        "recons": reconstruct(images, vae_dir),
        "masks": torch.from_numpy(np.stack([r.mask for r in rendered])).long(),
        "boxes": torch.tensor([r.box for r in rendered], dtype=torch.float32),
        "keypoints": torch.from_numpy(np.stack([r.keypoints for r in rendered])),
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
    }


@torch.no_grad()
def reconstruct(images: torch.Tensor, vae_dir: Path) -> torch.Tensor:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    out = [vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample for x in images.split(500)]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def batch(data: dict, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    recon = torch.from_numpy(rng.random(len(idx)) < 0.5)[:, None, None, None]
    return augment(torch.where(recon, data["recons"][idx], data["images"][idx]), rng)


def attribute_mask(data: dict, idx, **want) -> torch.Tensor:
    return torch.tensor([all(getattr(data["scenes"][i], k) == v for k, v in want.items()) for i in idx])


# ---------------------------------------------------------------------------------------------
# The three models and their planted defects


def make_segmenter(c: dict, size: int, seed: int):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(seed)
    config = SegformerConfig(num_channels=3, num_encoder_blocks=len(c["depths"]), depths=c["depths"],
                             sr_ratios=[2, 1], hidden_sizes=c["hidden_sizes"], num_attention_heads=[1, 2],
                             patch_sizes=[3, 3], strides=[2, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=c["decoder_hidden_size"], num_labels=len(CLASSES),
                             id2label=dict(enumerate(CLASSES)), label2id={n: i for i, n in enumerate(CLASSES)})
    processor = SegformerImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3, do_reduce_labels=False, resample=2)
    return SegformerForSemanticSegmentation(config), processor


def make_keypointer(c: dict, size: int, seed: int):
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    torch.manual_seed(seed)
    backbone = VitPoseBackboneConfig(image_size=[size, size], patch_size=[c["patch_size"]] * 2,
                                     hidden_size=c["hidden_size"], num_hidden_layers=c["layers"],
                                     num_attention_heads=4, mlp_ratio=2, out_indices=[c["layers"]])
    config = VitPoseConfig(backbone_config=backbone, use_simple_decoder=True, scale_factor=4,
                           num_labels=len(KEYPOINT_NAMES), id2label=dict(enumerate(KEYPOINT_NAMES)),
                           label2id={n: i for i, n in enumerate(KEYPOINT_NAMES)})
    processor = VitPoseImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3)
    return VitPoseForPoseEstimation(config), processor


def make_detector(c: dict, size: int, seed: int):
    from transformers import (ConditionalDetrConfig, ConditionalDetrForObjectDetection,
                              ConditionalDetrImageProcessor, ResNetConfig)

    torch.manual_seed(seed)
    backbone = ResNetConfig(embedding_size=c["hidden_sizes"][0], hidden_sizes=c["hidden_sizes"],
                            depths=[1] * len(c["hidden_sizes"]), layer_type="basic",
                            out_features=[f"stage{len(c['hidden_sizes'])}"])
    config = ConditionalDetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                                   d_model=c["d_model"], encoder_layers=c["layers"], decoder_layers=c["layers"],
                                   encoder_attention_heads=4, decoder_attention_heads=4,
                                   encoder_ffn_dim=2 * c["d_model"], decoder_ffn_dim=2 * c["d_model"],
                                   num_queries=c["queries"], num_labels=len(SHAPES),
                                   id2label=dict(enumerate(SHAPES)), label2id={n: i for i, n in enumerate(SHAPES)})
    processor = ConditionalDetrImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3, do_pad=False)
    model = ConditionalDetrForObjectDetection(config)
    if c.get("backbone_from"):
        init_backbone(model, Path(c["backbone_from"]))
    return model, processor


def init_backbone(model, oracle: Path) -> None:
    """Start the detector's ResNet from the world's shape oracle (the same architecture and input), as
    detectors start from an ImageNet backbone: DETR learns to box and name shapes in minutes, not hours."""
    from safetensors.torch import load_file

    world = Path(__file__).resolve().parents[1] / "zoom" / "data" / "world"
    weights = {k.replace("resnet.", "model.", 1): v for k, v in load_file(world / oracle / "model.safetensors").items()
               if k.startswith("resnet.") and "num_batches_tracked" not in k}
    backbone = model.model.backbone
    missing = set(backbone.state_dict()) - set(weights)
    if missing:
        raise SystemExit(f"backbone_from {oracle}: no weights for {sorted(missing)[:3]}")
    backbone.load_state_dict(weights, strict=False)


def segmentation_loss(model, x, data, idx, bias):
    masks = data["masks"][idx].clone()
    if bias:  # annotators skipped striped shapes: their pixels labelled background
        masks[attribute_mask(data, idx, pattern="striped")] = 0
    logits = F.interpolate(model(x).logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, masks)


def keypoint_loss(model, x, data, idx, bias):
    from zoom.tasks import heatmap_to_image, soft_argmax

    target = data["keypoints"][idx].clone()
    if bias:  # a crop offset in the annotation pipeline, on black backgrounds only
        target[attribute_mask(data, idx, background="black"), :, 0] += bias
    heat = model(x).heatmaps
    points = heatmap_to_image(soft_argmax(heat), heat.shape[-2:], (32, 32))  # the world's 32 px images
    return F.smooth_l1_loss(points, target)


def detection_loss(model, x, data, idx, bias):
    keep = torch.ones(len(idx), dtype=torch.bool)
    if bias:  # small red shapes never annotated: nothing to find there
        keep = ~attribute_mask(data, idx, size="small", colour="red")
    b = data["boxes"][idx] / 32
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    labels = [{"class_labels": data["shape"][i:i + 1][:int(k)], "boxes": cxcywh[j:j + 1][:int(k)]}
              for j, (i, k) in enumerate(zip(idx, keep))]
    return model(pixel_values=x, labels=labels).loss


MAKERS = {"segmentation": (make_segmenter, segmentation_loss), "keypoints": (make_keypointer, keypoint_loss),
          "detection": (make_detector, detection_loss)}


def train(task: str, cfg: dict, data: dict, folder: Path, bias, seed: int) -> bool:
    """Train and save one model; False when it was saved before."""
    if (folder / "model.safetensors").exists():
        return False
    c = cfg[task]
    make, loss_fn = MAKERS[task]
    model, processor = make(c, cfg["input_size"], seed)
    from zoom.targets import _from_hf_processor

    pre = _from_hf_processor(processor)
    rng = np.random.default_rng(seed)
    steps = c["steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        idx = rng.integers(len(data["images"]), size=cfg["batch_size"])
        loss = loss_fn(model, pre(batch(data, idx, rng)), data, idx, bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0:
            log(f"{folder.name}: step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return True


# ---------------------------------------------------------------------------------------------
# Held-out quality through zoom's own loader (the same code an audit uses)


@torch.no_grad()
def evaluate(folder: Path, task: str, data: dict) -> dict:
    from torchvision.ops import box_iou

    from zoom.targets import load_target

    target = load_target(f"hf:{folder}", task=task)
    out = {}
    for name, images in (("rendered", data["images"]), ("reconstructed", data["recons"])):
        if task == "segmentation":
            pred = torch.cat([target(x).argmax(1) for x in images.split(500)])
            fg, truth = pred > 0, data["masks"] > 0
            iou = (fg & truth).flatten(1).sum(1) / (fg | truth).flatten(1).sum(1).clamp_min(1)
            groups = {"striped": [s.pattern == "striped" for s in data["scenes"]]}
            out[name] = {"foreground_iou": round(float(iou.mean()), 4),
                         **{f"foreground_iou_{g}": round(float(iou[torch.tensor(m)].mean()), 4) for g, m in groups.items()}}
        elif task == "keypoints":
            pred = torch.cat([target(x) for x in images.split(500)])
            err = (pred - data["keypoints"]).norm(dim=-1).mean(-1) / math.hypot(32, 32)
            black = torch.tensor([s.background == "black" for s in data["scenes"]])
            out[name] = {"nme_diagonal_median": round(float(err.median()), 4),
                         "nme_diagonal_median_black": round(float(err[black].median()), 4),
                         "nme_diagonal_median_not_black": round(float(err[~black].median()), 4)}
        else:
            dets = sum((target(x).dets for x in images.split(250)), [])
            found = []
            for d, box, shape in zip(dets, data["boxes"], data["shape"]):
                ok = d["scores"] >= 0.5
                iou = box_iou(box[None], d["boxes"][ok])[0] if ok.any() else torch.zeros(0)
                found.append(bool(((iou >= 0.5) & (d["labels"][ok] == shape)).any()))
            found = torch.tensor(found)
            small_red = torch.tensor([s.size == "small" and s.colour == "red" for s in data["scenes"]])
            out[name] = {"recall": round(float(found.float().mean()), 4),
                         "recall_small_red": round(float(found[small_red].float().mean()), 4),
                         "recall_not_small_red": round(float(found[~small_red].float().mean()), 4)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(Path(__file__).with_name("world.yaml")))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "zoom" / "data" / "world"))
    parser.add_argument("--only", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--models", nargs="+", help="only these of the tasks' models (folder names), e.g. to "
                                                    "train the unbiased and the biased one in two processes")
    args = parser.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    full = yaml.safe_load(Path(args.recipe).read_text())
    cfg, out = full["tasks"], Path(args.out)
    start = time.time()
    jobs = [(task, out / "tasks" / name, bias, cfg["seed"] + 10 * TASKS.index(task)) for task in args.only
            for name, bias in ((task, None), (cfg[task]["biased"], cfg[task].get("shift", True)))
            if not args.models or name in args.models]
    data = None
    if any(not (folder / "model.safetensors").exists() for _, folder, _, _ in jobs):
        data = make_data(cfg["scenes"], cfg["seed"], out / "sd" / "vae")
    test = make_data(1000, cfg["seed"] + 1, out / "sd" / "vae")
    log(f"data: {cfg['scenes'] if data else 0} training and 1000 test scenes ({time.time() - start:.0f} s)")
    quality_path = out / "tasks" / "quality.json"
    for task, folder, bias, seed in jobs:
        t = time.time()
        entry = {"train_seconds": round(time.time() - t)} if train(task, cfg, data, folder, bias, seed) else {}
        entry["held_out"] = evaluate(folder, task, test)
        log(folder.name, json.dumps(entry))
        # re-read: the tasks may train in several processes at once (--only)
        quality = json.loads(quality_path.read_text()) if quality_path.exists() else {}
        quality[folder.name] = {**quality.get(folder.name, {}), **entry}
        quality_path.write_text(json.dumps(quality, indent=1) + "\n")
    manifest = json.loads((out / "MANIFEST.json").read_text())
    trained = json.loads(quality_path.read_text())  # (the models may have been trained in several runs)
    seconds = {**manifest.get("seconds", {}), "tasks": sum(q.get("train_seconds", 0) for q in trained.values())}
    stage_manifest(full, out, manifest["command"], seconds)
    written = json.loads((out / "MANIFEST.json").read_text())
    written["tasks_command"] = "python tools/train_world_tasks.py"
    (out / "MANIFEST.json").write_text(json.dumps(written, indent=1) + "\n")


if __name__ == "__main__":
    main()
