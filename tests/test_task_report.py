"""The report side of keypoint, segmentation and detection audits: each record's `task` details (from
the criteria's `details`), the overlays drawn on the gallery images, the task metrics in report.json and
report.html, and rundir's checks of the new record fields."""

import json
import re

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image
from test_tasks import HERE, ColourSegmenter, _audit, _dets, _register

from zoom.errors import ZoomError
from zoom.overlays import DISPLAY, draw_marks
from zoom.tasks import Detections, KeypointFlip, SegmentationFlip, make_structured_criterion

THIS = Path(__file__).resolve()


class ScriptLabelSegmenter(ColourSegmenter):
    """The colour segmenter with labels a page must escape."""

    labels = ["background", "<script>alert(1)</script>", "b&w <i>"]


def script_segmentation_target():
    return ScriptLabelSegmenter()


class GridDetector(nn.Module):
    """A 4 x 4 grid of candidate boxes, each detected as 'red' and as 'blue' with a score from the cell's
    mean colour: per image and free of ties, so running it again on an image gives the same detections
    whatever the batch (a random Faster R-CNN scores many boxes equally, and batches break its ties)."""

    labels = ["background", "red", "blue"]

    def forward(self, x):
        B, _, H, W = x.shape
        cells = x.reshape(B, 3, 4, H // 4, 4, W // 4).mean((3, 5))  # [B, 3, 4, 4]
        # offsets near the tiny generator's cell colours: about half the cells detected, edits move them
        scores = torch.stack([cells[:, 0] - cells[:, 1] - 0.1, cells[:, 2] - cells[:, 1] - 0.04], 1).mul(40).sigmoid()
        ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        boxes = torch.stack([xs * W / 4, ys * H / 4, (xs + 1) * W / 4, (ys + 1) * H / 4], -1).reshape(16, 4)
        return [{"boxes": boxes.repeat(2, 1), "labels": torch.tensor([1] * 16 + [2] * 16),
                 "scores": scores[i].reshape(32)} for i in range(B)]


def grid_detection_target():
    return GridDetector()


# ---------------------------------------------------------------------------------------------
# The criteria's details


def test_keypoint_details_give_nme_and_points_in_image_pixels():
    base = torch.tensor([[[10.0, 10.0], [30.0, 10.0]]])
    c = KeypointFlip(threshold=0.08, pair=(0, 1))
    keys = _register(c, base)
    task, marks = c.details(base + torch.tensor([2.0, 0.0]), 0, int(keys[0]), str)
    assert task == {"nme": 0.1, "base_keypoints": [[10.0, 10.0], [30.0, 10.0]],
                    "final_keypoints": [[12.0, 10.0], [32.0, 10.0]]}
    assert marks["final"]["from"].tolist() == [[10.0, 10.0], [30.0, 10.0]]
    heat = torch.full((1, 1, 8, 8), -20.0)  # heatmaps 8 px wide for a 32 px image: 4 image px per cell
    heat[0, 0, 2, 3] = 20.0
    c = KeypointFlip(image_size=32)
    keys = _register(c, heat)
    task, _ = c.details(heat, 0, int(keys[0]), str)
    assert task["nme"] == 0.0 and task["base_keypoints"] == [[pytest.approx(13.5), pytest.approx(9.5)]]


def test_segmentation_details_name_the_class_and_measure_iou_and_areas():
    base = torch.zeros(1, 3, 8, 8)
    base[0, 1, :4, :] = 5  # class 1 on 32 px
    c = SegmentationFlip()
    keys = _register(c, base)
    edited = base.clone()
    edited[0, 1, :3, :] = 0  # 8 px left
    task, marks = c.details(edited, 0, int(keys[0]), lambda i: ["bg", "cat", "dog"][i])
    assert task == {"class": 1, "class_label": "cat", "iou": 0.25, "base_area": 32, "final_area": 8}
    assert int(marks["base"]["mask"].sum()) == 32 and int(marks["final"]["mask"].sum()) == 8


def test_detection_details_split_lost_relabelled_and_fabricated():
    c = make_structured_criterion("detection")
    base = Detections([_dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [0, 50, 5, 55]],
                             [1, 2, 3, 4], [0.9, 0.8, 0.7, 0.2])])
    keys = _register(c, base)
    edited = Detections([_dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [80, 80, 95, 95]],
                               [1, 7, 3, 5], [0.95, 0.9, 0.3, 0.6])])
    names = {1: "person", 2: "dog", 3: "cat", 7: "horse", 5: "kite"}
    task, marks = c.details(edited, 0, int(keys[0]), names.get)
    # kept: person; relabelled: the dog (a confident horse over it); lost: the cat (only a weak cat left);
    # fabricated: the kite over nothing (the horse is the dog relabelled, not a fabrication)
    assert (task["lost"], task["relabelled"], task["fabricated"]) == (1, 1, 1)
    assert task["by_label"] == {"person": {"n": 1, "lost": 0, "relabelled": 0},
                                "dog": {"n": 1, "lost": 0, "relabelled": 1},
                                "cat": {"n": 1, "lost": 1, "relabelled": 0}}
    assert [b["label"] for b in task["base_boxes"]] == ["person", "dog", "cat"]  # score >= 0.5 only
    assert task["final_boxes"][0] == {"box": [0.0, 0.0, 10.0, 10.0], "label": "person", "score": 0.95}
    assert [b["label"] for b in task["final_boxes"]] == ["person", "horse", "kite"]
    code = c.decision(edited)  # the record's `fabricated` (the search's code) agrees
    c.margin(edited, keys)
    assert c.record_fields(int(keys[0]), int(code[0]), str)["fabricated"] == 1
    assert marks["base"]["boxes"] == task["base_boxes"]
    many = Detections([_dets([[i, i, i + 10, i + 10] for i in range(9)], [1] * 9, [0.9] * 9)])
    assert len(c.details(many, 0, int(keys[0]), str)[0]["final_boxes"]) == 5  # a few at most


