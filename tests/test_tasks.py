"""Keypoint, segmentation and detection targets (zoom/tasks.py): the flip criteria, the torchvision
adapters against the library's own outputs, the task/output check, and tiny audits end to end.

The `*_target` functions at the top are also `python:` target factories for the audits below."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from zoom.errors import ZoomError
from zoom.tasks import (DetectionFlip, Detections, KeypointFlip, SegmentationFlip, base_outputs, describe_task,
                        soft_argmax, task_target)
from zoom.targets import make_criterion

HERE = Path(__file__).resolve()
TINY = HERE.parents[1] / "configs" / "tiny.yaml"


class ColourSegmenter(nn.Module):
    """Three classes per pixel from colour: background, 'reddish', 'bluish' (a dict like DeepLab's)."""

    labels = ["background", "reddish", "bluish"]

    def forward(self, x):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        logits = torch.stack([torch.full_like(r, 0.02), r - g, b - g], 1) * 20
        return {"out": logits}


class ColourHeatmaps(nn.Module):
    """Two keypoints as heatmaps [B, 2, H, W]: where the image is reddest and where it is bluest."""

    def forward(self, x):
        return torch.stack([x[:, 0] - x[:, 1], x[:, 2] - x[:, 1]], 1) * 10


def keypoint_target():
    return ColourHeatmaps()


def segmentation_target():
    return ColourSegmenter()


def random_detector(name="fasterrcnn_mobilenet_v3_large_320_fpn", **kwargs):
    import torchvision.models as tvm

    torch.manual_seed(0)
    return tvm.get_model(name, weights=None, weights_backbone=None, **kwargs).eval()


def detection_target():
    """torchvision's Faster R-CNN (random weights, low score threshold so it detects) through zoom's adapter."""
    model = random_detector(box_score_thresh=0.0, box_detections_per_img=5)
    with torch.no_grad():  # a class-1 bias so some boxes score >= 0.5: there are base detections to lose
        model.roi_heads.box_predictor.cls_score.bias[1] += 6.0
    return task_target("fasterrcnn_mobilenet_v3_large_320_fpn", model)


# ---------------------------------------------------------------------------------------------
# Criteria


def _register(criterion, outputs):
    with base_outputs(criterion):
        return criterion.decision(outputs)


def test_segmentation_flips_when_the_audited_mask_loses_half_its_iou():
    base = torch.zeros(1, 3, 8, 8)
    base[0, 1, :4, :] = 5  # class 1 on the top half (32 px), class 2 on 8 px, background elsewhere
    base[0, 2, 6:, :4] = 5
    c = make_criterion("segmentation")
    keys = _register(c, base)
    assert keys.tolist() == [-1] and c.skip_reason(-1) is None
    assert c.base_label(-1, lambda i: ["bg", "a", "b"][i]) == "a"  # largest non-background class
    assert c.margin(base, keys).item() == pytest.approx(0.5)  # IoU 1 - 0.5
    edited = base.clone()
    edited[0, 1, :2, :] = 0  # half of class 1 gone: IoU 0.5 -> kept (flip is IoU < 0.5)
    assert c.margin(edited, keys).item() == pytest.approx(0.0) and int(c.decision(edited)[0]) == 0
    edited[0, 1, 2, :] = 0  # one row of 8 px left: IoU 0.25
    pred = c.decision(edited)  # before the margin: filled in place when it comes
    m = c.margin(edited, keys)
    assert m.item() == pytest.approx(-0.25) and int(pred[0]) == 1
    assert c.base_prob(edited, keys).item() == pytest.approx(0.25)
    assert c.public(int(pred[0])) == 1 and c.public(-1) == 0


def test_segmentation_margin_has_the_soft_iou_gradient_and_skips_empty_bases():
    base = torch.zeros(1, 3, 4, 4)
    base[0, 1, :2] = 3
    c = make_criterion("segmentation", threshold=0.5)
    keys = _register(c, base)
    x = base.clone().requires_grad_(True)
    c.margin(x, keys).sum().backward()
    assert x.grad[0, 1, :2].sum() > 0 and x.grad.abs().sum() > 0  # raising the class inside its mask helps
    empty = torch.zeros(1, 3, 4, 4)
    empty[0, 0] = 1
    keys = _register(c, empty)
    assert "no non-background class" in c.skip_reason(int(keys[0]))
    assert c.margin(empty, keys).item() > 0  # never flips
    fixed = make_criterion("segmentation", label="b", labels=["bg", "a", "b"])
    assert fixed.label == 2 and "class 2" in fixed.definition


def test_keypoints_flip_on_normalised_mean_error():
    base = torch.tensor([[[10.0, 10.0], [30.0, 10.0], [20.0, 30.0]]])
    c = KeypointFlip(threshold=0.08, pair=(0, 1))  # normaliser: distance of keypoints 0 and 1 = 20 px
    keys = _register(c, base)
    moved = base + torch.tensor([1.0, 0.0])  # error 1 px / 20 = 0.05
    assert c.margin(moved, keys).item() == pytest.approx(0.03)
    far = base + torch.tensor([2.0, 0.0])  # 0.1 > 0.08
    assert c.margin(far, keys).item() == pytest.approx(-0.02) and int(c.decision(far)[0]) == 1
    diag = KeypointFlip(threshold=0.08, image_size=100)  # normaliser: the diagonal of a 100 px image
    keys = _register(diag, base)
    assert diag.margin(base + 10.0, keys).item() == pytest.approx(0.08 - (200 ** 0.5) / (100 * 2 ** 0.5))
    assert make_criterion("keypoints", keypoint_norm="left_eye,right_eye",
                          keypoint_names=["nose", "left_eye", "right_eye"]).pair == (1, 2)
    with pytest.raises(ZoomError, match="keypoint_norm"):
        make_criterion("keypoints", keypoint_norm="eye,ear", keypoint_names=["nose"])


def test_keypoints_from_heatmaps_use_a_differentiable_soft_argmax():
    heat = torch.full((1, 2, 9, 9), -20.0)
    heat[0, 0, 2, 3] = 20.0  # keypoint 0 at (x=3, y=2)
    heat[0, 1, 7, 5] = 20.0
    assert soft_argmax(heat)[0].tolist() == [[pytest.approx(3.0), pytest.approx(2.0)],
                                             [pytest.approx(5.0), pytest.approx(7.0)]]
    c = KeypointFlip()
    keys = _register(c, heat)
    x = heat.clone().requires_grad_(True)
    shifted = torch.roll(x, 3, dims=-1)
    m = c.margin(shifted, keys)
    assert m.item() == pytest.approx(0.08 - 3 / (2 ** 0.5 * 9), abs=1e-4)
    m.backward()
    assert torch.isfinite(x.grad).all()


def _dets(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores, dtype=torch.float)}


