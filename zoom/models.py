"""Loading every model an audit needs (generator, guide, judge, target, oracles), the device, and the
provenance of what was loaded (run.json): versions, ids, revisions and file hashes.

Every failure is a ZoomError raised before anything is written to the run directory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config
from .errors import ZoomError, clip, go_offline_if_hub_unreachable, looks_like_path, shown


@dataclass
class Models:
    generator: object
    guide: object
    judge: object
    target: object
    criterion: object
    oracles: dict | None = None  # attribute name -> (classifier, index of the label meaning "present")


def quiet_libraries():
    """No loading bars or library warnings between zoom's own lines (CLI and Python API alike)."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for module in ("huggingface_hub", "diffusers", "transformers", "open_clip", "torch"):
        warnings.filterwarnings("ignore", module=module)


SMALL_UNET = 20_000_000  # parameters; below this, CPU threads mostly wait on each other


def configure_threads(device, generator, processes: int = 1) -> int:
    """Torch's CPU threads, unless OMP_NUM_THREADS says otherwise: one per process for small models (the
    world's, the tiny test models), where torch's default of one per core was several times slower on a
    busy machine; one per core (shared among processes) for full-size models."""
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    size = sum(p.numel() for p in generator.unet.parameters())
    threads = 1 if size < SMALL_UNET else max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    return threads


def pick_device(config: Config, state=None) -> torch.device:
    if config.device != "auto":
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ZoomError(f"device={shown(config.device)} but no CUDA GPU is visible; use device: cpu or auto")
        return torch.device(config.device)
    if state is not None and state.device.type != "cpu":
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_models(config: Config, device, target=None) -> Models:
    """Load every model the audit needs; any failure is a ZoomError raised before output is written.

    `target` (an nn.Module) replaces config.target.spec: the Python API's way to audit a model in memory.
    """
    from .generator import Generator
    from .guide import Clip
    from .manifest import check_models
    from .prompts import load_prompts
    from .targets import load_target, make_criterion
    from .tasks import STRUCTURED_TASKS
    from .words import check_readable

    check_models(config, target=target is None)  # a model folder with a MANIFEST.json (the world) must match it
    g = config.generator
    ids = [g.model, g.loop_decoder or "/", config.target.spec.partition(":")[2] if config.target.spec.startswith("hf:") else "/"]
    ids += [c.model for c in (config.guide, config.judge) if c.pretrained and not c.model.startswith("local-dir:")]
    if any(not looks_like_path(i) for i in ids):
        go_offline_if_hub_unreachable()
    generator = Generator.from_pretrained(g.model, revision=g.revision, steps=g.steps,
                                          guidance_scale=g.guidance_scale, resolution=g.resolution,
                                          device=device, loop_decoder=g.loop_decoder,
                                          gradient_checkpointing=g.gradient_checkpointing)
    # Each tokenizer must read every prompt it will be given, checked as soon as it is loaded: a word it
    # cannot read would be noise to its model, and every number about that prompt meaningless.
    prompts = load_prompts(config.prompts)
    check_readable(prompts, generator.pipe.tokenizer, "generator's tokenizer (generator.model)")
    guide = Clip.load(config.guide.model, config.guide.pretrained, device)
    check_readable(prompts, guide.tokenizer, "guide CLIP's tokenizer (guide.model)")
    judge = Clip.load(config.judge.model, config.judge.pretrained, device)
    check_readable(prompts, judge.tokenizer, "judge CLIP's tokenizer (judge.model)", nulls=False)  # it judges attributes
    target = load_target(target if target is not None else config.target.spec,
                         trust_remote_code=config.target.trust_remote_code, device=device, task=config.target.task)
    t = config.target
    structured = {}
    if t.task in STRUCTURED_TASKS:
        structured = dict(threshold=t.threshold, score_threshold=t.score_threshold, keypoint_norm=t.keypoint_norm,
                          background=t.background, keypoint_names=getattr(target, "keypoint_names", None),
                          image_size=generator.resolution)
    criterion = make_criterion(t.task, t.label, t.target_class, target.labels, **structured)
    check_target_output(target, config, generator.resolution, device, criterion)
    oracles = {}
    for name, oracle in config.oracle.items():
        model = load_target(oracle["spec"], device=device)
        oracles[name] = (model, _label_index(model, oracle["label"], f"oracle.{name}.label"))
    return Models(generator, guide, judge, target, criterion, oracles)


