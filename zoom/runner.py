"""Work items, sharding across processes, and the resumable run directory.

A work item is one (seed, attribute) pair; items are grouped into blocks of `batch_size`
consecutive seeds, and each block is searched attribute by attribute with the seeds batched.
Blocks are dealt to processes by index (block i -> rank i % K), never by padding, and every
number an item produces depends only on its seed and attribute, so results do not depend on K.

Each rank appends one JSON line per finished item to records/rank-R.jsonl, flushed and fsynced
after every batch, once the batch's PNGs are on disk; `--resume` skips the keys already there
and tolerates a torn last line. Only the main process writes config.yaml, run.json and the report.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, dump_config
from .errors import ZoomError
from .prompts import NULL_NAME, Attribute, load_prompts

RECORDS_DIR = "records"
IMAGES_DIR = "images"


# ---------------------------------------------------------------------------------------------
# Records on disk


def read_records(run_dir) -> list[dict]:
    """All finished records of a run, deduplicated by key; a torn (unterminated) last line is ignored."""
    folder = Path(run_dir) / RECORDS_DIR
    records, seen = [], set()
    for path in sorted(folder.glob("rank-*.jsonl")):
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # tail is "" when the file ends with a newline
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ZoomError(f"{path}: line {number} is not valid JSON; the records file is corrupt") from None
            if record.get("key") not in seen:
                seen.add(record["key"])
                records.append(record)
        del tail  # an unterminated line is an append that was cut off: it never counted
    return records


class RecordWriter:
    """Appends records as JSON lines; each batch is flushed and fsynced before returning."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):  # drop a torn last line left by a kill mid-write
                with open(path, "r+b") as f:
                    f.truncate(cut)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        for r in records:
            self._file.write(json.dumps(r, sort_keys=True, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self):
        self._file.close()


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_png(path: Path, image: torch.Tensor) -> None:
    from PIL import Image
    import io

    array = (image.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


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


# ---------------------------------------------------------------------------------------------
# The audit


@dataclass
class Models:
    generator: object
    guide: object
    judge: object
    target: object
    criterion: object


def pick_device(config: Config, state=None) -> torch.device:
    if config.device != "auto":
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ZoomError(f"device={config.device!r} but no CUDA GPU is visible; use device: cpu or auto")
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
    from .targets import load_target, make_criterion

    g = config.generator
    generator = Generator.from_pretrained(g.model, revision=g.revision, steps=g.steps,
                                          guidance_scale=g.guidance_scale, resolution=g.resolution,
                                          device=device, loop_decoder=g.loop_decoder,
                                          gradient_checkpointing=g.gradient_checkpointing)
    guide = Clip.load(config.guide.model, config.guide.pretrained, device)
    judge = Clip.load(config.judge.model, config.judge.pretrained, device)
    target = load_target(target if target is not None else config.target.spec,
                         trust_remote_code=config.target.trust_remote_code, device=device)
    criterion = make_criterion(config.target.task, config.target.label, config.target.target_class, target.labels)
    return Models(generator, guide, judge, target, criterion)


def prepare_run_dir(out_dir, config: Config, resume: bool) -> dict:
    """Check (before any model loads) that out_dir may be written; return the resolved config."""
    out = Path(out_dir)
    resolved = config.resolved()
    if out.exists() and not resume:
        raise ZoomError(f"output directory {str(out)!r} already exists; pass --resume to continue it or choose another --out")
    if resume and out.exists():
        stored = out / "config.yaml"
        if not stored.is_file():
            raise ZoomError(f"--resume: {str(out)!r} has no config.yaml, so it is not a zoom run directory")
        import yaml

        previous = yaml.safe_load(stored.read_text(encoding="utf-8"))
        if previous != yaml.safe_load(dump_config(resolved)):
            changed = sorted(k for k in resolved if previous.get(k) != yaml.safe_load(dump_config(resolved)).get(k))
            raise ZoomError(f"--resume: the config differs from the one {str(out)!r} was started with "
                            f"(section(s): {', '.join(changed)}); resume with the same config or use a new --out")
    return resolved


def run_audit(config: Config, out_dir, *, resume: bool = False, models: Models | None = None,
              progress: bool = True) -> dict | None:
    """Run (or continue) an audit into out_dir; returns the report on the main process."""
    from accelerate import PartialState

    from .report import write_report

    # On CPU, processes join through gloo only when accelerate is told so (cpu=True).
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    refuse_lonely_ranks(state)
    rank, world = state.process_index, state.num_processes
    out = Path(out_dir)
    resolved = prepare_run_dir(out, config, resume)
    device = pick_device(config, state)
    models = models or load_models(config, device)
    prompts = load_prompts(config.prompts)
    state.wait_for_everyone()  # every rank has checked out_dir before the main process creates it

    # 1. The run directory: only the main process creates it, locks it, writes config.yaml / run.json.
    lock = None
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out)
        (out / RECORDS_DIR).mkdir(exist_ok=True)
        if not (out / "config.yaml").exists():
            atomic_write(out / "run.json", json.dumps(run_info(config, models, device, world), indent=1))
            atomic_write(out / "config.yaml", dump_config(resolved))  # last: marks the run as started
    state.wait_for_everyone()
    try:
        # 2. This rank's blocks of seeds, minus the items already on disk.
        edits = make_edits(models, prompts, config.search.seed)
        s = config.search
        seeds = list(range(s.seed, s.seed + s.samples))
        blocks = [seeds[i:i + s.batch_size] for i in range(0, len(seeds), s.batch_size)]
        mine = [b for i, b in enumerate(blocks) if i % world == rank]
        done = {r["key"] for r in read_records(out)} if resume else set()
        bar = _progress(sum(len(b) for b in mine) * len(edits), enabled=progress and state.is_main_process)
        writer = RecordWriter(out / RECORDS_DIR / f"rank-{rank}.jsonl")
        try:
            for block in mine:
                todo = [(a, e) for a, e in edits if any(item_key(seed, a) not in done for seed in block)]
                bar.update(len(block) * (len(edits) - len(todo)))
                for records in search_block(out, block, todo, edits, models, prompts, config):
                    fresh = [r for r in records if r["key"] not in done]  # (an OOM retry may repeat some)
                    writer.write(fresh)
                    done.update(r["key"] for r in fresh)
                    bar.update(len(fresh))
        finally:
            writer.close()
            bar.close()
        _write_rank_meta(out, rank, device)

        # 3. The report, from every rank's records.
        state.wait_for_everyone()
        return write_report(out) if state.is_main_process else None
    finally:
        if lock is not None:
            lock.release()


def refuse_lonely_ranks(state) -> None:
    """A launcher started several processes but torch.distributed did not join them (on a CPU-only
    machine without ACCELERATE_USE_CPU=1): each would silently do all the work."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and state.num_processes != launched:
        raise ZoomError(
            f"launched as {launched} processes, but this one sees {state.num_processes}: each would do all the "
            "work. Without a GPU, run: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes "
            f"{launched} --num_machines 1 --mixed_precision no --dynamo_backend no -m zoom audit ..."
        )


class RunLock:
    """An exclusive lock on a run directory, held by the main process while it writes there.

    fcntl locks die with their process, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        import fcntl

        self.path = Path(run_dir) / ".lock"
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ZoomError(f"run directory {str(run_dir)!r} is in use by another zoom process (pid {holder}); "
                            "wait for it to finish, or choose another --out") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self):
        import fcntl

        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def make_edits(models: Models, prompts, seed: int) -> list:
    """One direction per attribute, then the null control (a paraphrase, or a random direction)."""
    from .search import Edit, random_direction

    gen, guide = models.generator, models.guide
    domain_embeds = gen.embed(prompts.domain)
    edits = []
    for a in prompts.attributes:
        direction = gen.embed(a.prompt) - domain_embeds
        edits.append((a, Edit([a.name], direction, guide.text_direction(prompts.domain, a.prompt)[None])))
    if prompts.null is not None:
        null_attr = Attribute(NULL_NAME, prompts.null, NULL_NAME)
        null_edit = Edit([NULL_NAME], gen.embed(prompts.null) - domain_embeds,
                         guide.text_direction(prompts.domain, prompts.null)[None])
    else:  # a random direction with the median attribute direction's norm; no CLIP term
        norm = float(torch.stack([e.directions.norm() for _, e in edits]).median())
        null_attr = Attribute(NULL_NAME, "(random direction)", NULL_NAME)
        null_edit = Edit([NULL_NAME], random_direction(domain_embeds, norm, seed=seed), None)
    return edits + [(null_attr, null_edit)]