def test_detection_flip_lost_relabelled_and_fabricated():
    c = make_criterion("detection")
    base = Detections([_dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [1, 2, 3], [0.9, 0.8, 0.3])])
    keys = _register(c, base)
    assert c.base_label(int(keys[0]), str) == "1"  # the most confident base detection's label
    assert c.margin(base, keys).item() == pytest.approx(0.3)  # the weakest kept: 0.8 - 0.5
    kept = Detections([_dets([[1, 0, 10, 10], [20, 21, 40, 40], [70, 70, 90, 90]], [1, 2, 5], [0.7, 0.6, 0.9])])
    assert c.margin(kept, keys).item() == pytest.approx(0.1)
    code = int(c.decision(kept)[0])
    assert code & 1 == 0 and code >> 1 == 1  # one fabricated (label 5), nothing lost
    assert c.record_fields(int(keys[0]), code, str) == {"base_pred": 0, "base_label": "1", "final_pred": 0,
                                                         "final_label": "kept", "fabricated": 1}
    relabelled = Detections([_dets([[0, 0, 10, 10], [20, 20, 40, 40]], [1, 7], [0.9, 0.8])])
    assert c.margin(relabelled, keys).item() == pytest.approx(-0.5) and int(c.decision(relabelled)[0]) & 1
    weak = Detections([_dets([[0, 0, 10, 10], [20, 20, 40, 40]], [1, 2], [0.9, 0.4])])
    assert c.margin(weak, keys).item() == pytest.approx(-0.1)
    moved = Detections([_dets([[0, 0, 10, 10], [30, 30, 50, 50]], [1, 2], [0.9, 0.9])])  # IoU 1/7
    assert c.margin(moved, keys).item() < 0
    nothing = Detections([_dets(torch.zeros(0, 4).tolist(), [], [])])
    keys = _register(c, nothing)
    assert "no base detection" in c.skip_reason(int(keys[0])) and c.margin(nothing, keys).item() > 0