def check_target_output(target, config: Config, resolution: int, device, criterion=None) -> None:
    """One grey image through the target before any work: its output must fit the task, and the class
    or label the config names must exist (a negative or too large index is refused, not wrapped)."""
    from .tasks import STRUCTURED_TASKS, check_task_output, describe_output

    task, t = config.target.task, config.target
    try:
        with torch.no_grad():
            out = target(torch.full((1, 3, resolution, resolution), 0.5, device=device))
    except Exception as e:
        raise ZoomError(f"target {shown(t.spec)} fails on a {resolution}x{resolution} RGB image: "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if task in STRUCTURED_TASKS:
        check_task_output(task, out, t.spec, criterion)
        return
    shape = tuple(getattr(out, "shape", ()))
    if len(shape) != 2 or shape[0] != 1:
        raise ZoomError(f"target.task={task} needs logits [batch, classes] from the target, but {shown(t.spec)} returns "
                        f"{describe_output(out)}")
    classes = shape[1]
    if task == "multiclass" and classes < 2:
        raise ZoomError(f"target.task=multiclass needs at least 2 logits; {shown(t.spec)} returns {classes} "
                        "(use task: binary for one logit)")
    for key, value in (("target.target_class", t.target_class), ("target.label", t.label)):
        if isinstance(value, int) and not 0 <= value < classes:
            raise ZoomError(f"config key {key}={value} is not a class of the target: it has {classes} outputs "
                            f"(0 to {classes - 1})")


def _label_index(model, label, key: str) -> int:
    labels = model.labels or []
    if isinstance(label, int):
        if not 0 <= label < max(len(labels), label + 1):
            raise ZoomError(f"config key {key}={label} is not a class index of the model")
        return label
    if label not in labels:
        raise ZoomError(f"config key {key}={shown(label)} is not one of the model's labels: {clip(', '.join(map(str, labels)), 300)}")
    return labels.index(label)


# ---------------------------------------------------------------------------------------------
# Provenance


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("zoom", "torch", "torchvision", "diffusers", "transformers", "accelerate", "open_clip_torch", "timm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def fingerprint(path: str) -> dict | None:
    """sha256 of a local model's files (files over 64 MiB: size + first and last MiB), else None."""
    path = path.split("local-dir:", 1)[-1].split(":", 1)[-1] if ":" in path else path
    p = Path(os.path.expanduser(path))
    if not p.exists():
        return None
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        size = f.stat().st_size
        with open(f, "rb") as fh:
            if size <= 64 << 20:
                digest.update(fh.read())
            else:
                digest.update(str(size).encode() + fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read())
    return {"path": str(p), "sha256": digest.hexdigest(), "files": len(files)}


def run_info(config: Config, models: Models, device, world: int) -> dict:
    g = models.generator
    return {
        "start_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "precision": config.precision,
        "num_processes": world,
        "random_models": uses_random_models(config),
        "overridden": list(getattr(config, "overridden", [])),
        "versions": package_versions(),
        "models": {
            "generator": {"id": config.generator.model, "revision": config.generator.revision,
                          "scheduler": type(g.scheduler).__name__, "files": fingerprint(config.generator.model)},
            "guide": {"id": config.guide.model, "pretrained": config.guide.pretrained,
                      "files": fingerprint(config.guide.model)},
            "judge": {"id": config.judge.model, "pretrained": config.judge.pretrained,
                      "files": fingerprint(config.judge.model)},
            "target": {"spec": config.target.spec, "task": config.target.task,
                       "files": fingerprint(config.target.spec)},
        },
        "search": {"mode": config.search.mode, "edit_space": config.search.edit_space,
                   "samples": config.search.samples, "seed": config.search.seed},
    }


def uses_random_models(config: Config) -> bool:
    """True when the generator is zoom's tiny random pipeline (its numbers mean nothing)."""
    from .tiny import is_tiny_model

    return is_tiny_model(config.generator.model)
