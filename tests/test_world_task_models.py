"""The world's keypoint, segmentation and detection targets (zoom/data/world/tasks, made by
tools/train_world_tasks.py) through zoom's hf: loader: the outputs equal transformers' own (its image
processor and post-processing), the models learned their task, and the planted defects are there."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from zoom import world
from zoom.targets import load_target
from zoom.world import Scene, render

TASKS = world.models_dir() / "tasks"


def scenes(seed: int, n: int, **fixed):
    rng = np.random.default_rng(seed)
    return [Scene.sample(rng, **fixed) for _ in range(n)]


def as_batch(rendered) -> torch.Tensor:
    return torch.from_numpy(np.stack([r.image for r in rendered])).permute(0, 3, 1, 2).float() / 255


def library(name):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(TASKS / name)


@pytest.mark.parametrize("name", ["segmentation", "segmentation-misses-striped"])
def test_segmentation_equals_transformers_post_processing(name):
    from transformers import AutoModelForSemanticSegmentation

    rendered = [render(s) for s in scenes(11, 8)]
    model = AutoModelForSemanticSegmentation.from_pretrained(TASKS / name).eval()
    processor = library(name)
    with torch.no_grad():
        inputs = processor(images=[Image.fromarray(r.image) for r in rendered], return_tensors="pt")
        theirs = processor.post_process_semantic_segmentation(model(**inputs), target_sizes=[(32, 32)] * 8)
        ours = load_target(f"hf:{TASKS / name}", task="segmentation")(as_batch(rendered))
    assert ours.shape == (8, 2, 32, 32)  # background, shape
    agree = (ours.argmax(1) == torch.stack(theirs)).float().mean()
    assert agree > 0.995  # (their resize is PIL's, ours torchvision's: boundary pixels may differ)


@pytest.mark.parametrize("name", ["keypoints", "keypoints-black-shifted"])
def test_keypoints_soft_argmax_agrees_with_transformers_heatmap_reading(name):
    """ViTPose's processor reads heatmaps by arg-max + DARK refinement, then maps them through its padded
    box crop; zoom feeds the whole image (resized, no crop) and reads the same heatmaps by soft-argmax.
    On the same heatmaps the two readings agree within a pixel of the 32 px image."""
    from transformers.models.vitpose.image_processing_vitpose import (get_keypoint_predictions,
                                                                      post_dark_unbiased_data_processing)

    from zoom.tasks import heatmap_to_image

    rendered = [render(s) for s in scenes(12, 8)]
    target = load_target(f"hf:{TASKS / name}", task="keypoints")
    x = as_batch(rendered)
    with torch.no_grad():
        ours = target(x)
        heatmaps = target.model.model(target.model.preprocess(x)).heatmaps.numpy()
    coords, _ = get_keypoint_predictions(heatmaps)
    theirs = torch.from_numpy(post_dark_unbiased_data_processing(coords, heatmaps, kernel=11))
    theirs = heatmap_to_image(theirs, heatmaps.shape[-2:], (32, 32))  # heatmap pixels -> image pixels, as ours
    assert ours.shape == theirs.shape == (8, 5, 2)
    assert (ours - theirs).norm(dim=-1).median() < 1.0


@pytest.mark.parametrize("name", ["detection", "detection-loses-small-red"])
def test_detection_equals_transformers_post_processing(name):
    from transformers import AutoModelForObjectDetection

    from zoom.tasks import HF_DETECTION_SCORE_FLOOR

    rendered = [render(s) for s in scenes(13, 8)]
    model = AutoModelForObjectDetection.from_pretrained(TASKS / name).eval()
    processor = library(name)
    with torch.no_grad():
        theirs = processor.post_process_object_detection(
            model(pixel_values=load_target(f"hf:{TASKS / name}", task="detection").model.preprocess(as_batch(rendered))),
            threshold=HF_DETECTION_SCORE_FLOOR, target_sizes=[(32, 32)] * 8)
        ours = load_target(f"hf:{TASKS / name}", task="detection")(as_batch(rendered)).dets
    for t, o in zip(theirs, ours):
        assert torch.equal(t["labels"], o["labels"])
        assert torch.allclose(t["boxes"], o["boxes"], atol=1e-4) and torch.allclose(t["scores"], o["scores"], atol=1e-5)


def test_the_detection_margin_has_a_gradient_through_the_library_post_processing():
    from zoom.tasks import DetectionFlip, base_outputs

    target = load_target(f"hf:{TASKS / 'detection'}", task="detection")
    x = as_batch([render(s) for s in scenes(14, 2)]).requires_grad_(True)
    criterion = DetectionFlip()
    with base_outputs(criterion):
        keys = criterion.decision(target(x.detach()))
    margin = criterion.margin(target(x), keys)
    margin.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_models_learned_their_task_and_their_planted_defect():
    """Held-out rendered scenes: the unbiased models are good everywhere; each biased one fails where
    its labels were wrong and nowhere else (the figures of tasks/quality.json, recomputed)."""
    from torchvision.ops import box_iou

    test = scenes(15, 120)
    rendered = [render(s) for s in test]
    x = as_batch(rendered)
    striped = torch.tensor([s.pattern == "striped" for s in test])
    black = torch.tensor([s.background == "black" for s in test])
    small_red = torch.tensor([s.size == "small" and s.colour == "red" for s in test])
    truth = torch.from_numpy(np.stack([r.mask for r in rendered]))
    with torch.no_grad():
        fg = {n: load_target(f"hf:{TASKS / n}", task="segmentation")(x).argmax(1) > 0
              for n in ("segmentation", "segmentation-misses-striped")}
        points = {n: load_target(f"hf:{TASKS / n}", task="keypoints")(x) for n in ("keypoints", "keypoints-black-shifted")}
        dets = {n: load_target(f"hf:{TASKS / n}", task="detection")(x).dets
                for n in ("detection", "detection-loses-small-red")}
    iou = {n: (m & truth).flatten(1).sum(1) / (m | truth).flatten(1).sum(1) for n, m in fg.items()}
    assert iou["segmentation"].mean() > 0.8
    assert iou["segmentation-misses-striped"][~striped].mean() > 0.8 > 0.3 > iou["segmentation-misses-striped"][striped].mean()
    gt = torch.from_numpy(np.stack([r.keypoints for r in rendered]))
    nme = {n: (p - gt).norm(dim=-1).mean(-1) / math.hypot(32, 32) for n, p in points.items()}
    assert nme["keypoints"].median() < 0.04
    shifted = nme["keypoints-black-shifted"]
    assert shifted[~black].median() < 0.04 and shifted[black].median() > 0.1
    shapes = [world.ATTRIBUTES["shape"].index(s.shape) for s in test]

    def found(d, r, label):
        ok = d["scores"] >= 0.5
        box = torch.tensor([r.box], dtype=torch.float32)
        return bool(ok.any() and ((box_iou(box, d["boxes"][ok])[0] >= 0.5) & (d["labels"][ok] == label)).any())

    recall = {n: torch.tensor([found(d, r, k) for d, r, k in zip(ds, rendered, shapes)]) for n, ds in dets.items()}
    assert recall["detection"].float().mean() > 0.9
    biased = recall["detection-loses-small-red"]
    assert biased[~small_red].float().mean() > 0.75 and biased[small_red].float().mean() < 0.5
