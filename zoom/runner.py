"""Work items, sharding across processes, and the audit loop.

A work item is one (seed, arm) pair, an arm being an attribute or its null twin (joint mode: an
attribute or the null slot); items are grouped into blocks of `batch_size` consecutive seeds, and
each block is searched arm by arm with the seeds batched. Blocks are dealt to processes by index
(block i -> rank i % K), never by padding, and every number an item produces depends only on its
seed and arm, so results do not depend on K.

Each rank appends one JSON line per finished item to records/rank-R.jsonl (zoom/rundir.py), flushed
and fsynced after every batch, once the batch's PNGs are on disk; `--resume` skips the keys already
there. Only the main process creates the run directory, holds its lock and writes the report.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
import time
from pathlib import Path

import torch

from .config import Config
from .errors import ZoomError
from .models import Models, configure_threads, load_models, pick_device, run_info
from .prompts import NULL_NAME, Attribute, load_prompts
from .rundir import (IMAGES_DIR, RECORDS_DIR, RecordWriter, check_out_dir, open_run_dir, read_records, save_png,
                     write_rank_meta)


EVAL_IMAGES = 64  # images per forward pass when a bracket searches several arms of a block together


def prepare_run_dir(out_dir, config: Config, resume: bool) -> dict:
    """Check (before any model loads) that out_dir may be written; return the resolved config."""
    resolved = config.resolved()
    check_out_dir(out_dir, resolved, resume)
    return resolved


def run_audit(config: Config, out_dir, *, resume: bool = False, models: Models | None = None,
              progress: bool = True) -> dict | None:
    """Run (or continue) an audit into out_dir; returns the report on the main process."""
    from .report import write_report

    state = process_state(config)
    rank, world = state.process_index, state.num_processes
    out = Path(out_dir)
    # Checked by the main process alone: another one, later here, could find out_dir already made by it.
    resolved, failure = None, None
    if state.is_main_process:
        try:
            resolved = prepare_run_dir(out, config, resume)
        except ZoomError as e:
            failure = str(e)
    failure = _shared(state, failure)
    if failure:
        raise ZoomError(failure)
    device = pick_device(config, state)
    models = models or load_models(config, device)
    configure_threads(device, models.generator, world)
    prompts = load_prompts(config.prompts)
    from .edits import Edits

    edits = Edits(models.generator, models.guide, prompts, config.search.seed)  # checks the directions too
    s = config.search
    seeds = list(range(s.seed, s.seed + s.samples))
    blocks = [seeds[i:i + s.batch_size] for i in range(0, len(seeds), s.batch_size)]
    mine = [b for i, b in enumerate(blocks) if i % world == rank]
    idle = idle_processes_warning(len(blocks), s.batch_size, world)
    if idle and state.is_main_process:
        print(idle, file=sys.stderr)

    # 1. The run directory: the main process creates it (or, resuming, re-checks it) under its lock.
    lock = None
    if state.is_main_process:
        try:
            lock = open_run_dir(out, resolved, resume, run_info(config, models, device, world))
        except ZoomError as e:
            failure = str(e)
    failure = _shared(state, failure)
    if failure is None and state.is_main_process:
        for note in getattr(config, "notes", []):
            print(note, file=sys.stderr)
    if failure:  # every rank stops; only the main process says why
        raise ZoomError(failure)
    try:
        # 2. This rank's blocks of seeds, minus the items already on disk.
        done = {r["key"] for r in read_records(out)} if resume else set()
        labels = item_labels(edits, s.mode)
        bar = _progress(sum(len(b) for b in mine) * len(labels), enabled=progress and state.is_main_process)
        writer = RecordWriter(out / RECORDS_DIR / f"rank-{rank}.jsonl")
        try:
            for block in mine:
                todo = [arm for arm in labels if any(item_key(seed, arm) not in done for seed in block)]
                bar.update(len(block) * (len(labels) - len(todo)))
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


def process_state(config: Config):
    """accelerate's view of the processes (one, or those `accelerate launch` started)."""
    from accelerate import PartialState

    # On CPU, processes join through gloo only when accelerate is told so (cpu=True).
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    refuse_lonely_ranks(state)
    return state


