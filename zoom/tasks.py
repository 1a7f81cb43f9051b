"""Beyond classification: keypoint, segmentation and detection targets and their flip criteria.

Each criterion is fixed in advance (its `definition` is printed in the report) and gives, like the
classification ones in targets.py, a `decision` and a differentiable `margin` (> 0 keeps, < 0 flips).
What "flipped" means here depends on the *base output* of each seed, not a class index, so a
structured criterion keeps the base outputs of the current block of seeds itself:

- between `begin_base()` and `end_base()` (the runner wraps `Searcher.base` in `base_outputs(...)`),
  every `decision(outputs)` registers its rows as base outputs and returns their *keys* (negative
  ints), which the search carries as `base.pred` / `base.loop_pred` and hands back to `margin` and
  `base_prob`, which look the base output up;
- on an edited output, `decision` returns a *code* >= 0: bit 0 is 1 when flipped, the higher bits
  count fabricated detections (detection only). `decision(outputs)` has no base argument, so the code
  is the one `margin`/`base_prob` computed on the same outputs object (the search always calls one of
  them on it; the tensor `decision` returned is filled in place when they come after it).

Records stay plain: `public(value)` turns a key or code into the recorded `final_pred` (0 kept,
1 flipped; a base is 0), `labels` the per-class label (segmentation: the audited class).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from .errors import ZoomError, shown

STRUCTURED_TASKS = ("keypoints", "segmentation", "detection")
NO_KEYPOINTS = -1.0  # keypoint adapters: the coordinate given when the detector finds no instance
MAX_BOXES = 5  # detections a record lists per image (the most confident): records stay small
MAX_KEYPOINTS = 100  # keypoints a record lists (68 face landmarks fit)


class Detections:
    """A batch of torchvision-style detections (one dict with boxes xyxy pixels, labels, scores per
    image) and, where the adapter can give them, the candidates before non-maximum suppression
    (`pre_nms[i]` = (boxes [N, C, 4], scores [N, C], labels [C])) from which the margin's gradient comes."""

    def __init__(self, dets: list[dict], pre_nms: list | None = None):
        self.dets = list(dets)
        self.pre_nms = pre_nms

    def float(self):  # the search calls .float() on every target output
        return self

    def __len__(self):
        return len(self.dets)

    def __getitem__(self, i):  # image i's scores (what the search checks for finiteness)
        return self.dets[i]["scores"]

    @property
    def device(self):
        return self.dets[0]["scores"].device if self.dets else torch.device("cpu")


def as_output(out):
    """A model's raw output -> what criteria read: dict with 'out' (torchvision segmentation) -> the
    tensor; list of detection dicts -> Detections; anything else unchanged."""
    if isinstance(out, dict) and "out" in out:
        return out["out"]
    if isinstance(out, (list, tuple)) and out and all(isinstance(o, dict) and "boxes" in o for o in out):
        return Detections(out)
    return out


def describe_output(out) -> str:
    if isinstance(out, Detections):
        return "detections (a list of dicts with boxes, labels, scores)"
    shape = getattr(out, "shape", None)
    if shape is not None:
        return f"{type(out).__name__} of shape {list(shape)}"
    return type(out).__name__


# ---------------------------------------------------------------------------------------------
# Criteria


