"""Run directories and records built by hand, laid out exactly as zoom/runner.py writes them, for the
report, check, compare and calibration tests that need no model.

`records_for(flips)` turns per-seed flip outcomes into record dicts; `write_run(folder, ...)` writes
config.yaml, run.json, records/rank-0.jsonl (+ meta) and small PNGs for every image a record names.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from zoom.prompts import NULL_NAME, slugify

DOMAIN = "a photo of a person's face"
NULL_PROMPT = "a picture of a person's face"
CLASSES = ["smiling", "neutral", "frowning"]
GRID = [0.0, 0.75, 1.5, 2.25, 3.0]


def base_config(names, *, samples, mode="single", seed=0, generator=None, target="torchscript:/models/m.pt"):
    return {
        "generator": generator or {"model": "/models/sd", "revision": None, "steps": 1, "guidance_scale": 0.0,
                                   "resolution": 64, "loop_decoder": None, "gradient_checkpointing": False},
        "guide": {"model": "local-dir:/models/guide", "pretrained": None},
        "judge": {"model": "local-dir:/models/judge", "pretrained": None},
        "target": {"spec": target, "task": "multiclass", "label": None, "target_class": None,
                   "trust_remote_code": False},
        "prompts": {"domain": DOMAIN,
                    "attributes": [{"name": n, "prompt": f"{DOMAIN} with {n}"} for n in names],
                    "null": NULL_PROMPT},
        "search": {"mode": mode, "edit_space": "text", "samples": samples, "seed": seed, "batch_size": 8,
                   "alpha_max": 3.0, "delta_max": 0.05, "max_steps": 8, "lr": 0.4, "lambda_clip": 0.5,
                   "lambda_alpha": 0.01, "lambda_delta": 1.0, "kappa": 0.0, "sweep_points": len(GRID)},
        "precision": "fp32",
        "device": "cpu",
    }


def records_for(flips: dict, config: dict, *, rng=None, curves: bool = False, statuses: dict | None = None,
                visible=None) -> list[dict]:
    """flips: {attribute name: [bool per seed], 'null': [bool per seed] or {attribute: [bool per seed]}}
    -> records in runner's shape. In single and sweep mode every attribute gets its null twin (a list
    under 'null' is every twin's outcome); in joint mode there is one shared null. statuses:
    {(name or ('null', attribute)), seed index): status} marks items failed or skipped. visible: the
    attributes whose edits the judge CLIP sees (default all; each seed's judge change toward its text is
    then well above the null twins', which move at random toward it), so their flips are confirmed."""
    import random

    rng = rng or random.Random(0)
    statuses = statuses or {}
    attributes = config["prompts"]["attributes"]
    slugs = {a["name"]: slugify(i, a["name"]) for i, a in enumerate(attributes)}
    prompts = {a["name"]: a["prompt"] for a in attributes}
    null_prompt = config["prompts"].get("null") or "(random direction)"
    null_prompt = null_prompt if isinstance(null_prompt, str) else null_prompt[0]
    seed0 = config["search"]["seed"]
    twins = config["search"]["mode"] != "joint"
    arms = []  # (record attribute, slug, prompt, pair, outcomes, status key)
    for name, outcomes in flips.items():
        if name != NULL_NAME:
            arms.append((name, slugs[name], prompts[name], None, outcomes, name))
    null = flips.get(NULL_NAME)
    if null is not None:
        if twins:
            for name in [a["name"] for a in attributes if a["name"] in flips]:
                outcomes = null[name] if isinstance(null, dict) else null
                arms.append((NULL_NAME, f"{NULL_NAME}-{slugs[name]}", null_prompt, name, outcomes, (NULL_NAME, name)))
        else:
            arms.append((NULL_NAME, NULL_NAME, null_prompt, None, null, NULL_NAME))
    records = []
    for name, slug, prompt, pair, outcomes, status_key in arms:
        for i, flipped in enumerate(outcomes):
            seed = seed0 + i
            base_pred = seed % len(CLASSES)
            final_pred = (base_pred + 1) % len(CLASSES) if flipped else base_pred
            alpha = round(rng.uniform(0.2, 3.0) if flipped else 3.0, 6)
            base_prob = round(rng.uniform(0.55, 0.9), 6)
            final_prob = round(base_prob - (rng.uniform(0.2, 0.5) if flipped else rng.uniform(0.0, 0.1)), 6)
            is_null = name == NULL_NAME
            seen = not is_null and (visible is None or name in visible)
            change = round(rng.uniform(0.03, 0.06) if seen else rng.uniform(-0.01, 0.02), 6)
            record = {
                "key": f"seed-{seed}/{slug}", "seed": seed, "attribute": name, "slug": slug,
                "prompt": prompt, "mode": config["search"]["mode"], "edit_space": "text", "precision": "fp32",
                "base_pred": base_pred, "base_label": CLASSES[base_pred], "final_pred": final_pred,
                "final_label": CLASSES[final_pred], "flipped": bool(flipped), "steps": 3 if flipped else 8,
                "alpha": alpha, "delta_rel": 0.0, "strength": alpha, "reach": alpha, "base_prob": base_prob,
                "final_prob": final_prob, "validity": None if is_null else change > 0,
                "validity_score": None if is_null else change,
                "judge_change": None if is_null else change,
                "base_image": f"images/base/seed-{seed}.png", "counterfactual_image": f"images/{slug}/seed-{seed}.png",
                "seconds": 0.5, "unet_calls": 4 if flipped else 9,
                "status": statuses.get((status_key, i), "ok"),
            }
            if pair is not None:
                record["pair"] = pair
            if is_null:
                targets = [prompts[pair]] if pair else list(prompts.values())
                record["judge_change_toward"] = {p: round(rng.uniform(-0.01, 0.02), 6) for p in targets}
            if config["search"]["mode"] == "joint":
                record["share"] = round(rng.uniform(0, 1), 6)
            if curves:
                points = []
                for a in GRID:
                    p = max(0.0, base_prob - (0.12 * a if flipped else 0.02 * a))
                    pred = final_pred if (flipped and a >= alpha - 1e-9) else base_pred
                    points.append([a, round(p, 6), pred])
                record["curve"] = points
                record["unet_calls"] = len(GRID)
            records.append(record)
    return records


def _png(path: Path, seed: int, shade: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (32, 32), ((seed * 53) % 256, (seed * 97 + shade) % 256, (160 + shade) % 256))
    for x in range(8, 24):
        for y in range(8 + shade % 8, 24):
            image.putpixel((x, y), (240, 240 - shade % 200, 220))
    image.save(path)


def write_run(folder, flips: dict, *, mode: str = "single", seed: int = 0, generator=None, prompts=None,
              target="torchscript:/models/m.pt", command="zoom audit --config c.yaml", images=True,
              curves: bool | None = None, rng=None, statuses=None, random_models: bool = False, visible=None) -> Path:
    """A complete run directory (without report files) for these flip outcomes."""
    folder = Path(folder)
    names = [n for n in flips if n != NULL_NAME]
    samples = len(next(iter(flips.values())))
    config = base_config(names, samples=samples, mode=mode, seed=seed, generator=generator, target=target)
    if prompts is not None:
        config["prompts"] = copy.deepcopy(prompts)
    records = records_for(flips, config, rng=rng, curves=(mode == "sweep") if curves is None else curves,
                          statuses=statuses, visible=visible)
    (folder / "records").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run = {"start_time": "2026-01-01T00:00:00+00:00", "command": command, "device": "cpu", "precision": "fp32",
           "num_processes": 1, "random_models": random_models, "versions": {"python": "3.11", "zoom": "0.1.0"},
           "models": {"generator": {"id": config["generator"]["model"], "revision": None,
                                    "scheduler": "EulerDiscreteScheduler",
                                    "files": {"path": "/models/sd", "sha256": "ab" * 32, "files": 10}},
                      "target": {"spec": target, "task": "multiclass", "files": None}},
           "search": {"mode": mode, "edit_space": "text", "samples": samples, "seed": seed}}
    (folder / "run.json").write_text(json.dumps(run, indent=1))
    (folder / "records" / "rank-0.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    (folder / "records" / "rank-0.meta.json").write_text(json.dumps(
        {"rank": 0, "peak_memory_bytes": 123456789, "memory_kind": "cpu peak", "end_time": "2026-01-01T00:01:00+00:00"}))
    if images:
        for r in records:
            for i, key in enumerate(("base_image", "counterfactual_image")):
                path = folder / r[key]
                if not path.exists():
                    _png(path, r["seed"], 0 if i == 0 else 90)
    return folder


def pattern(k: int, n: int) -> list[bool]:
    """k flips among n seeds, spread out."""
    return [(i * k) // n != ((i + 1) * k) // n for i in range(n)]