def search_block(out: Path, block: list[int], todo: list, edits: list, models: Models, prompts, config):
    """Yield the records of one block of seeds, one batch per attribute (joint: one for all).

    A CUDA out-of-memory error halves the block and retries; every number depends only on the
    item's seed and attribute, so the records are the same as with the full batch.
    """
    from .search import Edit, Searcher, strength

    if not todo:
        return
    try:
        searcher = Searcher(models.generator, models.guide, models.target, models.criterion, config.search,
                            config.precision)
        base = searcher.base(block, prompts.domain)
        base_paths = [f"{IMAGES_DIR}/base/seed-{seed}.png" for seed in block]
        for path, image in zip(base_paths, base.images):
            if not (out / path).exists():
                save_png(out / path, image)
        s = config.search
        if s.mode == "joint":  # one joint search per seed covers every attribute
            joint = Edit([a.name for a, _ in edits], torch.cat([e.directions for _, e in edits]),
                         None if edits[-1][1].text_dirs is None else torch.cat([e.text_dirs for _, e in edits]))
            start = time.perf_counter()
            outcome = searcher.optimise(base, joint, prompts.domain, s.edit_space)
            seconds = (time.perf_counter() - start) / len(block)
            records = []
            for k, (a, _) in enumerate(edits):
                records += _records(out, block, a, k, outcome, base, base_paths, seconds, models,
                                    prompts.domain, config, strength, joint=True)
            yield records
            return
        for a, e in todo:
            start = time.perf_counter()
            outcome = (searcher.sweep(base, e, prompts.domain) if s.mode == "sweep"
                       else searcher.optimise(base, e, prompts.domain, s.edit_space))
            seconds = (time.perf_counter() - start) / len(block)
            yield _records(out, block, a, 0, outcome, base, base_paths, seconds, models, prompts.domain,
                           config, strength)
    except torch.cuda.OutOfMemoryError:
        if len(block) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(block) // 2
        print(f"zoom: out of memory with {len(block)} seeds per batch; retrying with {half}", file=sys.stderr)
        for part in (block[:half], block[half:]):
            yield from search_block(out, part, todo, edits, models, prompts, config)