class _StructuredFlip:
    structured = True
    task = ""

    def __init__(self):
        self._bases: dict[int, dict] = {}
        self._registering = False
        self._coupled = None  # [outputs, codes tensor, set by margin]

    # -- the base outputs of the current block -------------------------------------------------
    def begin_base(self):
        self._bases.clear()
        self._coupled = None
        self._registering = True

    def end_base(self):
        self._registering = False

    def _base(self, key) -> dict:
        try:
            return self._bases[int(key)]
        except KeyError:
            raise ZoomError(f"target.task={self.task}: the criterion has no base output for key {int(key)}; run "
                            "Searcher.base inside zoom.tasks.base_outputs(criterion)") from None

    # -- the criterion interface the search uses -----------------------------------------------
    def decision(self, outputs):
        n = len(outputs)
        if self._registering:
            keys = []
            for i in range(n):
                key = -(len(self._bases) + 1)
                self._bases[key] = self._summarise(outputs, i)
                keys.append(key)
            return torch.tensor(keys, dtype=torch.long, device=outputs.device)
        if self._coupled is not None and self._coupled[0] is outputs:
            return self._coupled[1]
        codes = torch.zeros(n, dtype=torch.long, device=outputs.device)
        self._coupled = [outputs, codes, False]
        return codes

    def _couple(self, outputs, codes, from_margin: bool):
        c = self._coupled
        if c is not None and c[0] is outputs:
            if from_margin or not c[2]:
                c[1].copy_(codes)
                c[2] = c[2] or from_margin
        else:
            self._coupled = [outputs, codes.clone(), from_margin]

    def margin(self, outputs, base):
        margins, codes = [], []
        for i, key in enumerate(base.tolist()):
            m, code = self._compare(outputs, i, self._base(key))
            margins.append(m.reshape(()).float().to(outputs.device))
            codes.append(code)
        self._couple(outputs, torch.tensor(codes, dtype=torch.long, device=outputs.device), True)
        return torch.stack(margins)

    def base_prob(self, outputs, base):
        with torch.no_grad():
            probs, codes = [], []
            for i, key in enumerate(base.tolist()):
                b = self._base(key)
                probs.append(float(self._agreement(outputs, i, b)))
                codes.append(self._compare(outputs, i, b)[1])
        self._couple(outputs, torch.tensor(codes, dtype=torch.long, device=outputs.device), False)
        return torch.tensor(probs, device=outputs.device)

    def skip_reason(self, base) -> str | None:
        if int(base) >= 0:
            return None
        return self._base(base).get("skip")

    # -- records ---------------------------------------------------------------------------------
    @staticmethod
    def public(value: int) -> int:
        """A key (base: kept) or a code -> the recorded decision: 0 kept, 1 flipped."""
        return 0 if value < 0 else value & 1

    def record_fields(self, base_key: int, final: int, label) -> dict:
        """The record's base_pred/base_label/final_pred/final_label (label: the target's index -> name)."""
        flipped = self.public(final)
        return {"base_pred": 0, "base_label": self.base_label(base_key, label),
                "final_pred": flipped, "final_label": "flipped" if flipped else "kept"}

    def base_label(self, key, label) -> str:
        return self.task

    def details(self, outputs, i, base_key: int, label) -> tuple[dict, dict]:
        """Image i of an edited output against its base (key base_key) -> (the record's `task` dict,
        JSON-safe and small; the marks the gallery draws: {"base": ..., "final": ...}, in image pixels)."""
        raise NotImplementedError


