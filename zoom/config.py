"""The run config: YAML (configs/*.yaml) + CLI overrides -> typed, validated dataclasses.

Every problem is a ZoomError naming the key, the value and the fix. `resolved()` gives the
config as stored in RUN_DIR/config.yaml: the same shape, defaults filled in, paths absolute and
the prompt file's content copied under `prompts`, so a run directory is self-describing and
`--resume` can check it is continuing the same run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field

import yaml

from .errors import ZoomError, clip, looks_like_path, shown, shown_path
from .prompts import bundled, find_bundled, load_prompts
from .files import read_yaml

MODES = ("single", "joint", "sweep")
DESCRIBED = ("target.spec", "prompts", "oracle")  # keys a config's description is about
EDIT_SPACES = ("text", "latent", "both")
PRECISIONS = ("fp32", "bf16", "fp16")
TASKS = ("binary", "multiclass", "multilabel", "keypoints", "segmentation", "detection")


@dataclass
class GeneratorConfig:
    model: str = "stabilityai/sd-turbo"
    revision: typing.Optional[str] = None
    steps: int = 1
    guidance_scale: float = 0.0
    resolution: typing.Optional[int] = 512  # None: the model's native size
    loop_decoder: typing.Optional[str] = None  # AutoencoderTiny (TAESD) id/folder for images inside the loop
    gradient_checkpointing: bool = False  # UNet and decoders: less memory, more time


@dataclass
class ClipConfig:
    model: str = "ViT-B-32"
    pretrained: typing.Optional[str] = "laion2b_s34b_b79k"


@dataclass
class TargetConfig:
    spec: str = "torchvision:resnet50:IMAGENET1K_V2"
    task: str = "multiclass"
    label: typing.Union[int, str, None] = None  # multilabel: the label audited; segmentation: the class (default largest)
    target_class: typing.Union[int, str, None] = None  # multiclass: flip *to* this class (targeted)
    trust_remote_code: bool = False
    # keypoints: normalised mean error above which it flips (default 0.08); segmentation: IoU below which
    # it flips (0.5); detection: the IoU a kept detection needs with its base box (0.5)
    threshold: typing.Optional[float] = None
    score_threshold: float = 0.5  # detection: base and matching detections score at least this
    keypoint_norm: str = "diagonal"  # keypoints: error normaliser, the image diagonal or a pair 'A,B' (e.g. left_eye,right_eye)
    background: typing.Optional[int] = 0  # segmentation: the class never audited by default (null: none)


@dataclass
class SearchConfig:
    mode: str = "single"
    edit_space: str = "text"
    samples: int = 64  # seeds per attribute
    seed: int = 0  # first seed; sample i uses seed + i
    batch_size: int = 8  # seeds per forward pass
    alpha_max: float = 1.0  # 0 <= alpha <= alpha_max; 1 = the attribute's own caption, more extrapolates
    grid_points: int = 4  # bracketing search: coarse grid points in (0, alpha_max]
    tolerance: float = 0.02  # bracketing search: bisect until the flip is located within this much alpha
    delta_max: float = 0.05  # bound on |delta| / |initial noise| (latent edit space)
    max_steps: int = 20  # gradient search: optimiser steps per sample before giving up
    lr: float = 0.3
    lambda_clip: float = 0.5  # weight of the directional CLIP loss
    lambda_alpha: float = 0.01  # L1 penalty on alpha (sparsity in joint mode)
    lambda_delta: float = 1.0  # penalty on the latent residual's relative norm
    kappa: float = 0.0  # flip margin in logits: the loss keeps pushing until margin < -kappa
    sweep_points: int = 13  # grid size in sweep mode


@dataclass
class Config:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    guide: ClipConfig = field(default_factory=ClipConfig)
    judge: ClipConfig = field(default_factory=lambda: ClipConfig("ViT-B-16", "laion2b_s34b_b88k"))
    target: TargetConfig = field(default_factory=TargetConfig)
    prompts: typing.Union[str, dict] = "faces"
    search: SearchConfig = field(default_factory=SearchConfig)
    precision: str = "bf16"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    description: typing.Optional[str] = None  # what this run is about, shown at the top of the report
    # Optional ground truth for validity: {attribute name: {spec: TARGET_SPEC, label: LABEL}}, a classifier
    # for the attribute (an "oracle") and the label that means the attribute is present.
    oracle: dict = field(default_factory=dict)

    def resolved(self) -> dict:
        out = dataclasses.asdict(self)
        out["prompts"] = load_prompts(self.prompts).to_dict()
        return out


def _check_type(value, annotation, key):
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin is typing.Union else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool, dict) and isinstance(value, option):
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ZoomError(f"config key {key}: expected {names}, got {shown(value)}")


def _build(cls, data, prefix=""):
    if not isinstance(data, dict):
        raise ZoomError(f"config section {prefix.rstrip('.') or '(top level)'} must be a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ZoomError(f"unknown config key {prefix}{clip(unknown[0])}; allowed in this section: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, prefix + name)
    return cls(**kwargs)


def load_config(path=None, overrides: dict | None = None) -> Config:
    """Read YAML, apply CLI overrides ({'search.samples': 8, ...}), resolve paths, validate."""
    data = {}
    base_dir = os.getcwd()
    if path is not None:
        found = find_bundled(path, "configs")
        if found is None:
            raise ZoomError(f"config {shown_path(path)} does not exist: neither a file nor a bundled config "
                            f"({', '.join(bundled('configs'))})")
        path = found
        if not os.path.isfile(path):
            raise ZoomError(f"config {shown_path(path)} is not a file")
        data = read_yaml(path, "config file", user=True) or {}
        base_dir = os.path.dirname(os.path.abspath(path))
    if not isinstance(data, dict):
        raise ZoomError(f"config file {shown_path(path)} must be a YAML mapping of sections")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if node.get(p) is None:  # absent, or an empty `section:` that YAML reads as None
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ZoomError(f"config section {p} must be a mapping, got {shown(node[p])}")
            node = node[p]
        node[leaf] = value
    config = _build(Config, data)
    # what the config's description may no longer describe (the report says so)
    config.overridden = sorted(k for k, v in (overrides or {}).items() if v is not None and k in DESCRIBED)
    _resolve_paths(config, base_dir)
    validate(config)
    return config


def _expand(value: str) -> str:
    """~ and $VARS; `${ZOOM_TINY}` names the tiny random models (built on first use), `${ZOOM_WORLD}`
    the trained shapes world that ships inside the package."""
    if "ZOOM_TINY" in value and "ZOOM_TINY" not in os.environ:
        from .tiny import build_tiny_models

        os.environ["ZOOM_TINY"] = str(build_tiny_models()["sd"].parent)
    if "ZOOM_WORLD" in value and "ZOOM_WORLD" not in os.environ:
        from .world import models_dir

        os.environ["ZOOM_WORLD"] = str(models_dir())
    return os.path.expandvars(os.path.expanduser(value))


def _resolve_path(value: str, base_dir: str) -> str:
    """Relative paths are tried against the current directory, then against the config's folder."""
    expanded = _expand(value)
    if os.path.isabs(expanded):
        return expanded
    for root in (os.getcwd(), base_dir, os.path.dirname(base_dir)):
        candidate = os.path.join(root, expanded)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return os.path.abspath(expanded)


