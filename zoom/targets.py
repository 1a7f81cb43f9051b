"""The model under audit: target specs -> an nn.Module that takes RGB [B, 3, H, W] in [0, 1] and
returns logits, with the model's own preprocessing inside the graph; and the flip criteria that
say, per task, what "the prediction changed" means.

Specs (DESIGN §3): torchvision:NAME[:WEIGHTS], timm:NAME[:WEIGHTS_FILE], hf:REPO_ID_OR_PATH,
torchscript:PATH, python:MODULE:CALLABLE, or an nn.Module passed from Python.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from .errors import ZoomError, clip, load_failure, looks_like_path, shown, shown_path

SPEC_KINDS = ("torchvision", "timm", "hf", "torchscript", "python")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Preprocess(nn.Module):
    """Resize (shortest side, or to an exact (h, w)), centre-crop, normalise: torchvision ops on tensors."""

    def __init__(self, resize_size=None, crop_size=None, mean=None, std=None,
                 interpolation=InterpolationMode.BILINEAR):
        super().__init__()
        self.resize_size, self.crop_size = resize_size, crop_size
        self.mean, self.std = mean, std
        self.interpolation = interpolation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.resize_size is not None:
            x = TF.resize(x, self.resize_size, interpolation=self.interpolation, antialias=True)
        if self.crop_size is not None:
            x = TF.center_crop(x, self.crop_size)
        if self.mean is not None:
            x = TF.normalize(x, list(self.mean), list(self.std))
        return x


class Target(nn.Module):
    """A frozen classifier with its preprocessing in the graph: images in [0, 1] -> logits [B, C]."""

    def __init__(self, model: nn.Module, preprocess: nn.Module | None = None, labels=None,
                 spec: str = "module", output=None):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():  # (ScriptModules have no requires_grad_)
            p.requires_grad_(False)
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        self.labels = list(labels) if labels is not None else None
        self.spec = spec
        self._output = output  # picks logits out of a model's output object (transformers)
        self.keypoint_names = getattr(model, "keypoint_names", None)  # keypoints task: names for target.keypoint_norm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from .tasks import as_output

        out = self.model(self.preprocess(images))
        if self._output is not None:
            out = self._output(out)
        # segmentation models' {"out": logits} -> logits; detectors' list of dicts -> tasks.Detections
        return as_output(out).float()

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return str(self.labels[index])
        return str(index)


class DirectionReadout(nn.Module):
    """A planted two-class model: logits [0, scale * (<image - center, direction> - tau)].

    Its true sensitivity is known by construction (it sees only the image's component along
    `direction`), which makes it the ground truth for checking an audit's statistics.
    """

    def __init__(self, direction: torch.Tensor, center: torch.Tensor, tau: float, scale: float):
        super().__init__()
        self.register_buffer("direction", direction)
        self.register_buffer("center", center)
        self.tau, self.scale = tau, scale

    def forward(self, images):
        s = (images.flatten(1) - self.center) @ self.direction
        logit = self.scale * (s - self.tau)
        return torch.stack([torch.zeros_like(logit), logit], -1)


# ---------------------------------------------------------------------------------------------
# Loading


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    kind, _, rest = spec.partition(":")
    if kind not in SPEC_KINDS or not rest:
        raise ZoomError(
            f"target.spec {shown(spec)} is not a known target spec; use one of torchvision:NAME[:WEIGHTS], "
            "timm:NAME[:FILE], hf:REPO_OR_PATH, torchscript:PATH, python:MODULE:CALLABLE"
        )
    if kind in ("torchvision", "timm", "python"):
        name, _, extra = rest.partition(":")
        return kind, name, extra or None
    return kind, rest, None


def load_target(spec, *, trust_remote_code: bool = False, device="cpu", task: str | None = None) -> Target:
    """`task` (the config's target.task) picks the transformers model class of an hf: spec; the other
    kinds give their model's own output whatever the task."""
    if isinstance(spec, Target):
        return spec.to(device)
    if isinstance(spec, nn.Module):
        return Target(spec).to(device)
    kind, name, extra = parse_spec(spec)
    try:
        loader = {"torchvision": _torchvision, "timm": _timm, "hf": _hf,
                  "torchscript": _torchscript, "python": _python}[kind]
        if kind == "hf":
            target = loader(name, trust_remote_code, task)
        else:
            target = loader(name, extra)
    except ZoomError:
        raise
    except Exception as e:
        raise load_failure("target.spec", spec, e) from e
    target.spec = spec
    return target.to(device)


def _existing_file(path: str, what: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ZoomError(f"{what}: file {shown_path(path)} does not exist")
    return path


def load_state_dict(path: str) -> dict:
    """Weights from safetensors or a plain state dict; never unpickles arbitrary objects."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a pickle of Python objects: never unpickled, and said so
        from .weights import pickle_failure, pickle_message

        raise ZoomError(pickle_message("target weights", path, (pickle_failure(e) or ("",))[0], path)) from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _torchvision(name: str, weights: str | None) -> Target:
    import torchvision.models as tvm

    from .tasks import task_target, torchvision_family

    if name not in tvm.list_models():
        raise ZoomError(f"target.spec: torchvision has no model {shown(name)} (see torchvision.models.list_models())")
    enum = tvm.get_model_weights(name)
    if weights is not None and (looks_like_path(weights) or os.path.splitext(weights)[1] in (".pth", ".pt", ".safetensors")):
        path = _existing_file(weights, "target weights")
        state = load_state_dict(path)
        # A file torchvision itself published (same basename as a weights URL) brings that entry's
        # preprocessing and class names; any other file gets ImageNet defaults.
        known = next((w for w in enum if os.path.basename(w.url) == os.path.basename(path)), None)
        if torchvision_family(name):  # detection / keypoints / segmentation: the library's default heads
            model = tvm.get_model(name, weights=None, weights_backbone=None)
            model.load_state_dict(state)
            return task_target(name, model, known)
        num_classes = len(known.meta["categories"]) if known else _classifier_width(state)
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
        model.load_state_dict(state)
        preprocess = (_from_torchvision_transforms(known.transforms()) if known else
                      Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD))
        return Target(model, preprocess, known.meta["categories"] if known else None)
    try:
        w = enum[weights or "DEFAULT"]
    except KeyError:
        choices = ", ".join(m.name for m in enum)
        raise ZoomError(f"target.spec: torchvision {name} has no weights {shown(weights)}; choose one of {choices}, "
                        "or give a local .pth/.safetensors path") from None
    model = tvm.get_model(name, weights=w)
    if torchvision_family(name):
        return task_target(name, model, w)
    return Target(model, _from_torchvision_transforms(w.transforms()), w.meta.get("categories"))


def _classifier_width(state: dict) -> int:
    matrices = [v for v in state.values() if getattr(v, "ndim", 0) == 2]
    if not matrices:
        raise ZoomError("target weights: cannot find a classifier layer to infer the number of classes")
    return int(matrices[-1].shape[0])


def _from_torchvision_transforms(t) -> Preprocess:
    return Preprocess(t.resize_size, t.crop_size, t.mean, t.std, t.interpolation)


def _timm(name: str, weights_file: str | None) -> Target:
    import timm
    from timm.data import resolve_data_config

    if not timm.list_models(name) and not timm.is_model(name):
        raise ZoomError(f"target.spec: timm has no model {shown(name)}")
    if weights_file:
        state = load_state_dict(_existing_file(weights_file, "target weights"))
        model = timm.create_model(name, pretrained=False, num_classes=_classifier_width(state))
        model.load_state_dict(state)
    else:
        model = timm.create_model(name, pretrained=True)
    cfg = resolve_data_config(model=model)
    size = cfg["input_size"][1:]
    crop_pct = cfg.get("crop_pct") or 1.0
    interpolation = InterpolationMode.BICUBIC if cfg.get("interpolation") == "bicubic" else InterpolationMode.BILINEAR
    resize = math.floor(size[0] / crop_pct) if size[0] == size[1] else [math.floor(s / crop_pct) for s in size]
    return Target(model, Preprocess(resize, list(size), cfg["mean"], cfg["std"], interpolation))


def _hf(name: str, trust_remote_code: bool, task: str | None = None) -> Target:
    import transformers
    from transformers import AutoImageProcessor

    from .tasks import HF_TASK_MODELS, HFTaskAdapter

    if looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise ZoomError(f"target.spec: folder {shown_path(name)} does not exist")
    name = os.path.expanduser(name)
    auto = getattr(transformers, HF_TASK_MODELS.get(task, "AutoModelForImageClassification"))
    try:
        if task in HF_TASK_MODELS:
            _check_hf_task(name, task, auto, trust_remote_code)
        model = auto.from_pretrained(name, trust_remote_code=trust_remote_code)
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ZoomError(f"target.spec: {shown_path(name)} holds custom code for its model, which zoom runs only with "
                        "--trust-remote-code: read that code first, then pass the flag") from None
    id2label = model.config.id2label
    labels = [id2label[i] for i in range(len(id2label))] if id2label else None
    if task in HF_TASK_MODELS:
        target = Target(HFTaskAdapter(model, _from_hf_processor(processor), processor, task), None, labels)
        target.keypoint_names = labels if task == "keypoints" else None
        return target
    return Target(model, _from_hf_processor(processor), labels, output=lambda out: out.logits)


def _check_hf_task(name: str, task: str, auto, trust_remote_code: bool) -> None:
    """The folder's model must be one of the task's transformers classes: one line naming both otherwise."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    fits = (config.model_type == "vitpose" if task == "keypoints"
            else type(config) in auto._model_mapping)  # (the classes an Auto class can build)
    if not fits:
        held = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ZoomError(f"target.task={task} needs a model that transformers' {auto.__name__} loads, but "
                        f"target.spec {shown_path(name)} holds {held}")


def _from_hf_processor(p) -> Preprocess:
    size = getattr(p, "size", None) or {}
    size = ({k: v for k, v in dict(size).items() if v is not None}  # (SizeDict lists unset keys as None)
            if not isinstance(size, int) else {"shortest_edge": size})
    resample = getattr(p, "resample", None) or 2  # (None in some processors: their default, bilinear)
    interpolation = InterpolationMode.BICUBIC if int(resample) == 3 else InterpolationMode.BILINEAR
    resize = crop = None
    if getattr(p, "do_resize", True) is not False:  # (None in VitPose's, which resizes by an affine warp)
        if "shortest_edge" in size:
            resize = size["shortest_edge"]
            crop_pct = getattr(p, "crop_pct", None)
            if crop_pct and resize < 384:  # ConvNeXt-style: resize up then crop back
                resize, crop = int(resize / crop_pct), [size["shortest_edge"]] * 2
        elif "height" in size:
            resize = [size["height"], size["width"]]
    if getattr(p, "do_center_crop", False) and getattr(p, "crop_size", None):
        cs = p.crop_size
        crop = [cs["height"], cs["width"]] if isinstance(cs, dict) else cs
    mean = std = None
    if getattr(p, "do_normalize", True):
        mean, std = p.image_mean, p.image_std
    return Preprocess(resize, crop, mean, std, interpolation)


def _torchscript(path: str, _extra=None) -> Target:
    return Target(torch.jit.load(_existing_file(path, "target.spec torchscript"), map_location="cpu"))


def _python(module_name: str, attr: str | None) -> Target:
    if not attr:
        raise ZoomError(f"target.spec python:{clip(module_name)} needs a callable: python:MODULE:CALLABLE")
    if module_name.endswith(".py"):
        path = Path(_existing_file(module_name, "target.spec python module"))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ZoomError(f"target.spec: {clip(module_name)} has no callable {shown(attr)}")
    made = factory()
    model, preprocess = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module):
        raise ZoomError(f"target.spec: {clip(module_name)}:{clip(attr)}() must return an nn.Module or (module, preprocess)")
    if isinstance(model, Target):
        return model
    return Target(model, preprocess, getattr(model, "labels", None))