class KeypointFlip(_StructuredFlip):
    """Keypoints [B, K, 2] in pixels (or heatmaps [B, K, H, W], read with a soft-argmax): flipped when
    the mean distance to the base keypoints, divided by the normaliser (the distance between the base's
    keypoints `pair`, or the image diagonal), exceeds `threshold`. margin = threshold - error."""

    task = "keypoints"

    def __init__(self, threshold: float = 0.08, pair: tuple[int, int] | None = None, image_size=None):
        super().__init__()
        self.threshold, self.pair, self.image_size = threshold, pair, image_size
        self.definition = definition("keypoints", threshold=threshold, pair=pair)

    def _points(self, outputs, i):
        x = outputs[i]
        if x.dim() == 3:  # heatmaps [K, H, W] -> soft-argmax in heatmap pixels
            return soft_argmax(x[None])[0], math.hypot(x.shape[-2], x.shape[-1])
        side = self.image_size
        diag = math.hypot(side, side) if side else None
        return x.float(), diag

    def _summarise(self, outputs, i):
        with torch.no_grad():
            points, diag = self._points(outputs, i)
        points = points.detach()
        if self.pair is not None:
            norm = float((points[self.pair[0]] - points[self.pair[1]]).norm())
        else:
            norm = diag
        skip = None
        if bool((points == NO_KEYPOINTS).all()):
            skip = "skipped: the target finds no keypoints in the base image"
        elif not norm or norm < 1e-6:
            skip = "skipped: the base keypoint pair that normalises the error coincide"
        return {"points": points, "norm": norm or 1.0, "skip": skip}

    def _error(self, outputs, i, b):
        points, _ = self._points(outputs, i)
        return (points - b["points"].to(points.device)).norm(dim=-1).mean() / b["norm"]

    def _compare(self, outputs, i, b):
        if b["skip"]:
            return torch.tensor(1.0), 0
        m = self.threshold - self._error(outputs, i, b)
        return m, int(bool(m < 0))

    def _agreement(self, outputs, i, b):
        if b["skip"]:
            return 1.0
        return max(0.0, 1.0 - float(self._error(outputs, i, b)) / (2 * self.threshold))

    def _in_image(self, points, outputs):
        """Heatmap pixels -> image pixels (pixel centres aligned); keypoints [B, K, 2] are image pixels."""
        if outputs.dim() != 4 or not self.image_size:
            return points
        image = heatmap_to_image(points, outputs.shape[-2:], (self.image_size, self.image_size))
        return torch.where(points == NO_KEYPOINTS, points, image)

    def details(self, outputs, i, base_key, label):
        b = self._base(base_key)
        with torch.no_grad():
            points, _ = self._points(outputs, i)
            nme = None if b["skip"] else _rounded(self._error(outputs, i, b), 6)
        base, final = self._in_image(b["points"].cpu(), outputs), self._in_image(points.cpu(), outputs)
        task = {"nme": nme, "base_keypoints": _rounded(base[:MAX_KEYPOINTS], 1),
                "final_keypoints": _rounded(final[:MAX_KEYPOINTS], 1)}
        return task, {"base": {"points": base}, "final": {"points": final, "from": base}}


class SegmentationFlip(_StructuredFlip):
    """Logits [B, C, H, W]: the audited class's mask (argmax == class) has IoU < `threshold` with the
    base mask. The class is `label`, or else the base image's largest non-background class. margin =
    IoU - threshold in value, with the gradient of a soft IoU (softmax probability against the base mask)."""

    task = "segmentation"

    def __init__(self, threshold: float = 0.5, label: int | None = None, background: int | None = 0):
        super().__init__()
        self.threshold, self.label, self.background = threshold, label, background
        self.definition = definition("segmentation", threshold=threshold, label=label, background=background)

    def _summarise(self, outputs, i):
        with torch.no_grad():
            argmax = outputs[i].argmax(0)
            if self.label is not None:
                cls = self.label
            else:
                counts = torch.bincount(argmax.flatten(), minlength=outputs.shape[1]).clone()
                if self.background is not None and self.background < len(counts):
                    counts[self.background] = 0
                cls = int(counts.argmax())
            mask = argmax == cls
            if self.label is None and self.background is not None and cls == self.background:
                mask = torch.zeros_like(mask)  # nothing but background
        skip = None if bool(mask.any()) else (
            "skipped: the base image has no non-background class" if self.label is None
            else f"skipped: the base image shows no pixel of class {cls}")
        return {"cls": cls, "mask": mask, "skip": skip}

    def _iou(self, outputs, i, b):
        hard = outputs[i].argmax(0) == b["cls"]
        mask = b["mask"].to(hard.device)
        union = (hard | mask).sum().clamp_min(1)
        return (hard & mask).sum().float() / union.float()

    def _compare(self, outputs, i, b):
        if b["skip"]:
            return torch.tensor(1.0), 0
        mask = b["mask"].to(outputs.device).float()
        p = outputs[i].float().softmax(0)[b["cls"]]
        soft = (p * mask).sum() / (p + mask - p * mask).sum().clamp_min(1e-6)
        iou = self._iou(outputs, i, b).detach()
        m = (iou - self.threshold) + (soft - soft.detach())  # value: the hard IoU; gradient: the soft one
        return m, int(bool(iou < self.threshold))

    def _agreement(self, outputs, i, b):
        return 1.0 if b["skip"] else float(self._iou(outputs, i, b))

    def base_label(self, key, label) -> str:
        return str(label(self._base(key)["cls"]))

    def details(self, outputs, i, base_key, label):
        b = self._base(base_key)
        with torch.no_grad():
            final = (outputs[i].argmax(0) == b["cls"]).cpu()
            iou = None if b["skip"] else _rounded(self._iou(outputs, i, b), 6)
        task = {"class": int(b["cls"]), "class_label": str(label(b["cls"])), "iou": iou,
                "base_area": int(b["mask"].sum()), "final_area": int(final.sum())}
        return task, {"base": {"mask": b["mask"].cpu()}, "final": {"mask": final}}