def _resolve_paths(c: Config, base_dir: str) -> None:
    if isinstance(c.prompts, str):
        resolved = _resolve_path(c.prompts, base_dir)
        c.prompts = resolved if os.path.exists(resolved) else (find_bundled(c.prompts, "prompts") or resolved)
    c.generator.model = _expand(c.generator.model)
    if looks_like_path(c.generator.model):
        c.generator.model = _resolve_path(c.generator.model, base_dir)
    if c.generator.loop_decoder:
        c.generator.loop_decoder = _expand(c.generator.loop_decoder)
        if looks_like_path(c.generator.loop_decoder):
            c.generator.loop_decoder = _resolve_path(c.generator.loop_decoder, base_dir)
    for clip in (c.guide, c.judge):
        if clip.model.startswith("local-dir:"):
            clip.model = "local-dir:" + _resolve_path(clip.model[len("local-dir:"):], base_dir)
    c.target.spec = _resolve_spec(c.target.spec, base_dir)
    for oracle in c.oracle.values():
        if isinstance(oracle, dict) and isinstance(oracle.get("spec"), str):
            oracle["spec"] = _resolve_spec(oracle["spec"], base_dir)


def _resolve_spec(spec: str, base_dir: str) -> str:
    kind, _, rest = spec.partition(":")
    rest = _expand(rest)
    if kind in ("hf", "torchscript") and looks_like_path(rest):
        return f"{kind}:{_resolve_path(rest, base_dir)}"
    return f"{kind}:{rest}"


def _choice(key, value, choices):
    if value not in choices:
        raise ZoomError(f"config key {key}={shown(value)} must be one of {', '.join(choices)}")


# Ranges of the numeric keys: (key, low, high, what). Bounds are inclusive; None is unbounded.
MAX_SEED = 2 ** 63 - 1  # torch.Generator().manual_seed takes 64-bit seeds
RANGES = [
    ("search.samples", 1, 10 ** 6, "seeds per attribute"),
    ("search.seed", 0, MAX_SEED, "the first seed"),
    ("search.batch_size", 1, 4096, "seeds per forward pass"),
    ("search.max_steps", 0, 10 ** 5, "optimiser steps"),
    ("search.sweep_points", 2, 1001, "grid points"),
    ("search.alpha_max", 1e-6, 1e3, "the bound on alpha"),
    ("search.grid_points", 1, 1000, "bracket grid points"),
    ("search.tolerance", 1e-6, 1e3, "the bracket's tolerance in alpha"),
    ("search.delta_max", 1e-6, 1e3, "the bound on |delta| / |noise|"),
    ("search.lr", 1e-9, 1e3, "the learning rate"),
    ("search.lambda_clip", 0.0, 1e6, "a loss weight"),
    ("search.lambda_alpha", 0.0, 1e6, "a loss weight"),
    ("search.lambda_delta", 0.0, 1e6, "a loss weight"),
    ("search.kappa", 0.0, 1e6, "a margin in logits"),
    ("generator.steps", 1, 1000, "sampler steps"),
    ("generator.guidance_scale", 0.0, 100.0, "the guidance scale"),
    ("generator.resolution", 8, 4096, "the image side in pixels"),
]