def test_overlays_upscale_and_draw_every_kind_of_mark():
    image = torch.full((3, 32, 32), 0.5)
    plain = draw_marks(image, {})
    assert plain.size == (DISPLAY, DISPLAY) and len(plain.getcolors()) == 1  # NEAREST: still one colour
    mask = torch.zeros(16, 16, dtype=torch.bool)  # a mask at half the image's resolution is stretched
    mask[:8, :8] = True
    tinted = draw_marks(image, {"mask": mask})
    assert tinted.getpixel((10, 10)) != plain.getpixel((10, 10))
    assert tinted.getpixel((200, 200)) == plain.getpixel((0, 0))
    dots = draw_marks(image, {"points": torch.tensor([[4.0, 4.0], [-1.0, -1.0]])})  # (-1, -1): no keypoint
    assert dots.getpixel((36, 36)) != plain.getpixel((36, 36)) and dots.getpixel((4, 4)) == plain.getpixel((4, 4))
    boxed = draw_marks(image, {"boxes": [{"box": [16.0, 16.0, 24.0, 24.0], "label": "人 <b>", "score": 0.9},
                                         {"box": [None, 0.0, 1.0, 1.0], "label": "nan", "score": None}]})
    assert boxed.getpixel((24 * 8, 20 * 8)) != plain.getpixel((0, 0))  # the right edge of the box


# ---------------------------------------------------------------------------------------------
# Audits end to end: records, overlays, report.json and report.html


def _png_size(path):
    with Image.open(path) as im:
        return im.size


def _check_overlays(run, records):
    for r in records:
        assert r["base_overlay"] == r["base_image"].replace(".png", ".overlay.png")
        assert r["counterfactual_overlay"] == r["counterfactual_image"].replace(".png", ".overlay.png")
        assert _png_size(run / r["counterfactual_overlay"]) == (DISPLAY, DISPLAY)  # 64 px upscaled 4x
    html = (run / "report.html").read_text()
    assert 'id="task"' in html and f'src="{records[0]["counterfactual_overlay"]}"' in html
    return html


def test_segmentation_report_has_details_overlays_iou_drop_and_per_class(tmp_path, tiny):
    report, records = _audit(tmp_path, {"target.spec": f"python:{HERE}:segmentation_target",
                                        "target.task": "segmentation", "target.threshold": 0.9})
    for r in records:
        t = r["task"]
        assert t["class_label"] == r["base_label"] and 0 <= t["iou"] <= 1 and t["base_area"] > 0
        assert t["iou"] == pytest.approx(r["final_prob"], abs=1e-6)  # what the search saw on the same image
        assert t["iou"] < 0.9 + 1e-6 if r["flipped"] else t["iou"] >= 0.9 - 1e-6
    html = _check_overlays(tmp_path / "run", records)
    for row in report["attributes"] + [report["null"]]:
        rs = [r for r in records if r["attribute"] == row["name"]]
        metrics = row["task_metrics"]
        assert metrics["mean_iou_drop"] == pytest.approx(sum(1 - r["task"]["iou"] for r in rs) / len(rs))
        assert sum(c["n"] for c in metrics["per_class"].values()) == len(rs)
        assert sum(c["flips"] for c in metrics["per_class"].values()) == sum(r["flipped"] for r in rs)
    assert "By audited class" in html and "mean IoU drop" in html
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["attributes"][0]["task_metrics"] == report["attributes"][0]["task_metrics"]


