"""Aggregate per-item records into report.json (schema_version 1, DESIGN §4)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import ZoomError
from ..prompts import NULL_NAME
from ..stats import bh_qvalues, greater_than_null_p, wilson_interval

SCHEMA_VERSION = 1
SIGNIFICANCE = 0.05  # BH false discovery rate at which an attribute is called significant
CSV_COLUMNS = ["name", "prompt", "n", "flips", "flip_rate", "ci_low", "ci_high", "p_value", "q_value",
               "significant", "median_strength_to_flip", "mean_prob_drop", "validity_rate", "failed"]


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _counts(records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    flips = [r for r in ok if r["flipped"]]
    n, k = len(ok), len(flips)
    low, high = wilson_interval(k, n)
    valid = [r["validity"] for r in flips if r.get("validity") is not None]
    out = {
        "n": n,
        "flips": k,
        "flip_rate": _num(k / n if n else float("nan")),
        "ci_low": _num(low),
        "ci_high": _num(high),
        "median_strength_to_flip": _num(statistics.median(r["strength"] for r in flips) if flips else None),
        "mean_prob_drop": _num(statistics.fmean(r["base_prob"] - r["final_prob"] for r in ok) if ok else None),
        "validity_rate": _num(sum(valid) / len(valid) if valid else None),
        "failed": len(records) - n,
    }
    if ok and "share" in ok[0]:
        out["mean_share"] = statistics.fmean(r["share"] for r in ok)
    curves = _dose_response(ok)
    if curves is not None:
        out["dose_response"] = curves
    return out


def _dose_response(ok: list[dict]) -> dict | None:
    """Sweep runs: the base class probability along the alpha grid, median and quartiles over seeds,
    and the share of seeds whose prediction differs from the base prediction at each alpha."""
    import numpy as np

    swept = [r for r in ok if r.get("curve")]
    if not swept:
        return None
    grid = [point[0] for point in swept[0]["curve"]]
    swept = [r for r in swept if [point[0] for point in r["curve"]] == grid]  # one grid per run; be safe
    probs = np.array([[np.nan if p[1] is None else p[1] for p in r["curve"]] for r in swept], dtype=float)
    changed = np.array([[p[2] != r["base_pred"] for p in r["curve"]] for r in swept], dtype=float)

    def column(fn):
        out = []
        for j in range(len(grid)):
            values = probs[:, j][~np.isnan(probs[:, j])]
            out.append(round(float(fn(values)), 6) if values.size else None)
        return out

    return {
        "alpha": grid,
        "n": len(swept),
        "median": column(np.median),
        "q25": column(lambda v: np.quantile(v, 0.25)),
        "q75": column(lambda v: np.quantile(v, 0.75)),
        "flip_share": [round(float(x), 6) for x in changed.mean(0)],
    }


def _per_class(records: list[dict]) -> dict:
    by_class = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            by_class[r["base_label"]].append(r)
    return {label: {"n": len(rs), "flips": sum(r["flipped"] for r in rs),
                    "flip_rate": sum(r["flipped"] for r in rs) / len(rs)}
            for label, rs in sorted(by_class.items(), key=lambda kv: -len(kv[1]))}


def aggregate(records: list[dict], resolved_config: dict, run: dict, rank_meta: list[dict]) -> dict:
    if not records:
        raise ZoomError("the run directory has no finished records to report on")
    groups = defaultdict(list)
    for r in records:
        groups[r["attribute"]].append(r)
    null_records = groups.pop(NULL_NAME, [])
    null = {"name": NULL_NAME, "prompt": null_records[0]["prompt"] if null_records else None,
            **_counts(null_records), "per_class": _per_class(null_records)}

    prompts = {a["name"]: a["prompt"] for a in resolved_config["prompts"]["attributes"]}
    attributes = []
    for name, rs in groups.items():
        c = _counts(rs)
        p = greater_than_null_p(c["flips"], c["n"], null["flips"], null["n"])
        attributes.append({"name": name, "prompt": prompts.get(name, rs[0]["prompt"]), "slug": rs[0]["slug"],
                           **c, "p_value": _num(p), "per_class": _per_class(rs)})
    qs = bh_qvalues([a["p_value"] if a["p_value"] is not None else float("nan") for a in attributes])
    for a, q in zip(attributes, qs):
        a["q_value"] = _num(q)
        a["significant"] = bool(a["q_value"] is not None and a["q_value"] < SIGNIFICANCE)
    attributes.sort(key=lambda a: (-(a["flip_rate"] or 0), a["p_value"] if a["p_value"] is not None else 2, a["name"]))

    ok = [r for r in records if r["status"] == "ok"]
    cost = {
        "counterfactuals": len(records),
        "seconds_per_counterfactual": _num(statistics.median(r["seconds"] for r in ok) if ok else None),
        "unet_calls_per_counterfactual": _num(statistics.median(r["unet_calls"] for r in ok) if ok else None),
        "steps_per_counterfactual": _num(statistics.median(r["steps"] for r in ok) if ok else None),
        "peak_memory_bytes": max((m["peak_memory_bytes"] for m in rank_meta), default=None),
        "memory_kind": rank_meta[0]["memory_kind"] if rank_meta else None,
    }
    end = max((m["end_time"] for m in rank_meta), default=None)
    samples = (resolved_config.get("search") or {}).get("samples")
    expected = samples * (len(prompts) + 1) if isinstance(samples, int) else None
    return {
        "schema_version": SCHEMA_VERSION,
        "run": {**run, "end_time": end, "config": resolved_config},
        "cost": cost,
        "completeness": {"finished": len(records), "expected": expected,
                         "complete": expected is None or len(records) >= expected},
        "significance_level": SIGNIFICANCE,
        "null": null,
        "attributes": attributes,
    }


RECORD_FIELDS = ("key", "seed", "attribute", "slug", "prompt", "status", "flipped", "strength", "base_pred",
                 "base_label", "base_prob", "final_prob", "validity", "seconds", "unet_calls", "steps")


def _check_records(records: list[dict], run_dir: Path) -> None:
    for r in records:
        if not isinstance(r, dict):
            raise ZoomError(f"{run_dir / 'records'}: a record is not a JSON object; the records are corrupt")
        missing = [f for f in RECORD_FIELDS if f not in r]
        if missing:
            raise ZoomError(f"{run_dir / 'records'}: record {str(r.get('key', '?'))!r} lacks {', '.join(missing)}; "
                            "the records are corrupt or were not written by zoom")


def load_run(run_dir) -> tuple[list[dict], dict, dict, list[dict]]:
    """(records, resolved config, run.json, rank meta) of a run directory; ZoomError when unreadable."""
    import yaml

    from ..runner import RECORDS_DIR, read_records

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ZoomError(f"run directory {str(run_dir)!r} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise ZoomError(f"{str(run_dir)!r} is not a zoom run directory (no config.yaml)")
    if not (run_dir / RECORDS_DIR).is_dir():
        raise ZoomError(f"{str(run_dir)!r} has no records/ folder: the audit never started; run `zoom audit` first")
    try:
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        meta = [json.loads(p.read_text()) for p in sorted((run_dir / RECORDS_DIR).glob("rank-*.meta.json"))]
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZoomError(f"{str(run_dir)!r}: config.yaml, run.json or a rank meta file is unreadable "
                        f"({type(e).__name__}); the run directory is damaged") from None
    if not isinstance(resolved, dict) or not isinstance((resolved.get("prompts") or {}).get("attributes"), list):
        raise ZoomError(f"{str(run_dir / 'config.yaml')!r} has no prompts.attributes; it is not a zoom run config")
    records = read_records(run_dir)
    if not records:
        raise ZoomError(f"{str(run_dir)!r} has no finished records to report on (records/ is empty); "
                        "finish the audit with `zoom audit ... --resume`")
    _check_records(records, run_dir)
    return records, resolved, run, meta


def build_report(run_dir) -> dict:
    """The report of a run directory from its records alone, without writing anything."""
    return aggregate(*load_run(run_dir))


def write_report(run_dir, *, html: bool = True) -> dict:
    """Rebuild report.json, report.csv and report.html from the run directory alone (atomically)."""
    from ..runner import atomic_write

    run_dir = Path(run_dir)
    records, resolved, run, meta = load_run(run_dir)
    report = aggregate(records, resolved, run, meta)
    atomic_write(run_dir / "report.json", json.dumps(report, indent=1, allow_nan=False))
    atomic_write(run_dir / "report.csv", to_csv(report))
    if html:
        from .html import render_report

        atomic_write(run_dir / "report.html", render_report(report, records, run_dir))
    return report


def to_csv(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report["attributes"] + [report["null"]]:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return buffer.getvalue()


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def summary_table(report: dict) -> str:
    rows = [("attribute", "flips/n", "flip rate [95% CI]", "q", "sig", "strength", "validity")]
    for a in report["attributes"] + [report["null"]]:
        ci = f"{_fmt(a['flip_rate'])} [{_fmt(a['ci_low'])}, {_fmt(a['ci_high'])}]"
        rows.append((a["name"][:28], f"{a['flips']}/{a['n']}", ci, _fmt(a.get("q_value"), ".3g"),
                     "*" if a.get("significant") else "", _fmt(a["median_strength_to_flip"]),
                     _fmt(a["validity_rate"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
