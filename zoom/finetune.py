"""`zoom finetune`: counterfactual training as ZOOM did it. Every counterfactual keeps its base image's
label (the target's own prediction on the base image: the attribute should not matter), mixed half and
half with the base images, through accelerate (1 or N processes, mixed precision), with resumable
checkpoints; the result is saved as the world's hf: targets are (config.json, model.safetensors,
preprocessor_config.json), so `hf:MODEL_DIR` audits it.

Attributes marked `changes_label: true` in the prompt file are never used as label-preserving data.

Files: everything is written under a hidden sibling `.MODEL_DIR.partial/` (checkpoint/ holds the model
and optimizer as safetensors and state.json); at the end the finished model folder is renamed to
MODEL_DIR and the partial folder removed. Batch norm statistics stay frozen (the model runs in eval mode
while its weights train): a few hundred images of one domain would otherwise drift them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .errors import ZoomError, shown, shown_path

PARTIAL = "partial"
STATE = "state.json"
FINETUNE_FILE = "finetune.json"


def trainable_target(spec: str, trust_remote_code: bool = False):
    """(Target, processor) of an hf: spec whose weights can be trained; ZoomError otherwise."""
    from .targets import load_target, parse_spec

    if not isinstance(spec, str):
        raise ZoomError("--target must be a target spec")
    kind, name, _ = parse_spec(spec)
    if kind != "hf":
        why = {"torchscript": "a TorchScript file is a frozen graph zoom cannot train or save as a model",
               "python": "a python: target is code zoom cannot save",
               }.get(kind, f"zoom saves fine-tuned models in transformers' format, which a {kind}: model is not")
        raise ZoomError(f"--target {shown(spec)} cannot be fine-tuned: {why}; fine-tune an hf: target "
                        "(a transformers image classifier saved with save_pretrained)")
    target = load_target(spec, trust_remote_code=trust_remote_code)
    params = [p for p in target.model.parameters() if p.is_floating_point()]
    if not params or not hasattr(target.model, "save_pretrained"):
        raise ZoomError(f"--target {shown(spec)} cannot be fine-tuned: it has no trainable weights")
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(os.path.expanduser(name), trust_remote_code=trust_remote_code)
    return target, processor


def _load_png(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ZoomError(f"cannot read image {shown_path(str(path))} ({type(e).__name__}); the run directory is "
                        "damaged") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def gather(runs, labels, *, flipped_only: bool = False, valid_only: bool = False) -> dict:
    """The training items of these runs: {"bases": [(path, label)], "counterfactuals": [(path, label)],
    "left_out": {attribute: reason}}; ZoomError when a run's classes are not the target's, or nothing is left."""
    from .export import select_items

    bases, cfs, left_out = [], [], {}
    for run in runs:
        s = select_items(run, flipped_only=flipped_only, valid_only=valid_only, skip_label_changing=True)
        left_out.update(s["left_out"])
        for row in [*s["bases"].values(), *s["counterfactuals"]]:
            if labels is not None and not (0 <= row["label_id"] < len(labels)):
                raise ZoomError(f"run {shown_path(str(run))} has base label {row['label_id']}, which the target's "
                                f"{len(labels)} classes do not have: it audited another model")
            if labels is not None and row["label"] != str(row["label_id"]) and row["label"] != str(labels[row["label_id"]]):
                raise ZoomError(f"run {shown_path(str(run))} calls class {row['label_id']} {row['label']!r}, the target "
                                f"calls it {labels[row['label_id']]!r}: the run audited a model with other classes")
        bases += [(row["image"], row["label_id"]) for row in s["bases"].values()]
        cfs += [(row["image"], row["label_id"]) for row in s["counterfactuals"]]
    if not cfs:
        raise ZoomError("nothing to train on: the runs have no finished counterfactual of a label-preserving attribute"
                        + (f" (left out: {', '.join(sorted(left_out))})" if left_out else ""))
    return {"bases": bases, "counterfactuals": cfs, "left_out": left_out}


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Checkpoints: model and optimizer as safetensors, the rest as JSON (never a pickle)


def _optimizer_tensors(state: dict) -> tuple[dict, dict]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                rest["state"].setdefault(str(pid), {})[k] = v
    return tensors, rest


def _optimizer_state(tensors: dict, rest: dict) -> dict:
    state = {}
    for name, v in tensors.items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, entry in rest["state"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(folder: Path, model, optimizer, step: int, fingerprint: str, seconds: float) -> None:
    from safetensors.torch import save_file

    new, old = folder.with_name("checkpoint.new"), folder.with_name("checkpoint.old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(new / "model.safetensors"))
    tensors, rest = _optimizer_tensors(optimizer.state_dict())
    save_file(tensors, str(new / "optimizer.safetensors"))
    (new / STATE).write_text(json.dumps({"step": step, "fingerprint": fingerprint, "seconds": seconds,
                                         "optimizer": rest}))
    if folder.exists():
        os.rename(folder, old)
    os.rename(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer, fingerprint: str) -> tuple[int, float]:
    from safetensors.torch import load_file

    state = json.loads((folder / STATE).read_text())
    if state.get("fingerprint") != fingerprint:
        raise ZoomError(f"the interrupted fine-tune in {shown_path(str(folder.parent))} used other settings (target, "
                        "runs, steps, batch size, learning rate or seed); resume with the same ones, or delete it")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    optimizer.load_state_dict(_optimizer_state(load_file(str(folder / "optimizer.safetensors")), state["optimizer"]))
    return int(state["step"]), float(state.get("seconds", 0.0))


def prepare_out(out, resume: bool) -> tuple[Path, Path]:
    """(out, partial folder); bad input before any process starts or anything is written."""
    from .export import check_new_out, temp_sibling

    out = check_new_out(out)
    partial = temp_sibling(out, PARTIAL)
    if partial.exists() and not resume:
        raise ZoomError(f"an interrupted fine-tune of {shown_path(str(out))} is in {shown_path(str(partial))}; "
                        "continue it with --resume, or delete that folder")
    return out, partial


def finetune(target_spec: str, runs, out, *, steps: int = 100, batch_size: int = 32, lr: float = 3e-5,
             weight_decay: float = 0.0, seed: int = 0, precision: str = "fp32", device: str = "auto",
             checkpoint_every: int = 50, resume: bool = False, flipped_only: bool = False,
             valid_only: bool = False, trust_remote_code: bool = False, progress=None) -> dict:
    """Fine-tune an hf: target on the label-preserving counterfactuals of `runs`; returns the summary
    (also written as MODEL_DIR/finetune.json). `progress(text)` is called on the main process."""
    from accelerate import Accelerator

    if steps < 1 or batch_size < 2 or lr <= 0 or checkpoint_every < 1:
        raise ZoomError("--steps and --checkpoint-every must be at least 1, --batch-size at least 2, --lr above 0")
    if not runs:
        raise ZoomError("--runs: give at least one run directory")
    out, partial = prepare_out(out, resume)
    target, processor = trainable_target(target_spec, trust_remote_code)
    data = gather(runs, target.labels, flipped_only=flipped_only, valid_only=valid_only)
    settings = {"target": target_spec, "runs": [str(Path(r).resolve()) for r in runs], "steps": steps,
                "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                "flipped_only": flipped_only, "valid_only": valid_only,
                "items": [len(data["bases"]), len(data["counterfactuals"])]}
    fingerprint = _fingerprint(settings)

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    acc = Accelerator(cpu=cpu, mixed_precision="no" if cpu else mixed)
    say = (progress or (lambda text: None)) if acc.is_main_process else (lambda text: None)
    preprocess, model = target.preprocess, target.model
    with torch.no_grad():  # the target's own preprocessing, once per image (the audit's in-graph one)
        def stack(items):
            return torch.cat([preprocess(_load_png(p)[None]) for p, _ in items]), \
                torch.tensor([y for _, y in items], dtype=torch.long)
        xb, yb = stack(data["bases"])
        xc, yc = stack(data["counterfactuals"])
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    model.eval()  # frozen batch-norm statistics; the weights train
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    start, spent = 0, 0.0
    checkpoint = partial / "checkpoint"
    if resume and (checkpoint / STATE).exists():
        start, spent = load_checkpoint(checkpoint, model, optimizer, fingerprint)
        say(f"resuming at step {start} of {steps}")
    model, optimizer = acc.prepare(model, optimizer)
    if acc.is_main_process:
        from .export import make_parent

        make_parent(out)
        partial.mkdir(exist_ok=True)
    began = time.perf_counter() - spent
    half = batch_size // 2
    loss_value = float("nan")
    for step in range(start, steps):
        rng = np.random.default_rng([seed, step])  # the batch depends on (seed, step) only: resumable, any K
        ib, ic = rng.integers(len(xb), size=batch_size - half), rng.integers(len(xc), size=half)
        x, y = torch.cat([xb[ib], xc[ic]]), torch.cat([yb[ib], yc[ic]])
        x, y = x[acc.process_index::acc.num_processes], y[acc.process_index::acc.num_processes]
        with acc.autocast():
            logits = model(pixel_values=x.to(acc.device)).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y.to(acc.device))
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        optimizer.step()
        loss_value = float(loss.detach())
        done = step + 1
        if done % checkpoint_every == 0 or done == steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(checkpoint, acc.unwrap_model(model), optimizer, done, fingerprint,
                                time.perf_counter() - began)
            say(f"step {done}/{steps}  loss {loss_value:.4f}  ({time.perf_counter() - began:.0f} s)")
    seconds = time.perf_counter() - began
    summary = {**settings, "bases": len(data["bases"]), "counterfactuals": len(data["counterfactuals"]),
               "left_out": data["left_out"], "final_loss": loss_value, "seconds": round(seconds, 1),
               "processes": acc.num_processes, "precision": precision, "spec": f"hf:{out.resolve()}"}
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = partial / "model"
        shutil.rmtree(final, ignore_errors=True)
        model = acc.unwrap_model(model)
        model.save_pretrained(final, safe_serialization=True)
        processor.save_pretrained(final)
        (final / FINETUNE_FILE).write_text(json.dumps(summary, indent=1, default=str))
        os.rename(final, out)
        shutil.rmtree(partial, ignore_errors=True)
    acc.wait_for_everyone()
    return summary