def test_detection_report_counts_lost_relabelled_and_fabricated(tmp_path, tiny):
    report, records = _audit(tmp_path, {"target.spec": f"python:{THIS}:grid_detection_target",
                                        "target.task": "detection"})
    for r in records:
        t = r["task"]
        assert t["fabricated"] == r["fabricated"]  # the target run again agrees with the search
        assert r["flipped"] == (t["lost"] + t["relabelled"] > 0)
        assert len(t["base_boxes"]) <= 5 and all(b["score"] >= 0.5 for b in t["base_boxes"] + t["final_boxes"])
    assert any(r["task"]["lost"] for r in records) and any(r["task"]["relabelled"] for r in records)
    assert any(r["task"]["fabricated"] for r in records) and not all(r["flipped"] for r in records)
    html = _check_overlays(tmp_path / "run", records)
    first = report["attributes"][0]
    rs = [r for r in records if r["attribute"] == first["name"]]
    metrics = first["task_metrics"]
    for key in ("lost", "relabelled", "fabricated"):
        assert metrics[key] == sum(r["task"][key] for r in rs)
    assert metrics["fabricated"] == first["fabricated"]
    assert sum(c["n"] for c in metrics["per_label"].values()) == metrics["base_detections"]
    assert "By base label" in html and "relabelled" in html


def test_keypoint_report_gives_the_nme_distribution(tmp_path, tiny):
    report, records = _audit(tmp_path, {"target.spec": f"python:{HERE}:keypoint_target", "target.task": "keypoints",
                                        "target.threshold": 0.01, "target.keypoint_norm": "diagonal"})
    for r in records:
        nme = r["task"]["nme"]
        assert nme > 0.01 - 1e-6 if r["flipped"] else nme <= 0.01 + 1e-6
        assert len(r["task"]["final_keypoints"]) == 2
        assert all(0 <= v <= 64 for point in r["task"]["base_keypoints"] for v in point)  # image pixels
    html = _check_overlays(tmp_path / "run", records)
    for row in report["attributes"] + [report["null"]]:
        nme = sorted(r["task"]["nme"] for r in records if r["attribute"] == row["name"])
        m = row["task_metrics"]
        assert m["n"] == len(nme) and nme[0] <= m["nme_median"] <= m["nme_p90"] <= nme[-1]
    assert "NME 90th percentile" in html


def test_classification_records_have_no_task_details(tmp_path, tiny):
    from zoom.config import load_config
    from zoom.rundir import read_records
    from zoom.runner import run_audit

    config = load_config(HERE.parents[1] / "configs" / "tiny.yaml", {"search.samples": 1, "search.batch_size": 1})
    report = run_audit(config, tmp_path / "run", progress=False)
    records = read_records(tmp_path / "run")
    assert not any(k in r for r in records for k in ("task", "base_overlay", "counterfactual_overlay"))
    assert "task_metrics" not in report["attributes"][0]
    assert not list((tmp_path / "run" / "images").rglob("*.overlay.png"))
    assert 'id="task"' not in (tmp_path / "run" / "report.html").read_text()


@pytest.fixture(scope="module")
def script_run(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("script")
    _audit(tmp, {"target.spec": f"python:{THIS}:script_segmentation_target", "target.task": "segmentation",
                 "target.threshold": 0.9})
    return tmp / "run"


def test_user_labels_are_escaped_in_task_tables_and_gallery(script_run):
    html = (script_run / "report.html").read_text()
    assert "<script" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;: IoU" in html  # the gallery caption
    assert "&lt;script&gt;alert(1)&lt;/script&gt;<br><small>" in html  # a per-class column


@pytest.mark.parametrize("task,field,says", [
    ("not a dict", "task", "null or a mapping of task details"),
    ({"iou": 1.5}, "task.iou", "a number from 0 to 1"),
    ({"base_area": -3}, "task.base_area", "a count"),
    ({"nme": "far"}, "task.nme", "a number or null"),
    ({"base_keypoints": [[1.0]]}, "task.base_keypoints", "a list of .x, y. points"),
    ({"by_label": {"cat": {"n": 1, "lost": True, "relabelled": 0}}}, "task.by_label.cat.lost", "a count"),
    ({"final_boxes": [{"box": [0, 0, 1], "label": "cat", "score": 0.9}]}, "task.final_boxes[0].box", "four numbers"),
    ({"base_boxes": [{"box": [0, 0, 1, 1], "label": 3, "score": 0.9}]}, "task.base_boxes[0].label", "text"),
])
def test_damaged_task_details_are_one_line_errors(script_run, tmp_path, task, field, says):
    import shutil

    from zoom.rundir import read_records

    run = tmp_path / "run"
    shutil.copytree(script_run, run)
    path = run / "records" / "rank-0.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["task"] = task
    path.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(ZoomError, match=f"line 1: field '{re.escape(field)}'.*{says}") as e:
        read_records(run)
    assert "\n" not in str(e.value)


def test_overlay_paths_are_validated_like_image_paths(script_run, tmp_path):
    import shutil

    from zoom.report import write_report
    from zoom.rundir import read_records

    run = tmp_path / "run"
    shutil.copytree(script_run, run)
    path = run / "records" / "rank-0.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["counterfactual_overlay"] = "../../etc/passwd"
    records[1]["base_overlay"] = 7
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:1] + records[2:]))
    write_report(run)  # an unsafe path is never shown: the plain image stands in
    html = (run / "report.html").read_text()
    assert "passwd" not in html and f'src="{records[0]["counterfactual_image"]}"' in html
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ZoomError, match="field 'base_overlay' is 7"):
        read_records(run)