def _show(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _get(c: Config, dotted: str):
    node = c
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(c: Config) -> None:
    s = c.search
    _choice("search.mode", s.mode, MODES)
    _choice("search.edit_space", s.edit_space, EDIT_SPACES)
    _choice("precision", c.precision, PRECISIONS)
    _choice("target.task", c.target.task, TASKS)
    for key, low, high, what in RANGES:
        value = _get(c, key)
        if value is None and key == "generator.resolution":
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ZoomError(f"config key {key}={shown(value)} must be a finite number ({what})")
        if not low <= value <= high:
            raise ZoomError(f"config key {key}={shown(value)} is out of range: {what} must be between {_show(low)} and "
                            f"{_show(high)}")
    if s.seed + s.samples - 1 > MAX_SEED:
        raise ZoomError(f"config keys search.seed={s.seed} and search.samples={s.samples}: the last seed would pass "
                        f"{MAX_SEED} (the largest 64-bit seed)")
    for key in ("target.target_class", "target.label"):
        value = _get(c, key)
        if isinstance(value, int) and value < 0:
            raise ZoomError(f"config key {key}={shown(value)} must be a class index >= 0 or a label name")
    t = c.target
    if t.threshold is not None:
        high = math.inf if t.task == "keypoints" else 1.0
        if t.task not in ("keypoints", "segmentation", "detection"):
            raise ZoomError(f"config key target.threshold applies to tasks keypoints, segmentation and detection, "
                            f"not {t.task}")
        if not (math.isfinite(t.threshold) and 0 < t.threshold <= high):
            raise ZoomError(f"config key target.threshold={shown(t.threshold)} is out of range: it must be > 0"
                            + ("" if high == math.inf else " and <= 1"))
    if not (math.isfinite(t.score_threshold) and 0 < t.score_threshold <= 1):
        raise ZoomError(f"config key target.score_threshold={shown(t.score_threshold)} must be > 0 and <= 1")
    if t.background is not None and t.background < 0:
        raise ZoomError(f"config key target.background={shown(t.background)} must be a class index >= 0 or null")
    if t.label is not None and t.task in ("keypoints", "detection"):
        raise ZoomError(f"config key target.label applies to tasks multilabel and segmentation, not {t.task}")
    parts = [p.strip() for p in t.keypoint_norm.split(",")]
    if t.keypoint_norm != "diagonal" and (len(parts) != 2 or not all(parts)):
        raise ZoomError(f"config key target.keypoint_norm={shown(t.keypoint_norm)} must be 'diagonal' or two "
                        "keypoints 'A,B' (indices or names, e.g. 'left_eye,right_eye')")
    if c.target.target_class is not None and c.target.task != "multiclass":
        raise ZoomError(f"config key target.target_class applies to task multiclass, not {c.target.task}")
    if s.mode == "sweep" and s.edit_space != "text":
        raise ZoomError("search.mode=sweep walks alpha on a grid: it needs search.edit_space=text")
    if not (c.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", c.device)):
        raise ZoomError(f"config key device={shown(c.device)} must be auto, cpu, cuda or cuda:N")
    from .targets import parse_spec

    parse_spec(c.target.spec)
    prompts = load_prompts(c.prompts)  # fail now, before any model loads, on a bad prompt file
    names = [a.name for a in prompts.attributes]
    c.notes = []  # printed once the run starts, so a refusal stays one line
    for name in [n for n in c.oracle if n not in names]:
        # one config serves several prompt sets: an oracle for an attribute this run lacks has nothing to judge
        c.notes.append(f"zoom: note: config key oracle.{clip(name)}: no attribute {shown(name)} in the prompts, so this "
                       "oracle is not used")
        del c.oracle[name]
    for name, oracle in c.oracle.items():
        if not isinstance(oracle, dict) or set(oracle) != {"spec", "label"} or not isinstance(oracle["spec"], str) \
                or not isinstance(oracle["label"], (str, int)) or isinstance(oracle["label"], bool):
            raise ZoomError(f"config key oracle.{clip(name)} must be a mapping with 'spec' (a target spec) and 'label' "
                            f"(the class that means {shown(name)} is present), got {shown(oracle)}")
        parse_spec(oracle["spec"])


def dump_config(resolved: dict) -> str:
    return yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