class DetectionFlip(_StructuredFlip):
    """Torchvision-style detections. Base detections: score >= `score_threshold`. Flipped when one is
    lost: no detection with IoU >= `iou` with it, the same label and score >= score_threshold (a
    relabelled detection is lost under its label). Fabricated detections (confident, overlapping no base
    detection with IoU >= `iou`, whatever its label) are counted separately. margin = min over base
    detections of (best matching score - score_threshold), in value from the detections the model
    outputs; its gradient comes from the scores *before* non-maximum suppression of the candidates of
    that label overlapping the base box (IoU >= `iou`) when the adapter gives them (Faster/Keypoint
    R-CNN), else from the output scores."""

    task = "detection"
    MAX_FABRICATED = 1 << 20

    def __init__(self, score_threshold: float = 0.5, iou: float = 0.5):
        super().__init__()
        self.score_threshold, self.iou = score_threshold, iou
        self.definition = definition("detection", threshold=iou, score_threshold=score_threshold)

    def _summarise(self, outputs, i):
        d = outputs.dets[i]
        keep = d["scores"].detach() >= self.score_threshold
        b = {"boxes": d["boxes"].detach()[keep].float(), "labels": d["labels"].detach()[keep],
             "scores": d["scores"].detach()[keep].float()}
        b["skip"] = None if len(b["labels"]) else f"skipped: no base detection scores >= {self.score_threshold:g}"
        return b

    def _overlaps(self, b, boxes, labels):
        """[base detections, boxes]: the box overlaps the base detection (IoU >= iou); and with its label."""
        from torchvision.ops import box_iou

        n = len(b["labels"])
        if not (n and len(boxes)):
            none = torch.zeros(n, len(boxes), dtype=torch.bool, device=boxes.device)
            return none, none
        near = box_iou(b["boxes"].to(boxes.device), boxes.detach()) >= self.iou
        return near, near & (b["labels"].to(labels.device)[:, None] == labels[None, :])

    def _match(self, outputs, i, b):
        """Per base detection: best matching output score (0 if none), and the number fabricated."""
        d = outputs.dets[i]
        boxes, labels, scores = d["boxes"].float(), d["labels"], d["scores"].float()
        best = [torch.zeros((), device=scores.device) for _ in range(len(b["labels"]))]
        confident = scores.detach() >= self.score_threshold
        near, same = self._overlaps(b, boxes, labels)
        for j, ok in enumerate(same):
            if ok.any():
                best[j] = scores[ok].max()
        # a box over a base detection under another label is that detection relabelled, not fabricated
        matched = (near & confident[None, :]).any(0)
        return best, int((confident & ~matched).sum())

    def _soft(self, outputs, i, b, j, fallback):
        """The score the gradient flows through: the best pre-NMS candidate of label l overlapping box j."""
        if outputs.pre_nms is None:
            return fallback
        from torchvision.ops import box_iou

        boxes, scores, labels = outputs.pre_nms[i]
        col = (labels == b["labels"][j].to(labels.device)).nonzero()
        if len(col) == 0 or len(boxes) == 0:
            return fallback
        c = int(col[0, 0])
        iou = box_iou(b["boxes"][j:j + 1].to(boxes.device), boxes[:, c].detach())[0]
        near = iou >= self.iou
        if not near.any():
            return fallback
        return scores[near, c].max()

    def _compare(self, outputs, i, b):
        if b["skip"]:
            return torch.tensor(1.0), 0
        best, fabricated = self._match(outputs, i, b)
        margins = []
        for j, s in enumerate(best):
            soft = self._soft(outputs, i, b, j, s)
            margins.append((s.detach() - self.score_threshold) + (soft - soft.detach()))
        m = torch.stack([x.reshape(()).float() for x in margins]).min()
        flipped = int(bool(m < 0))
        return m, flipped + 2 * min(fabricated, self.MAX_FABRICATED)

    def _agreement(self, outputs, i, b):
        if b["skip"]:
            return 1.0
        best, _ = self._match(outputs, i, b)
        return float(torch.stack([x.detach().float().cpu() for x in best]).mean())

    def record_fields(self, base_key, final, label) -> dict:
        fields = super().record_fields(base_key, final, label)
        fields["fabricated"] = 0 if final < 0 else final >> 1
        return fields

    def base_label(self, key, label) -> str:
        b = self._base(key)
        if not len(b["labels"]):
            return "none"
        return str(label(int(b["labels"][int(b["scores"].argmax())])))

    def details(self, outputs, i, base_key, label):
        """Each base detection is kept (a confident box of its label overlaps it), relabelled (only
        confident boxes of other labels do) or lost (none does); `by_label` counts them per base label."""
        b = self._base(base_key)
        d = outputs.dets[i]
        with torch.no_grad():
            confident = d["scores"].detach() >= self.score_threshold
            boxes, labels = d["boxes"].detach()[confident].float(), d["labels"].detach()[confident]
            scores = d["scores"].detach()[confident].float()
            _, fabricated = self._match(outputs, i, b)
            near, same = self._overlaps(b, boxes, labels)
        by_label: dict[str, dict] = {}
        for j in range(len(b["labels"])):
            cell = by_label.setdefault(str(label(int(b["labels"][j]))), {"n": 0, "lost": 0, "relabelled": 0})
            cell["n"] += 1
            if not same[j].any():
                cell["relabelled" if near[j].any() else "lost"] += 1
        base_boxes = _top_boxes(b["boxes"], b["labels"], b["scores"], label)
        final_boxes = _top_boxes(boxes, labels, scores, label)
        task = {"lost": sum(c["lost"] for c in by_label.values()),
                "relabelled": sum(c["relabelled"] for c in by_label.values()), "fabricated": fabricated,
                "by_label": by_label, "base_boxes": base_boxes, "final_boxes": final_boxes}
        return task, {"base": {"boxes": base_boxes}, "final": {"boxes": final_boxes}}