# ---------------------------------------------------------------------------------------------
# Flip criteria: one small class per task. `margin` > 0 keeps the base decision, < 0 flips it; the
# search minimises relu(margin + kappa), so the same number drives the loss and the stop rule.


class MulticlassFlip:
    """Top-1 label changes (untargeted), or becomes `target_class` (targeted)."""

    def __init__(self, target_class: int | None = None):
        self.target_class = target_class

    def decision(self, logits):
        return logits.argmax(-1)

    def base_prob(self, logits, base):
        return logits.softmax(-1).gather(-1, base[:, None])[:, 0]

    def margin(self, logits, base):
        if self.target_class is None:
            other = logits.scatter(-1, base[:, None], float("-inf")).amax(-1)
            return logits.gather(-1, base[:, None])[:, 0] - other
        t = self.target_class
        other = logits.clone()
        other[:, t] = float("-inf")
        return other.amax(-1) - logits[:, t]

    def skip_reason(self, base: int) -> str | None:
        return "skipped: base prediction is already the target class" if base == self.target_class else None


class BinaryFlip:
    """A one-logit binary classifier's decision (logit > 0) changes. Two logits count as l1 - l0."""

    def __init__(self, column: int | None = None):
        self.column = column  # multilabel: the label whose decision is audited

    def _logit(self, logits):
        if self.column is not None:
            return logits[:, self.column]
        if logits.ndim == 1:
            return logits
        if logits.shape[-1] == 1:
            return logits[:, 0]
        if logits.shape[-1] == 2:
            return logits[:, 1] - logits[:, 0]
        raise ZoomError(f"target.task=binary needs 1 or 2 outputs, the target gives {logits.shape[-1]}")

    def decision(self, logits):
        return (self._logit(logits) > 0).long()

    def base_prob(self, logits, base):
        p = torch.sigmoid(self._logit(logits))
        return torch.where(base.bool(), p, 1 - p)

    def margin(self, logits, base):
        return self._logit(logits) * (2 * base - 1).to(logits.dtype)

    def skip_reason(self, base: int) -> str | None:
        return None


def make_criterion(task: str, label=None, target_class=None, labels=None, **structured):
    """The flip criterion of a task. Keypoints, segmentation and detection (zoom/tasks.py) take their
    keys as keywords: threshold, score_threshold, keypoint_norm, background, keypoint_names, image_size."""
    from .tasks import STRUCTURED_TASKS, make_structured_criterion

    if task in STRUCTURED_TASKS:
        return make_structured_criterion(task, label=label, labels=labels, **structured)
    if task == "multiclass":
        return MulticlassFlip(_class_index(target_class, labels, "target.target_class"))
    if task == "binary":
        return BinaryFlip()
    if task == "multilabel":
        if label is None:
            raise ZoomError("target.task=multilabel needs target.label: the label whose decision is audited")
        return BinaryFlip(_class_index(label, labels, "target.label"))
    raise ZoomError(f"target.task={shown(task)} is not one of binary, multiclass, multilabel, "
                    f"{', '.join(STRUCTURED_TASKS)}")


def _class_index(value, labels, key):
    if value is None or isinstance(value, int):
        return value
    if labels and value in labels:
        return labels.index(value)
    raise ZoomError(f"{key}={shown(value)} is not a class index or a label of the target")
