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
GRID = [-3.0, -1.5, 0.0, 1.5, 3.0]


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


def records_for(flips: dict, config: dict, *, rng=None, curves: bool = False) -> list[dict]:
    """flips: {attribute name or 'null': [bool per seed]} -> records (status ok), in runner's shape."""
    import random

    rng = rng or random.Random(0)
    slugs = {a["name"]: slugify(i, a["name"]) for i, a in enumerate(config["prompts"]["attributes"])}
    prompts = {a["name"]: a["prompt"] for a in config["prompts"]["attributes"]}
    slugs[NULL_NAME], prompts[NULL_NAME] = NULL_NAME, config["prompts"]["null"]
    seed0 = config["search"]["seed"]
    records = []
    for name, outcomes in flips.items():
        for i, flipped in enumerate(outcomes):
            seed = seed0 + i
            base_pred = seed % len(CLASSES)
            final_pred = (base_pred + 1) % len(CLASSES) if flipped else base_pred
            alpha = round(rng.choice([-1, 1]) * (rng.uniform(0.2, 3.0) if flipped else 3.0), 6)
            base_prob = round(rng.uniform(0.55, 0.9), 6)
            final_prob = round(base_prob - (rng.uniform(0.2, 0.5) if flipped else rng.uniform(0.0, 0.1)), 6)
            record = {
                "key": f"seed-{seed}/{slugs[name]}", "seed": seed, "attribute": name, "slug": slugs[name],
                "prompt": prompts[name], "mode": config["search"]["mode"], "edit_space": "text", "precision": "fp32",
                "base_pred": base_pred, "base_label": CLASSES[base_pred], "final_pred": final_pred,
                "final_label": CLASSES[final_pred], "flipped": bool(flipped), "steps": 3 if flipped else 8,
                "alpha": alpha, "delta_rel": 0.0, "strength": abs(alpha), "base_prob": base_prob,
                "final_prob": final_prob, "validity": None if name == NULL_NAME else rng.random() < 0.7,
                "validity_score": None if name == NULL_NAME else round(rng.uniform(-0.01, 0.02), 6),
                "base_image": f"images/base/seed-{seed}.png", "counterfactual_image": f"images/{slugs[name]}/seed-{seed}.png",
                "seconds": 0.5, "unet_calls": 4 if flipped else 9, "status": "ok",
            }
            if curves:
                points = []
                for a in GRID:
                    p = max(0.0, base_prob - (0.12 * abs(a) if flipped else 0.02 * abs(a)))
                    pred = final_pred if (flipped and abs(a) >= abs(alpha) - 1e-9) else base_pred
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
              curves: bool | None = None, rng=None) -> Path:
    """A complete run directory (without report files) for these flip outcomes."""
    folder = Path(folder)
    names = [n for n in flips if n != NULL_NAME]
    samples = len(next(iter(flips.values())))
    config = base_config(names, samples=samples, mode=mode, seed=seed, generator=generator, target=target)
    if prompts is not None:
        config["prompts"] = copy.deepcopy(prompts)
    records = records_for(flips, config, rng=rng, curves=(mode == "sweep") if curves is None else curves)
    (folder / "records").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run = {"start_time": "2026-01-01T00:00:00+00:00", "command": command, "device": "cpu", "precision": "fp32",
           "num_processes": 1, "versions": {"python": "3.11", "zoom": "0.1.0"},
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