def _top_boxes(boxes, labels, scores, label) -> list[dict]:
    """The MAX_BOXES most confident detections as JSON: box xyxy (pixels), label name, score."""
    order = scores.detach().float().cpu().argsort(descending=True)[:MAX_BOXES].tolist()
    return [{"box": _rounded(boxes[j], 1), "label": str(label(int(labels[j]))), "score": _rounded(scores[j], 3)}
            for j in order]


def _rounded(x, digits: int):
    """A tensor or number -> JSON-safe rounded floats (nested lists for tensors); NaN/inf -> None."""
    if isinstance(x, torch.Tensor):
        if x.dim():
            return [_rounded(v, digits) for v in x.detach().cpu()]
        x = float(x)
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def soft_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] heatmap logits -> [B, K, 2] expected (x, y) in heatmap pixels (softmax weights)."""
    B, K, H, W = heatmaps.shape
    p = heatmaps.float().flatten(2).softmax(-1).view(B, K, H, W)
    xs = torch.arange(W, device=p.device, dtype=p.dtype)
    ys = torch.arange(H, device=p.device, dtype=p.dtype)
    return torch.stack([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], -1)


def heatmap_to_image(points: torch.Tensor, heatmap_size, image_size) -> torch.Tensor:
    """(x, y) in heatmap pixels -> image pixels, pixel centres aligned; sizes are (height, width)."""
    (h, w), (H, W) = heatmap_size, image_size
    return (points + 0.5) * torch.tensor([W / w, H / h], device=points.device, dtype=points.dtype) - 0.5


@contextlib.contextmanager
def base_outputs(criterion):
    """Around Searcher.base: a structured criterion records that block's base outputs (no-op otherwise)."""
    if not getattr(criterion, "structured", False):
        yield
        return
    criterion.begin_base()
    try:
        yield
    finally:
        criterion.end_base()