def item_key(seed: int, attribute: Attribute) -> str:
    return f"seed-{seed}/{attribute.slug}"


def _records(out, block, attribute, k, outcome, base, base_paths, seconds, models, domain, config,
             strength_fn, joint=False) -> list[dict]:
    """Turn one search outcome into record dicts (one per seed), saving counterfactual PNGs first."""
    s, target = config.search, models.target
    alpha = outcome.alpha[:, k]
    if joint:
        total = outcome.alpha.abs().sum(-1).clamp_min(1e-12)
        share = (outcome.alpha[:, k].abs() / total).tolist()
        dominant = (outcome.alpha.abs().argmax(-1) == k).tolist()
    # Validity: does an independent CLIP see more of the attribute (in the edit's direction)?
    validity, validity_score = [None] * len(block), [None] * len(block)
    if attribute.name != NULL_NAME:
        with torch.no_grad():
            change = (models.judge.attribute_score(outcome.images, domain, attribute.prompt)
                      - models.judge.attribute_score(base.images, domain, attribute.prompt))
        sign = torch.ones_like(alpha) if s.edit_space == "latent" else torch.sign(alpha)
        validity_score = (change * sign).tolist()
        validity = [v > 0 for v in validity_score]
    records = []
    for i, seed in enumerate(block):
        path = f"{IMAGES_DIR}/{attribute.slug}/seed-{seed}.png"
        save_png(out / path, outcome.images[i])
        flipped = outcome.flipped[i] and (dominant[i] if joint else True)
        base_pred, final_pred = int(base.pred[i]), int(outcome.final_pred[i])
        status = models.criterion.skip_reason(base_pred) or outcome.status[i]
        record = {
            "key": item_key(seed, attribute),
            "seed": seed,
            "attribute": attribute.name,
            "slug": attribute.slug,
            "prompt": attribute.prompt,
            "mode": s.mode,
            "edit_space": s.edit_space,
            "precision": config.precision,
            "base_pred": base_pred,
            "base_label": target.label(base_pred),
            "final_pred": final_pred,
            "final_label": target.label(final_pred),
            "flipped": bool(flipped),
            "steps": int(outcome.steps[i]),
            "alpha": _finite(alpha[i], 6),
            "delta_rel": _finite(outcome.delta_rel[i], 6),
            "strength": _finite(strength_fn(alpha[i:i + 1] if not joint else outcome.alpha[i, k:k + 1],
                                            outcome.delta_rel[i], s.edit_space), 6),
            "base_prob": _finite(base.prob[i]),
            "final_prob": _finite(outcome.final_prob[i]),
            "validity": validity[i],
            "validity_score": _finite(validity_score[i]),
            "base_image": base_paths[i],
            "counterfactual_image": path,
            "seconds": round(seconds, 6),
            "unet_calls": int(outcome.unet_calls[i]),
            "status": status,
        }
        if joint:
            record["share"] = round(share[i], 6)
            record["any_flip"] = bool(outcome.flipped[i])
        if outcome.curves is not None:
            record["curve"] = outcome.curves[i]
        records.append(record)
    return records


def _finite(x, digits: int | None = None):
    """A JSON-safe number: NaN/inf (a failed item's outputs) become null."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


def run_info(config: Config, models: Models, device, world: int) -> dict:
    g = models.generator
    return {
        "start_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "precision": config.precision,
        "num_processes": world,
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


def _write_rank_meta(out: Path, rank: int, device) -> None:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    meta = {"rank": rank, "peak_memory_bytes": int(peak), "memory_kind": f"{device.type} peak",
            "end_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write(out / RECORDS_DIR / f"rank-{rank}.meta.json", json.dumps(meta))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="item", desc="counterfactuals", file=sys.stderr)