def test_detection_margin_gradient_comes_from_the_pre_nms_candidates():
    c = DetectionFlip()
    base = Detections([_dets([[0, 0, 10, 10]], [1], [0.9])])
    keys = _register(c, base)
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]], requires_grad=True)  # 3 candidates, labels 1, 2
    scores = logits.softmax(-1)
    cand = torch.tensor([[0, 0, 10, 10], [0, 1, 10, 11], [80, 80, 90, 90]], dtype=torch.float)
    boxes = cand[:, None].expand(3, 2, 4)
    out = Detections([{"boxes": cand[:1], "labels": torch.tensor([1]), "scores": scores[:1, 0].detach()}],
                     [(boxes, scores, torch.tensor([1, 2]))])
    m = c.margin(out, keys)
    assert m.detach().item() == pytest.approx(float(scores[0, 0].detach()) - 0.5)  # value: the output detection's score
    m.backward()
    assert logits.grad[0].abs().sum() > 0  # through the best overlapping candidate of label 1
    assert logits.grad[2].abs().sum() == 0  # not through a candidate far from the base box


def test_unregistered_key_and_unknown_task_are_clear_errors():
    c = SegmentationFlip()
    with pytest.raises(ZoomError, match="no base output"):
        c.margin(torch.zeros(1, 2, 2, 2), torch.tensor([-5]))
    with pytest.raises(ZoomError, match="detection"):
        make_criterion("depth")


def test_flip_definitions_name_their_thresholds():
    assert "0.08" in describe_task({"task": "keypoints"}) and "diagonal" in describe_task({"task": "keypoints"})
    assert "IoU < 0.3" in describe_task({"task": "segmentation", "threshold": 0.3})
    assert "score >= 0.7" in describe_task({"task": "detection", "score_threshold": 0.7})
    assert "left_eye and right_eye" in describe_task({"task": "keypoints", "keypoint_norm": "left_eye,right_eye"})


# ---------------------------------------------------------------------------------------------
# Adapters: the same numbers as the library's own models


def _images(n=2, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"])
def test_segmentation_adapters_equal_the_library(name):
    import torchvision.models as tvm
    import torchvision.transforms.functional as TF

    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, weights_backbone=None).eval()
    x = _images()
    with torch.no_grad():
        own = model(TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))["out"]
        ours = task_target(name, model)(x)
    assert ours.shape == own.shape == (2, 21, 96, 96)
    assert (ours - own).abs().max() <= 1e-5


def test_torchvision_spec_with_a_local_weights_file_builds_the_task_adapter(tmp_path):
    import torchvision.models as tvm

    from zoom.targets import load_target

    torch.manual_seed(0)
    model = tvm.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None).eval()
    torch.save(model.state_dict(), tmp_path / "seg.pth")
    target = load_target(f"torchvision:lraspp_mobilenet_v3_large:{tmp_path / 'seg.pth'}")
    x = _images(1)
    with torch.no_grad():
        assert (target(x) - task_target("lraspp_mobilenet_v3_large", model)(x)).abs().max() <= 1e-5


DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": dict(box_score_thresh=0.0),
    "fcos_resnet50_fpn": dict(score_thresh=0.0, min_size=96, max_size=96),
    "retinanet_resnet50_fpn": dict(score_thresh=0.0, min_size=96, max_size=96),
    "ssdlite320_mobilenet_v3_large": dict(score_thresh=0.0),
}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detection_adapters_equal_the_library(name):
    model = random_detector(name, **DETECTORS[name])
    x = _images()
    with torch.no_grad():
        own = model(list(x))
        target = task_target(name, model)
        ours = target(x)
    assert isinstance(ours, Detections) and len(ours) == 2
    assert sum(len(d["boxes"]) for d in own) > 0
    for a, b in zip(own, ours.dets):
        for key in ("boxes", "labels", "scores"):
            assert a[key].shape == b[key].shape
            assert (a[key].float() - b[key].float()).abs().max() <= 1e-5 if len(a[key]) else True
    assert (ours.pre_nms is not None) == name.startswith("fasterrcnn")


def test_faster_rcnn_pre_nms_candidates_contain_its_detections():
    model = random_detector(box_score_thresh=0.0)
    x = _images(1)
    with torch.no_grad():
        out = task_target("fasterrcnn_mobilenet_v3_large_320_fpn", model)(x)
    boxes, scores, labels = out.pre_nms[0]
    d = out.dets[0]
    assert boxes.shape[1] == scores.shape[1] == len(labels) == 90
    for box, label, score in list(zip(d["boxes"], d["labels"], d["scores"]))[:5]:
        c = int(label) - 1
        dist = (boxes[:, c] - box).abs().amax(-1) + (scores[:, c] - score).abs()
        assert dist.min() <= 1e-4  # every output detection is one of the candidates, same box and score


def test_keypoint_rcnn_adapter_gives_the_top_instances_keypoints():
    model = random_detector("keypointrcnn_resnet50_fpn", box_score_thresh=0.0, box_detections_per_img=3,
                            min_size=96, max_size=96)
    x = _images()
    with torch.no_grad():
        own = model(list(x))
        ours = task_target("keypointrcnn_resnet50_fpn", model)(x)
    assert ours.shape == (2, 17, 2)
    for i, d in enumerate(own):
        if len(d["keypoints"]):
            assert (ours[i] - d["keypoints"][0, :, :2]).abs().max() <= 1e-5
        else:
            assert (ours[i] == -1).all()


# ---------------------------------------------------------------------------------------------
# Config and the task/output check


def test_config_validates_the_task_keys(tiny):
    from zoom.config import load_config

    for task in ("keypoints", "segmentation", "detection"):
        assert load_config(TINY, {"target.task": task}).target.task == task
    cases = [({"target.task": "depth"}, "target.task"),
             ({"target.task": "segmentation", "target.threshold": 1.5}, "target.threshold"),
             ({"target.task": "multiclass", "target.threshold": 0.5}, "applies to tasks keypoints"),
             ({"target.task": "detection", "target.label": 1}, "target.label applies"),
             ({"target.task": "detection", "target.score_threshold": 0.0}, "score_threshold"),
             ({"target.task": "keypoints", "target.keypoint_norm": "eyes"}, "keypoint_norm")]
    for overrides, message in cases:
        with pytest.raises(ZoomError, match=message):
            load_config(TINY, overrides)


@pytest.mark.parametrize("spec,task,says", [
    ("hf:${ZOOM_TINY}/target", "segmentation", "segmentation needs a model that transformers' "
                                               "AutoModelForSemanticSegmentation loads.*holds ResNetForImage"),
    ("hf:${ZOOM_TINY}/target", "detection", "detection needs .*AutoModelForObjectDetection loads.*holds ResNet"),
    ("hf:${ZOOM_TINY}/target", "keypoints", "keypoints needs .*VitPoseForPoseEstimation loads.*holds"),
    (f"python:{HERE}:segmentation_target", "multiclass", "multiclass needs logits .batch, classes.*shape .1, 3, 64, 64."),
    (f"python:{HERE}:detection_target", "segmentation", "segmentation needs logits.*returns detections"),
    (f"python:{HERE}:segmentation_target", "detection", "detection needs .*returns Tensor of shape"),
])
def test_a_task_that_does_not_fit_the_output_fails_before_any_work(tmp_path, tiny, spec, task, says):
    from zoom.config import load_config
    from zoom.models import load_models

    config = load_config(TINY, {"target.spec": spec, "target.task": task})
    with pytest.raises(ZoomError, match=says) as e:
        load_models(config, "cpu")
    assert "\n" not in str(e.value) and task in str(e.value)


