"""report.html and the compare page: Jinja2 templates (autoescaped), matplotlib figures inline.

The pages are self-contained: no script, no stylesheet or font from anywhere, plots embedded as
`data:` URIs, gallery images referenced by their path relative to the run directory (validated: a
record can never point the page at another folder or a URL). A Content-Security-Policy forbids
scripts and every fetch but images from the page's own folder and `data:`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..prompts import NULL_NAME
from . import plots
from .aggregate import format_p, format_strength

GALLERY_CAP = 12        # counterfactual pairs shown per attribute (flipped first)
CLASS_COLUMNS = 8       # base classes shown in the per-class table; the rest are pooled as "other"
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*$")


def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,  # every user string (names, prompts, labels, paths) is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_num, pval=_pval, pct=_pct, signed=_signed, bytes=_bytes, strength=_strength)
    return env


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _num(x, digits: int = 2) -> str:
    return "–" if _missing(x) else f"{x:.{digits}f}"


def _signed(x, digits: int = 2) -> str:
    return "–" if _missing(x) else f"{x:+.{digits}f}".replace("-", "−")


def _pct(x) -> str:
    return "–" if _missing(x) else f"{100 * x:.0f}%"


def _pval(x) -> str:
    return "–" if _missing(x) else format_p(x)


def _strength(row: dict, limit) -> str:
    return format_strength(row, limit).replace("-", "–").replace(">", "> ")


def _bytes(x) -> str:
    if _missing(x):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024


def short_spec(spec) -> str:
    """A target spec for a title: `hf:…/shape-red-circles-p95` rather than the full cache path."""
    if not isinstance(spec, str) or not spec:
        return "the target"
    kind, _, rest = spec.partition(":")
    if "/" in rest and (rest.startswith(("/", "~", ".")) or kind in ("torchscript", "python")):
        return f"{kind}:…/{rest.rstrip('/').rsplit('/', 1)[-1]}"
    return spec


def image_src(run_dir: Path, path) -> str | None:
    """A record's PNG path, if it is a plain relative path inside the run directory that exists."""
    if not isinstance(path, str) or not _SAFE_PATH.match(path) or ".." in path.split("/"):
        return None
    return path if (Path(run_dir) / path).is_file() else None


# ---------------------------------------------------------------------------------------------
# report.html


def _gallery(report: dict, records: list[dict], run_dir: Path, cap: int) -> list[dict]:
    by_name: dict[str, list[dict]] = {}
    for r in records:
        by_name.setdefault(r["attribute"], []).append(r)
    sections = []
    for row in report["attributes"] + [report["null"]]:
        rs = by_name.get(row["name"], [])
        ok = [r for r in rs if r["status"] == "ok"]
        flipped = sorted((r for r in ok if r["flipped"]), key=lambda r: (r["strength"] or 0, r["seed"]))
        kept = sorted((r for r in ok if not r["flipped"]), key=lambda r: r["seed"])
        shown = (flipped + kept)[:cap]
        items = [{
            "seed": r["seed"], "flipped": r["flipped"], "validity": r.get("validity"),
            "base_src": image_src(run_dir, r.get("base_image")),
            "cf_src": image_src(run_dir, r.get("counterfactual_image")),
            "base_label": r.get("base_label", r.get("base_pred")), "final_label": r.get("final_label", r.get("final_pred")),
            "base_prob": r.get("base_prob"), "final_prob": r.get("final_prob"),
            "alpha": r.get("alpha"), "strength": r.get("strength"), "reach": r.get("reach", r.get("strength")),
            "prompt": r.get("prompt"),
        } for r in shown]
        sections.append({
            "name": row["name"], "prompt": row.get("prompt"), "slug": row.get("slug") or f"{NULL_NAME}*",
            "is_null": row["name"] == NULL_NAME and row is report["null"],
            "flips": row["flips"], "n": row["n"], "pairs": items,
            "more": len(ok) - len(shown), "more_flipped": max(0, len(flipped) - cap) if len(flipped) > cap else 0,
            "failed": len(rs) - len(ok), "anchor": f"g-{len(sections)}",
        })
    return sections


def _per_class(report: dict) -> dict:
    rows = report["attributes"] + [report["null"]]
    totals: dict[str, int] = {}
    for row in rows:
        for label, c in (row.get("per_class") or {}).items():
            totals[label] = totals.get(label, 0) + c["n"]
    ordered = sorted(totals, key=lambda k: (-totals[k], str(k)))
    shown, pooled = ordered[:CLASS_COLUMNS], set(ordered[CLASS_COLUMNS:])
    table = []
    for row in rows:
        per = row.get("per_class") or {}
        cells = []
        for label in shown:
            c = per.get(label)
            cells.append(None if c is None else _cell(c["flips"], c["n"]))
        if pooled:
            k = sum(per[lab]["flips"] for lab in pooled if lab in per)
            n = sum(per[lab]["n"] for lab in pooled if lab in per)
            cells.append(_cell(k, n) if n else None)
        table.append({"name": row["name"], "is_null": row is report["null"], "cells": cells})
    columns = [{"label": lab, "n": totals[lab]} for lab in shown]
    if pooled:
        columns.append({"label": f"other ({len(pooled)} classes)", "n": sum(totals[lab] for lab in pooled)})
    return {"columns": columns, "rows": table}