def definition(task: str, threshold=None, score_threshold=0.5, label=None, pair=None, background=0) -> str:
    """The flip definition of a task, fixed before the run and printed in the report."""
    if task == "keypoints":
        norm = "the image diagonal" if pair is None else f"the distance between base keypoints {pair[0]} and {pair[1]}"
        return (f"keypoints: flipped when the mean distance between the edited and the base image's keypoints, "
                f"divided by {norm}, exceeds {threshold if threshold is not None else 0.08:g}")
    if task == "segmentation":
        which = (f"class {label}" if label is not None else
                 "the base image's largest " + ("non-background class" if background is not None else "class"))
        return (f"segmentation: flipped when the mask of {which} has IoU < "
                f"{threshold if threshold is not None else 0.5:g} with the base image's mask")
    if task == "detection":
        iou = threshold if threshold is not None else 0.5
        return (f"detection: flipped when a base detection (score >= {score_threshold:g}) is lost or relabelled: no "
                f"detection with IoU >= {iou:g}, the same label and score >= {score_threshold:g}; fabricated "
                "detections are counted apart")
    if task == "multiclass":
        return "multiclass: flipped when the top-1 class changes (or, targeted, becomes the target class)"
    if task == "binary":
        return "binary: flipped when the decision (logit > 0) changes"
    if task == "multilabel":
        return f"multilabel: flipped when the decision (logit > 0) of label {label} changes"
    return task


def describe_task(target: dict) -> str:
    """The flip definition from a resolved config's `target` section (report.json: `flip_definition`)."""
    target = target or {}
    task = target.get("task") or "multiclass"
    return definition(task, threshold=target.get("threshold"), score_threshold=target.get("score_threshold") or 0.5,
                      label=target.get("label"), pair=_pair_for_text(target.get("keypoint_norm")),
                      background=target.get("background", 0))


def _pair_for_text(value):
    if not value or value == "diagonal":
        return None
    parts = [p.strip() for p in str(value).split(",")]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def parse_pair(value, names=None) -> tuple[int, int] | None:
    """target.keypoint_norm: 'diagonal' (None) or 'A,B', keypoint indices or names."""
    if value is None or value == "diagonal":
        return None
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) != 2:
        raise ZoomError(f"config key target.keypoint_norm={shown(value)} must be 'diagonal' or two keypoints 'A,B' "
                        "(indices or names, e.g. 'left_eye,right_eye')")
    out = []
    for p in parts:
        if p.lstrip("-").isdigit() and int(p) >= 0:
            out.append(int(p))
        elif names and p in names:
            out.append(list(names).index(p))
        else:
            raise ZoomError(f"config key target.keypoint_norm={shown(value)}: {shown(p)} is not a keypoint index"
                            + (f" or one of {', '.join(names)}" if names else ""))
    return out[0], out[1]


def make_structured_criterion(task, *, threshold=None, score_threshold=0.5, label=None, keypoint_norm=None,
                              background=0, labels=None, keypoint_names=None, image_size=None):
    if task == "keypoints":
        return KeypointFlip(0.08 if threshold is None else threshold, parse_pair(keypoint_norm, keypoint_names),
                            image_size)
    if task == "segmentation":
        if label is not None and not isinstance(label, int):
            if not labels or label not in labels:
                raise ZoomError(f"target.label={shown(label)} is not a class index or a label of the target")
            label = list(labels).index(label)
        return SegmentationFlip(0.5 if threshold is None else threshold, label, background)
    if task == "detection":
        return DetectionFlip(score_threshold, 0.5 if threshold is None else threshold)
    raise ZoomError(f"target.task={shown(task)} is not one of {', '.join(STRUCTURED_TASKS)}")