# ---------------------------------------------------------------------------------------------
# Audits end to end


def _audit(tmp_path, overrides, mode="single"):
    from zoom.config import load_config
    from zoom.rundir import read_records
    from zoom.runner import run_audit

    config = load_config(TINY, {"search.samples": 2, "search.batch_size": 2, "search.mode": mode, **overrides})
    report = run_audit(config, tmp_path / "run", progress=False)
    records = read_records(tmp_path / "run")  # validates every record's fields
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "report.json").is_file()
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["flip_definition"] == report["flip_definition"]
    assert len(records) == (4 + 1 if mode == "joint" else 2 * 4) * 2  # joint: the attributes and one null slot
    html = (tmp_path / "run" / "report.html").read_text()
    assert report["flip_definition"].split(":")[0] in html
    return report, records


@pytest.mark.parametrize("mode", ["single", "sweep", "joint"])
def test_tiny_segmentation_audit(tmp_path, tiny, mode):
    report, records = _audit(tmp_path, {"target.spec": f"python:{HERE}:segmentation_target",
                                        "target.task": "segmentation", "target.threshold": 0.9}, mode)
    assert report["flip_definition"].startswith("segmentation: flipped when the mask of the base image's largest")
    assert "IoU < 0.9" in report["flip_definition"]
    for r in records:
        assert r["status"] == "ok"
        assert r["base_pred"] == 0 and r["final_pred"] in (0, 1) and r["final_label"] in ("kept", "flipped")
        assert r["flipped"] <= r["final_pred"]  # joint mode credits a flip to one direction only
        if mode != "joint":
            assert r["final_pred"] == int(r["flipped"])
        assert r["base_label"] in ("reddish", "bluish")  # the audited class: the per-class split
        assert r["base_prob"] == 1.0 and 0 <= r["final_prob"] <= 1  # IoU with the base mask
        if mode == "sweep":
            assert all(p[2] in (0, 1) for p in r["curve"]) and r["curve"][0][2] == 0
    assert any(r["flipped"] for r in records) and set(report["attributes"][0]["per_class"]) <= {"reddish", "bluish"}


@pytest.mark.parametrize("mode", ["single", "joint"])
def test_tiny_detection_audit_with_a_torchvision_detector(tmp_path, tiny, mode):
    report, records = _audit(tmp_path, {"target.spec": f"python:{HERE}:detection_target",
                                        "target.task": "detection"}, mode)
    assert report["flip_definition"].startswith("detection: flipped when a base detection")
    for r in records:
        assert r["status"] == "ok"
        assert r["base_pred"] == 0 and r["final_pred"] in (0, 1) and isinstance(r["fabricated"], int)
        assert r["flipped"] <= r["final_pred"]
        if mode != "joint":
            assert r["final_pred"] == int(r["flipped"])
    first = report["attributes"][0]
    assert first["fabricated"] == sum(r["fabricated"] for r in records if r["attribute"] == first["name"])


def test_tiny_keypoint_audit_on_heatmaps(tmp_path, tiny):
    report, records = _audit(tmp_path, {"target.spec": f"python:{HERE}:keypoint_target", "target.task": "keypoints",
                                        "target.threshold": 0.01, "target.keypoint_norm": "diagonal"}, "joint")
    assert "exceeds 0.01" in report["flip_definition"]
    assert all(r["status"] == "ok" and r["base_label"] == "keypoints" and r["base_prob"] == 1.0 for r in records)