def _cell(flips: int, n: int) -> dict:
    from ..stats import wilson_interval

    low, high = wilson_interval(flips, n)
    return {"flips": flips, "n": n, "rate": flips / n, "ci_low": low, "ci_high": high}


OVERRIDDEN = {"target.spec": "the target", "prompts": "the prompt set", "oracle": "the oracles"}


def _verdict(report: dict) -> dict:
    attrs = report["attributes"]
    significant = [a for a in attrs if a.get("significant")]
    uppers = [a["ci_high"] for a in attrs if not _missing(a.get("ci_high")) and not a.get("significant")]
    ns = sorted({a["n"] for a in attrs})
    return {"significant": significant, "tested": len(attrs), "max_upper": max(uppers) if uppers else None,
            "ns": ns, "null": report["null"], "level": report.get("significance_level", 0.05),
            "untestable": [a["name"] for a in attrs if a.get("testable") is False]}


def _models(run: dict) -> list[dict]:
    rows = []
    for role, m in (run.get("models") or {}).items():
        m = m or {}
        files = m.get("files") or {}
        rows.append({
            "role": role,
            "id": m.get("id", m.get("spec")),
            "detail": ", ".join(f"{k}: {v}" for k, v in m.items() if k not in ("id", "spec", "files") and v is not None),
            "sha256": files.get("sha256"), "files": files.get("files"), "path": files.get("path"),
        })
    return rows


def _figures(report: dict, records: list[dict]) -> dict:
    attrs, null = report["attributes"], report["null"]
    figures = {"forest": plots.forest_plot(attrs, null)}
    if any("dose_response" in a for a in attrs):
        panels = [(a["name"], a["dose_response"], a.get("significant")) for a in attrs if "dose_response" in a]
        figures["dose"] = plots.dose_response_plot(panels, null.get("dose_response"))
    strengths = {}
    for r in records:
        if r["status"] == "ok" and r["flipped"] and not _missing(r.get("strength")):
            strengths.setdefault(r["attribute"], []).append(r["strength"])
    if strengths:
        search = (report["run"].get("config") or {}).get("search") or {}
        top = search.get("alpha_max") if search.get("edit_space", "text") == "text" else None
        top = max([top or 0] + [v for vs in strengths.values() for v in vs])
        panels = [(a["name"], strengths.get(a["name"], []), a["n"], a.get("significant")) for a in attrs]
        figures["strength"] = plots.strength_histograms(panels, strengths.get(NULL_NAME), top)
    return figures


def _timing(run: dict) -> dict:
    import datetime as dt

    try:
        start = dt.datetime.fromisoformat(run["start_time"])
        end = dt.datetime.fromisoformat(run["end_time"])
    except (KeyError, TypeError, ValueError):
        return {"wall": "–", "span": "", "end": run.get("end_time")}
    seconds = max(0, int((end - start).total_seconds()))
    wall = f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")
    return {"wall": wall, "span": f"{start:%Y-%m-%d %H:%M} → {end:%H:%M} {end:%Z}".strip(),
            "end": f"{end:%Y-%m-%d %H:%M} {end:%Z}".strip()}


def render_report(report: dict, records: list[dict], run_dir, *, cap: int = GALLERY_CAP) -> str:
    """The whole report.html as a string (the caller writes it atomically)."""
    import yaml

    run_dir = Path(run_dir)
    run = report["run"]
    config = run.get("config") or {}
    prompts = config.get("prompts") or {}
    command = str(run.get("command") or "")
    context = {
        "report": report,
        "run": run,
        "config": config,
        "domain": prompts.get("domain"),
        "search": config.get("search") or {},
        "target": (config.get("target") or {}).get("spec"),
        "target_name": short_spec((config.get("target") or {}).get("spec")),
        "task": (config.get("target") or {}).get("task"),
        "resolution": (config.get("generator") or {}).get("resolution") or 512,
        "random_models": bool(run.get("random_models")),
        "overridden": [OVERRIDDEN.get(k, k) for k in (run.get("overridden") or []) if isinstance(k, str)],
        "verdict": _verdict(report),
        "figures": _figures(report, records),
        "gallery": _gallery(report, records, run_dir, cap),
        "per_class": _per_class(report),
        "models": _models(run),
        "config_yaml": yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100),
        "joint": any("mean_share" in a for a in report["attributes"]),
        "oracle": any("oracle_rate" in a for a in report["attributes"]),
        "cap": cap,
        "version": (run.get("versions") or {}).get("zoom", ""),
        "timing": _timing(run),
    }
    return _env().get_template("report.html.j2").render(**context)


def render_compare(comparison: dict) -> str:
    rows = comparison["attributes"] + [dict(comparison["null"], reference=True)]
    figure = plots.difference_plot(rows)
    return _env().get_template("compare.html.j2").render(c=comparison, figure=figure)
