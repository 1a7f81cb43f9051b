"""`zoom export`: a run's base and counterfactual images as a Hugging Face `datasets` image folder.

    DIR/metadata.jsonl          one JSON object per image (the `imagefolder` builder's metadata file)
    DIR/images/RUN/base/seed-S.png          base images, one per seed
    DIR/images/RUN/SLUG/seed-S.png          counterfactuals, one per (seed, attribute)

`datasets.load_dataset("imagefolder", data_dir=DIR)` reads it: the `file_name` column names the image,
every other key becomes a column. The label of a row is its *base* image's label (the target's
prediction on the base image): a counterfactual keeps it, since the attribute should not matter.

`select_items` is shared with `zoom finetune`, which reads the same items straight from run directories.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import ZoomError, shown_path
from .prompts import NULL_NAME

METADATA = "metadata.jsonl"


def _run_label(run_dir: Path, used: set) -> str:
    """A folder name for a run inside an export: its own name, made unique."""
    import re

    base = re.sub(r"[^A-Za-z0-9._-]+", "-", run_dir.resolve().name).strip(".-")[:60] or "run"
    name, k = base, 2
    while name in used:
        name, k = f"{base}-{k}", k + 1
    used.add(name)
    return name


def confirmed_keys(records: list[dict], config: dict) -> set:
    """Keys of the records whose flip the report confirms (the judge CLIP, and the oracle where configured,
    sees the attribute beyond what its null twins show): the report's own rule, aggregate.confirm."""
    from .report.aggregate import _matched_null, _null_by_pair, confirm

    nulls = [r for r in records if r["attribute"] == NULL_NAME]
    by_pair = _null_by_pair(nulls)
    prompts = {a["name"]: a["prompt"] for a in config["prompts"]["attributes"]}
    keys = set()
    for name, prompt in prompts.items():
        rs = [r for r in records if r["attribute"] == name]
        if rs:
            narrowed, _, _ = confirm(rs, _matched_null(name, by_pair), prompt, name)
            keys |= {r["key"] for r in narrowed if r["flipped"]}
    return keys


def select_items(run_dir, *, flipped_only: bool = False, attributes=None, valid_only: bool = False,
                 confirmed_only: bool = False, skip_label_changing: bool = False) -> dict:
    """The finished, exportable items of one complete run:
    {"run", "config", "bases": {seed: row}, "counterfactuals": [row], "left_out": {attribute: reason},
     "missing": n}. Each row: label, label_id, seed, key, image (absolute Path) and the record's fields.
    ZoomError for an unfinished run, an unknown attribute name or a run that is not multiclass/binary."""
    from .report.aggregate import aggregate
    from .rundir import load_run, run_image

    run_dir = Path(run_dir)
    records, config, run, meta = load_run(run_dir)
    done = aggregate(records, config, run, meta)["completeness"]
    if not done["complete"]:
        raise ZoomError(f"run {shown_path(str(run_dir))} is unfinished ({done['finished']} of {done['expected']} items); "
                        f"finish it first with `zoom audit --config ... --out {run_dir} --resume`")
    task = (config.get("target") or {}).get("task", "multiclass")
    if task not in ("multiclass", "binary"):
        raise ZoomError(f"run {shown_path(str(run_dir))} audited a {task} target; export and finetune take "
                        "classification runs (multiclass or binary), whose base label is one class")
    declared = {a["name"]: a for a in config["prompts"]["attributes"]}
    if attributes:
        unknown = [a for a in attributes if a not in declared]
        if unknown:
            raise ZoomError(f"--attribute {unknown[0]!r} is not an attribute of run {shown_path(str(run_dir))}; "
                            f"its attributes: {', '.join(repr(n) for n in declared)}")
    left_out = {}
    if skip_label_changing:
        left_out = {n: "marked changes_label in the prompt file" for n, a in declared.items()
                    if a.get("changes_label") is True}
    confirmed = confirmed_keys(records, config)
    bases, cfs, missing = {}, [], 0
    for r in sorted(records, key=lambda r: (r["seed"], r["key"])):
        if r["status"] != "ok" or r["attribute"] == NULL_NAME or r["attribute"] not in declared:
            continue
        if attributes and r["attribute"] not in attributes:
            continue
        if r["attribute"] in left_out:
            continue
        if (flipped_only and not r["flipped"]) or (valid_only and r.get("validity") is not True) \
                or (confirmed_only and r["key"] not in confirmed):
            continue
        base_path = run_image(run_dir, r["base_image"])
        cf_path = run_image(run_dir, r["counterfactual_image"])
        if base_path is None or cf_path is None:
            missing += 1
            continue
        common = {"label": str(r.get("base_label", r["base_pred"])), "label_id": int(r["base_pred"]),
                  "seed": int(r["seed"])}
        if r["seed"] not in bases:
            bases[r["seed"]] = {**common, "kind": "base", "key": f"seed-{r['seed']}/base", "attribute": None,
                                "prompt": config["prompts"]["domain"], "flipped": None, "strength": None,
                                "validity": None, "confirmed": None, "final_label": None, "image": base_path}
        cfs.append({**common, "kind": "counterfactual", "key": r["key"], "attribute": r["attribute"],
                    "prompt": r.get("prompt"), "flipped": bool(r["flipped"]), "strength": r.get("strength"),
                    "validity": r.get("validity"), "confirmed": r["key"] in confirmed, "final_label": str(r.get("final_label", r["final_pred"])),
                    "image": cf_path, "slug": r.get("slug") or r["counterfactual_image"].split("/")[-2]})
    return {"run": run_dir, "config": config, "bases": bases, "counterfactuals": cfs, "left_out": left_out,
            "missing": missing}