def idle_processes_warning(blocks: int, batch_size: int, processes: int) -> str | None:
    """Work is dealt in blocks of batch_size seeds: with fewer blocks than processes, some get nothing."""
    if blocks >= processes:
        return None
    return (f"zoom: warning: {blocks} block(s) of {batch_size} seeds for {processes} processes: "
            f"{processes - blocks} process(es) get no work; lower search.batch_size (or raise --samples) to use them")


def _shared(state, value):
    """The main process's value, on every process (one message, not one traceback per rank)."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


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


def item_labels(edits, mode: str) -> list:
    """What each seed gets a record for: the arms (attributes and their null twins) in single and
    sweep mode; the attributes and the one null slot in joint mode."""
    if mode == "joint":
        return [*edits.prompts.attributes, Attribute(NULL_NAME, edits.null_prompt_label(), NULL_NAME)]
    return edits.arms()


def search_block(out: Path, block: list[int], todo: list, edits, models: Models, prompts, config):
    """Yield the records of one block of seeds, one batch per arm (joint: one for all).

    A CUDA out-of-memory error halves the block and retries; every number depends only on the
    item's seed and arm, so the records are the same as with the full batch.
    """
    from .search import Searcher
    from .tasks import base_outputs

    if not todo:
        return
    try:
        searcher = Searcher(models.generator, models.guide, models.target, models.criterion, config.search,
                            config.precision)
        with base_outputs(models.criterion):  # keypoints/segmentation/detection keep the base outputs
            base = searcher.base(block, prompts.domain)
        base_paths = [f"{IMAGES_DIR}/base/seed-{seed}.png" for seed in block]
        for path, image in zip(base_paths, base.images):
            if not (out / path).exists():
                save_png(out / path, image)
        s = config.search
        item = _ItemWriter(out, block, base, base_paths, models, prompts, config, searcher.autocast)
        if s.mode == "joint":  # one joint search per seed covers every attribute and the null slot
            edit, attributes = edits.joint(block)
            start = time.perf_counter()
            outcome = searcher.optimise(base, edit, prompts.domain, s.edit_space)
            seconds = (time.perf_counter() - start) / len(block)
            records = []
            for k, attribute in enumerate(attributes):
                is_null = attribute.name == NULL_NAME
                prompts_used = [edits.joint_null_prompt(seed) if is_null else attribute.prompt for seed in block]
                records += item.records(attribute, k, outcome, seconds, prompts_used, joint=True,
                                        judged=None if is_null else attribute.prompt,
                                        twin_of=[a.prompt for a in prompts.attributes] if is_null else None)
            yield records
            return
        # One degree of freedom (single mode, text edits): bracketed with forward passes only, several
        # arms per pass (up to EVAL_IMAGES images); the other searches take one arm at a time.
        bracketed = s.mode == "single" and s.edit_space == "text"
        group = max(1, EVAL_IMAGES // len(block)) if bracketed else 1
        # Groups are fixed chunks of every arm, not of the arms left to do: a resumed run batches each
        # arm with the same others as the uninterrupted one, so its numbers round the same way.
        arms_all = item_labels(edits, s.mode)
        groups = [arms_all[g:g + group] for g in range(0, len(arms_all), group)]
        for arms in [g for g in groups if any(arm in todo for arm in g)]:
            start = time.perf_counter()
            if bracketed:
                outcomes = searcher.bracket_arms(base, [edits.edit(arm, block) for arm in arms], prompts.domain)
            elif s.mode == "sweep":
                outcomes = [searcher.sweep(base, edits.edit(arms[0], block), prompts.domain)]
            else:
                outcomes = [searcher.optimise(base, edits.edit(arms[0], block), prompts.domain, s.edit_space)]
            seconds = (time.perf_counter() - start) / len(block) / len(arms)
            for arm, outcome in zip(arms, outcomes):
                paired = prompts.attributes[arm.index].prompt
                yield item.records(arm.attribute, 0, outcome, seconds, [edits.prompt(arm, seed) for seed in block],
                                   judged=None if arm.is_null else paired, twin_of=[paired] if arm.is_null else None,
                                   pair=arm.pair)
    except torch.cuda.OutOfMemoryError:
        if len(block) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(block) // 2
        print(f"zoom: out of memory with {len(block)} seeds per batch; retrying with {half}", file=sys.stderr)
        for part in (block[:half], block[half:]):
            yield from search_block(out, part, todo, edits, models, prompts, config)


def item_key(seed: int, attribute) -> str:
    attribute = getattr(attribute, "attribute", attribute)  # an Arm or an Attribute
    return f"seed-{seed}/{attribute.slug}"


class _ItemWriter:
    """Turns search outcomes of one block into record dicts, saving the counterfactual PNGs first."""

    def __init__(self, out, block, base, base_paths, models, prompts, config, autocast):
        self.out, self.block, self.base, self.base_paths = out, block, base, base_paths
        self.models, self.domain, self.config = models, prompts.domain, config
        self.models_attributes = prompts.attributes
        self.autocast = autocast  # the search's precision, for the details' forward pass
        self._details = None  # (outcome, its details): joint mode writes every attribute from one outcome

    def task_details(self, outcome) -> list[tuple[dict, dict]]:
        """Keypoints, segmentation, detection: the target once more on the saved counterfactuals, each
        compared with its base output (the criterion kept those) -> per seed (record's `task` dict, overlay
        marks). A target whose output depends on the batch (ties broken differently) may disagree here with
        the search's own pass; the flip and `fabricated` stay the search's."""
        if self._details is None or self._details[0] is not outcome:
            criterion, target = self.models.criterion, self.models.target
            with torch.no_grad(), self.autocast():
                outputs = target(outcome.images).float()
            self._details = (outcome, [criterion.details(outputs, i, int(self.base.pred[i]), target.label)
                                       for i in range(len(self.block))])
        return self._details[1]

    def overlays(self, i: int, path: str, image, marks: dict) -> dict:
        """The marks drawn on the base image (once per seed) and on the counterfactual, saved beside them."""
        from .overlays import draw_marks

        base_path = self.base_paths[i].removesuffix(".png") + ".overlay.png"
        if not (self.out / base_path).exists():
            save_png(self.out / base_path, draw_marks(self.base.images[i], marks["base"]))
        cf_path = path.removesuffix(".png") + ".overlay.png"
        save_png(self.out / cf_path, draw_marks(image, marks["final"]))
        return {"base_overlay": base_path, "counterfactual_overlay": cf_path}

    def judge_change(self, images: torch.Tensor, prompt: str) -> list[float]:
        """How much more the judge CLIP matches `prompt` (vs the domain) in the edited image than in the base."""
        judge = self.models.judge
        with torch.no_grad():
            change = (judge.attribute_score(images, self.domain, prompt)
                      - judge.attribute_score(self.base.images, self.domain, prompt))
        return change.tolist()

    def oracle_sees(self, name: str, images: torch.Tensor) -> list[bool] | None:
        """Whether the attribute's oracle (config `oracle`) predicts its label on each image."""
        if not self.models.oracles or name not in self.models.oracles:
            return None
        model, label = self.models.oracles[name]
        with torch.no_grad():
            return (model(images).argmax(-1) == label).tolist()

    def records(self, attribute, k, outcome, seconds, prompts_used, *, joint=False, judged=None, twin_of=None,
                pair=None) -> list[dict]:
        """judged: the attribute prompt whose validity is scored; twin_of: the attribute prompts a null
        item's judge change is measured against (the baseline for validity)."""
        s, target, block, base = self.config.search, self.models.target, self.block, self.base
        alpha = outcome.alpha[:, k]
        credited = [True] * len(block)
        if joint:
            total = outcome.alpha.abs().sum(-1).clamp_min(1e-12)
            share = (outcome.alpha[:, k].abs() / total).tolist()
            credited = [credit(row, seed) == k for row, seed in zip(outcome.alpha, block)]
        change = self.judge_change(outcome.images, judged) if judged is not None else None
        baselines = {p: self.judge_change(outcome.images, p) for p in twin_of} if twin_of else None
        reach_alpha = outcome.reach[:, k] if outcome.reach is not None else alpha.abs()
        names = [a.name for a in self.models_attributes] if twin_of else []
        oracle_cf = self.oracle_sees(attribute.name, outcome.images) if judged is not None else None
        oracle_base = self.oracle_sees(attribute.name, base.images) if judged is not None else None
        oracle_toward = ({n: self.oracle_sees(n, outcome.images) for n in names if n == pair or pair is None}
                         if twin_of else {})
        oracle_toward = {n: v for n, v in oracle_toward.items() if v is not None}
        criterion = self.models.criterion
        structured = getattr(criterion, "structured", False)
        details = self.task_details(outcome) if structured else None
        records = []
        for i, seed in enumerate(block):
            path = f"{IMAGES_DIR}/{attribute.slug}/seed-{seed}.png"
            save_png(self.out / path, outcome.images[i])
            flipped = outcome.flipped[i] and credited[i]
            base_pred, final_pred = int(base.pred[i]), int(outcome.final_pred[i])
            status = self.models.criterion.skip_reason(base_pred) or outcome.status[i]
            if s.edit_space == "latent":
                strength, reach = outcome.delta_rel[i], (outcome.reach_delta or outcome.delta_rel)[i]
            else:
                strength, reach = abs(float(alpha[i])), float(reach_alpha[i])
            record = {
                "key": item_key(seed, attribute),
                "seed": seed,
                "attribute": attribute.name,
                "slug": attribute.slug,
                "prompt": prompts_used[i],
                "mode": s.mode,
                "edit_space": s.edit_space,
                "precision": self.config.precision,
                "base_pred": base_pred,
                "base_label": target.label(base_pred),
                "final_pred": final_pred,
                "final_label": target.label(final_pred),
                "flipped": bool(flipped),
                "steps": int(outcome.steps[i]),
                "alpha": _finite(alpha[i], 6),
                "delta_rel": _finite(outcome.delta_rel[i], 6),
                "strength": _finite(strength, 6),
                "reach": _finite(max(reach, strength), 6),
                "base_prob": _finite(base.prob[i]),
                "final_prob": _finite(outcome.final_prob[i]),
                # edits go toward their prompt (alpha >= 0): valid when the judge moved toward it too
                "validity": None if change is None or change[i] is None else bool(change[i] > 0),
                "validity_score": None if change is None else _finite(change[i]),
                "judge_change": None if change is None else _finite(change[i]),
                "base_image": self.base_paths[i],
                "counterfactual_image": path,
                "seconds": round(seconds, 6),
                "unet_calls": int(outcome.unet_calls[i]),
                "status": status,
            }
            if structured:  # the base output's key and the search's code -> 0 kept / 1 flipped, and labels
                record.update(criterion.record_fields(base_pred, final_pred, target.label))
                task, marks = details[i]
                record["task"] = task
                record.update(self.overlays(i, path, outcome.images[i], marks))
            if pair is not None:
                record["pair"] = pair
            if baselines is not None:  # the null's judge change toward each attribute it stands in for
                record["judge_change_toward"] = {p: _finite(v[i]) for p, v in baselines.items()}
            if oracle_cf is not None:
                record["oracle"], record["oracle_base"] = bool(oracle_cf[i]), bool(oracle_base[i])
            if oracle_toward:  # the null's counterfactual through each paired attribute's oracle
                record["oracle_toward"] = {n: bool(v[i]) for n, v in oracle_toward.items()}
            if joint:
                record["share"] = round(share[i], 6)
                record["any_flip"] = bool(outcome.flipped[i])
            if outcome.curves is not None:
                record["curve"] = ([[a, p, criterion.public(c)] for a, p, c in outcome.curves[i]] if structured
                                   else outcome.curves[i])
            if outcome.low is not None and s.edit_space != "latent":  # the flip lies in (strength_low, strength]
                record["strength_low"] = _finite(outcome.low[i, k], 6)
            if outcome.monotone is not None:
                record["monotone"] = bool(outcome.monotone[i])
            records.append(record)
        return records


def credit(alpha_row: torch.Tensor, seed: int) -> int:
    """Joint mode: the direction a flip is credited to, the one with the largest weight; weights within
    1e-6 of it (a flip at the start, directions clamped at alpha_max) are a tie drawn with the seed."""
    from .search import tie_break

    weights = alpha_row.abs()
    top = float(weights.max())
    return tie_break([k for k in range(len(weights)) if float(weights[k]) >= top - 1e-6], seed)


def _finite(x, digits: int | None = None):
    """A JSON-safe number: NaN/inf (a failed item's outputs) become null."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


def _write_rank_meta(out: Path, rank: int, device) -> None:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    write_rank_meta(out, rank, peak, f"{device.type} peak",
                    _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar on a terminal only, never in logs or pipes
    return tqdm(total=total, disable=None if enabled else True, unit="item", desc="counterfactuals", file=sys.stderr)