def check_task_output(task: str, out, spec: str, criterion=None) -> None:
    """The output of one image through the target must fit the task (one line naming both otherwise)."""
    what = describe_output(out)
    if task == "detection":
        if not isinstance(out, Detections) or len(out) != 1:
            raise ZoomError(f"target.task=detection needs torchvision-style detections (a list of dicts with boxes, "
                            f"labels, scores) from the target, but {shown(spec)} returns {what}")
        d = out.dets[0]
        if not all(k in d for k in ("boxes", "labels", "scores")):
            raise ZoomError(f"target.task=detection needs dicts with boxes, labels and scores, but {shown(spec)} "
                            f"returns dicts with {', '.join(map(str, d))}")
        return
    shape = tuple(getattr(out, "shape", ()))
    if task == "segmentation":
        if isinstance(out, Detections) or len(shape) != 4 or shape[0] != 1 or shape[1] < 2:
            raise ZoomError(f"target.task=segmentation needs logits [batch, classes >= 2, H, W] from the target, but "
                            f"{shown(spec)} returns {what}")
        label = getattr(criterion, "label", None)
        bg = getattr(criterion, "background", None)
        for key, value in (("target.label", label), ("target.background", bg)):
            if value is not None and not 0 <= value < shape[1]:
                raise ZoomError(f"config key {key}={value} is not a class of the target: it has {shape[1]} "
                                f"classes (0 to {shape[1] - 1})")
        return
    if task == "keypoints":
        ok = not isinstance(out, Detections) and shape and shape[0] == 1 and (
            (len(shape) == 3 and shape[2] == 2) or len(shape) == 4)
        if not ok:
            raise ZoomError(f"target.task=keypoints needs keypoints [batch, K, 2] or heatmaps [batch, K, H, W] from "
                            f"the target, but {shown(spec)} returns {what}")
        pair = getattr(criterion, "pair", None)
        if pair is not None and not all(0 <= p < shape[1] for p in pair):
            raise ZoomError(f"config key target.keypoint_norm names keypoint {max(pair)}, but the target gives "
                            f"{shape[1]} keypoints (0 to {shape[1] - 1})")
        return


# ---------------------------------------------------------------------------------------------
# Torchvision adapters: images [B, 3, H, W] in [0, 1] -> the task's output, the library's own numbers.


class DetectorAdapter(nn.Module):
    """A torchvision detector (it takes a list of images in [0, 1] and normalises inside) -> Detections.

    For the R-CNN family (roi_heads.postprocess_detections), the candidates before non-maximum
    suppression are kept too, rescaled to input pixels, for the margin's gradient. FCOS, RetinaNet and
    SSD give only their output (post-NMS) scores: the margin's gradient reaches surviving boxes only."""

    def __init__(self, model: nn.Module, keypoints: bool = False):
        super().__init__()
        self.model = model
        self.keypoints = keypoints
        self._captured = None
        heads = getattr(model, "roi_heads", None)
        if heads is not None and hasattr(heads, "postprocess_detections") and not keypoints:
            original = heads.postprocess_detections

            def capture(class_logits, box_regression, proposals, image_shapes):
                boxes = heads.box_coder.decode(box_regression, proposals)
                scores = class_logits.softmax(-1)
                sizes = [len(p) for p in proposals]
                kept = []
                for bx, sc, shape in zip(boxes.split(sizes), scores.split(sizes), image_shapes):
                    bx = _clip(bx, shape)
                    kept.append((bx[:, 1:], sc[:, 1:], shape))
                self._captured = kept
                return original(class_logits, box_regression, proposals, image_shapes)

            heads.postprocess_detections = capture
            self.pre_nms = True
        else:
            self.pre_nms = False

    def forward(self, images: torch.Tensor):
        from torchvision.models.detection.transform import resize_boxes

        self._captured = None
        sizes = [tuple(img.shape[-2:]) for img in images]
        dets = self.model(list(images))
        if self.keypoints:
            return keypoints_of_top_instance(dets, images)
        pre = None
        if self.pre_nms and self._captured is not None:
            n_classes = self._captured[0][1].shape[1] if self._captured else 0
            labels = torch.arange(1, n_classes + 1, device=images.device)
            pre = []
            for (bx, sc, shape), size in zip(self._captured, sizes):
                bx = resize_boxes(bx.reshape(-1, 4), shape, size).reshape(bx.shape)
                pre.append((bx, sc, labels))
        self._captured = None
        return Detections(dets, pre)


def _clip(boxes, shape):
    from torchvision.ops import boxes as box_ops

    return box_ops.clip_boxes_to_image(boxes, shape)