def temp_sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}"


def check_new_out(out, what: str = "--out") -> Path:
    from .rundir import check_path

    out = Path(out)
    if check_path(out, what) or os.path.lexists(out):
        raise ZoomError(f"{what} {shown_path(str(out))} already exists; choose a new folder (zoom never writes into "
                        "an existing one)")
    parent = out.resolve().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ZoomError(f"{what} {shown_path(str(out))}: {shown_path(str(parent))} is not a folder")
    return out


def make_parent(out: Path, what: str = "--out") -> None:
    """Create the folders above out (as `zoom audit --out runs/x` does), once the input is known good."""
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZoomError(f"cannot create the folder of {what} {shown_path(str(out))}: "
                        f"{e.strerror or type(e).__name__}") from None


def export_runs(run_dirs, out, *, flipped_only: bool = False, attributes=None, valid_only: bool = False,
                confirmed_only: bool = False) -> dict:
    """Write the image folder; returns {"out", "images", "bases", "counterfactuals", "missing"}. Written
    into a temporary sibling folder and renamed into place at the end: an error leaves nothing behind."""
    out = check_new_out(out)
    selections = [select_items(r, flipped_only=flipped_only, attributes=attributes, valid_only=valid_only,
                               confirmed_only=confirmed_only) for r in run_dirs]
    if not any(s["counterfactuals"] for s in selections):
        filters = [f for f, on in (("--flipped-only", flipped_only), ("--valid-only", valid_only),
                                   ("--confirmed-only", confirmed_only),
                                   ("--attribute", bool(attributes))) if on]
        raise ZoomError("nothing to export: no finished counterfactual matches"
                        + (f" the filters ({', '.join(filters)}); loosen them" if filters else " in the run"))
    make_parent(out)
    tmp = temp_sibling(out, f"tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    used, rows, written = set(), [], set()
    try:
        for s in selections:
            name = _run_label(s["run"], used)
            for row in [*s["bases"].values(), *s["counterfactuals"]]:
                folder = "base" if row["kind"] == "base" else row["slug"]
                relative = f"images/{name}/{folder}/seed-{row['seed']}.png"
                if relative in written:  # (joint mode: one counterfactual per seed, named once)
                    continue
                written.add(relative)
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(row["image"], tmp / relative)
                meta = {k: v for k, v in row.items() if k not in ("image", "slug")}
                rows.append({"file_name": relative, **meta, "run": name})
        with open(tmp / METADATA, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ZoomError(f"cannot write {shown_path(str(out))}: {e.strerror or type(e).__name__}; nothing was "
                        "written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "images": len(rows), "bases": sum(len(s["bases"]) for s in selections),
            "counterfactuals": sum(len(s["counterfactuals"]) for s in selections),
            "missing": sum(s["missing"] for s in selections)}