def keypoints_of_top_instance(dets: list[dict], images) -> torch.Tensor:
    """Keypoint R-CNN's list of dicts -> [B, K, 2]: the (x, y) of its most confident instance (the first;
    torchvision sorts by score), or NO_KEYPOINTS everywhere when it finds none. The coordinates come
    from a heatmap argmax inside torchvision, so they carry no gradient: bracketing and sweeps only."""
    out = []
    k = next((d["keypoints"].shape[1] for d in dets if len(d["keypoints"])), 17)
    for d in dets:
        if len(d["keypoints"]):
            out.append(d["keypoints"][0, :, :2])
        else:
            out.append(torch.full((k, 2), NO_KEYPOINTS, device=images.device))
    return torch.stack(out)


def torchvision_family(name: str) -> str | None:
    import torchvision.models as tvm

    if name in tvm.list_models(module=tvm.detection):
        return "keypoints" if name.startswith("keypointrcnn") else "detection"
    if name in tvm.list_models(module=tvm.segmentation):
        return "segmentation"
    return None


def task_target(name: str, model: nn.Module, weights=None):
    """A torchvision detection / keypoint / segmentation model (built) -> a zoom Target.

    weights: the torchvision weights entry it was built with (its preprocessing and names), or None
    (random or local weights: segmentation gets ImageNet normalisation and no resize)."""
    from .targets import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Target

    family = torchvision_family(name)
    meta = weights.meta if weights is not None else {}
    if family == "segmentation":  # its {"out": logits} is read by Target (as_output)
        t = weights.transforms() if weights is not None else None
        preprocess = (Preprocess(t.resize_size, None, t.mean, t.std) if t is not None
                      else Preprocess(None, None, IMAGENET_MEAN, IMAGENET_STD))
        target = Target(model, preprocess, meta.get("categories"))
    elif family in ("detection", "keypoints"):
        target = Target(DetectorAdapter(model, keypoints=family == "keypoints"), None, meta.get("categories"))
    else:
        raise ZoomError(f"target.spec: torchvision {shown(name)} is not a detection, keypoint or segmentation model")
    target.keypoint_names = meta.get("keypoint_names")
    return target


# ---------------------------------------------------------------------------------------------
# transformers adapters (hf: specs): the task's output from the library's own model classes and,
# for detection, its image processor's own post-processing (differentiable: softmax/sigmoid, top-k,
# box scaling), so the numbers are the library's and the margin's gradient reaches the scores.

HF_TASK_MODELS = {"segmentation": "AutoModelForSemanticSegmentation",
                  "keypoints": "VitPoseForPoseEstimation",  # top-down: the whole image is the person's box
                  "detection": "AutoModelForObjectDetection"}
HF_DETECTION_SCORE_FLOOR = 0.05  # the lowest score kept, as torchvision detectors' box_score_thresh


class HFTaskAdapter(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> segmentation logits upsampled to [B, C, H, W] (as the image
    processors' post_process_semantic_segmentation does), keypoints [B, K, 2] in image pixels (a
    soft-argmax of the heatmaps), or Detections in image pixels (post_process_object_detection)."""

    def __init__(self, model: nn.Module, preprocess: nn.Module, processor, task: str):
        super().__init__()
        self.model, self.preprocess, self.processor, self.task = model, preprocess, processor, task

    def forward(self, images: torch.Tensor):
        H, W = images.shape[-2:]
        out = self.model(self.preprocess(images))
        if self.task == "segmentation":
            return nn.functional.interpolate(out.logits, size=(H, W), mode="bilinear", align_corners=False)
        if self.task == "keypoints":
            return heatmap_to_image(soft_argmax(out.heatmaps), out.heatmaps.shape[-2:], (H, W))
        sizes = torch.tensor([[H, W]] * len(images), device=images.device)
        dets = self.processor.post_process_object_detection(out, threshold=HF_DETECTION_SCORE_FLOOR,
                                                            target_sizes=sizes)
        return Detections([{"boxes": d["boxes"], "labels": d["labels"], "scores": d["scores"]} for d in dets])
