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
# A run may hold thousands of attributes: the figures and the gallery show the ones ranked highest (the
# report's order: confirmed flip rate, then p), and say so; the tables, report.json and report.csv hold all.
PLOT_TOP = 40           # rows of the forest plot
PANEL_TOP = 24          # panels of the dose-response and strength figures
GALLERY_TOP = 50        # attributes with a gallery section (the null control always has one)
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


def image_src(run_dir: Path, path, refused: list | None = None) -> str | None:
    """A record's PNG path, if it is a plain relative path that exists and resolves (links followed) to a
    regular file inside the run directory (zoom.rundir.run_image); a path refused for safety is added to
    `refused`. A link in images/ to a file elsewhere is never shown."""
    from ..rundir import run_image

    if not isinstance(path, str) or not _SAFE_PATH.match(path) or ".." in path.split("/"):
        return None
    return path if run_image(run_dir, path, refused) is not None else None


# ---------------------------------------------------------------------------------------------
# report.html


def _gallery(report: dict, records: list[dict], run_dir: Path, cap: int, refused: list | None = None) -> list[dict]:
    by_name: dict[str, list[dict]] = {}
    for r in records:
        by_name.setdefault(r["attribute"], []).append(r)
    sections = []
    for row in report["attributes"][:GALLERY_TOP] + [report["null"]]:
        rs = by_name.get(row["name"], [])
        ok = [r for r in rs if r["status"] == "ok"]
        flipped = sorted((r for r in ok if r["flipped"]), key=lambda r: (r["strength"] or 0, r["seed"]))
        kept = sorted((r for r in ok if not r["flipped"]), key=lambda r: r["seed"])
        shown = (flipped + kept)[:cap]
        items = [{
            "seed": r["seed"], "flipped": r["flipped"], "validity": r.get("validity"),
            "base_src": image_src(run_dir, r.get("base_image"), refused),
            "cf_src": image_src(run_dir, r.get("counterfactual_image"), refused),
            # keypoints, masks, boxes drawn on the images (structured tasks), shown in their place
            "base_overlay": image_src(run_dir, r.get("base_overlay"), refused),
            "cf_overlay": image_src(run_dir, r.get("counterfactual_overlay"), refused),
            "task": task_caption(r.get("task")),
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


def task_caption(task) -> str | None:
    """One line of a structured task's details under a gallery pair (None for classification)."""
    if not isinstance(task, dict):
        return None
    if "nme" in task:
        return f"NME {_num(task['nme'], 3)}"
    if "iou" in task:
        return (f"{task.get('class_label', task.get('class'))}: IoU {_num(task['iou'])} · area "
                f"{task.get('base_area', '–')} → {task.get('final_area', '–')} px")
    if "lost" in task:
        return (f"lost {task['lost']} · relabelled {task.get('relabelled', 0)} · "
                f"fabricated {task.get('fabricated', 0)}")
    return None


def _task_tables(report: dict, task) -> dict | None:
    """The task metrics section: one row per attribute (and the null), and the per-class split
    (segmentation: by audited class; detection: base detections lost or relabelled, by base label)."""
    rows = report["attributes"] + [report["null"]]
    if not any("task_metrics" in row for row in rows):
        return None
    key = {"segmentation": "per_class", "detection": "per_label"}.get(task)
    split = _per_class(report, lambda row: (row.get("task_metrics") or {}).get(key)) if key else None
    return {"rows": [{"name": row["name"], "is_null": row is report["null"], **(row.get("task_metrics") or {})}
                     for row in rows], "split": split}


def _per_class(report: dict, cells_of=lambda row: row.get("per_class")) -> dict:
    """Rows: attributes and the null; columns: the CLASS_COLUMNS largest classes, the rest pooled. Each
    cell of cells_of(row) has n and flips."""
    rows = report["attributes"] + [report["null"]]
    totals: dict[str, int] = {}
    for row in rows:
        for label, c in (cells_of(row) or {}).items():
            totals[label] = totals.get(label, 0) + c["n"]
    ordered = sorted(totals, key=lambda k: (-totals[k], str(k)))
    shown, pooled = ordered[:CLASS_COLUMNS], set(ordered[CLASS_COLUMNS:])
    table = []
    for row in rows:
        per = cells_of(row) or {}
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


def top_shown(total: int, top: int) -> dict:
    """What a figure or the gallery shows of `total` attributes: the first `top` of the ranking."""
    return {"shown": min(total, top), "total": total, "all": total <= top}


def _figures(report: dict, records: list[dict]) -> dict:
    attrs, null = report["attributes"], report["null"]
    title = None if len(attrs) <= PLOT_TOP else \
        f"Top {PLOT_TOP} of {len(attrs):,} attributes by the report's ranking (the table lists all)"
    figures = {"forest": plots.forest_plot(attrs[:PLOT_TOP], null, title=title)}
    attrs = attrs[:PANEL_TOP]  # small multiples: one panel per attribute
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
    refused: list = []  # gallery images left out for safety (a link out of the run directory, a FIFO)
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
        "gallery": _gallery(report, records, run_dir, cap, refused),
        "plotted": {"forest": top_shown(len(report["attributes"]), PLOT_TOP),
                    "panels": top_shown(len(report["attributes"]), PANEL_TOP),
                    "gallery": top_shown(len(report["attributes"]), GALLERY_TOP)},
        "per_class": _per_class(report),
        "task_tables": _task_tables(report, (config.get("target") or {}).get("task")),
        "models": _models(run),
        "config_yaml": yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100),
        "joint": any("mean_share" in a for a in report["attributes"]),
        "oracle": any("oracle_rate" in a for a in report["attributes"]),
        "cap": cap,
        "version": (run.get("versions") or {}).get("zoom", ""),
        "timing": _timing(run),
    }
    page = _env().get_template("report.html.j2").render(**context)
    if refused:
        import sys

        from ..errors import shown

        unique = dict(refused)  # a base image is shown beside each of its seed's edits
        first, reason = next(iter(unique.items()))
        more = f"; and {len(unique) - 1} more" if len(unique) > 1 else ""
        print(f"zoom: warning: {len(unique)} gallery image(s) left out of report.html (shown as missing; nothing "
              f"outside the run directory was read): {shown(first)} {reason}{more}", file=sys.stderr)
    return page


def render_compare(comparison: dict) -> str:
    attributes = comparison["attributes"]
    plotted = top_shown(len(attributes), PLOT_TOP)
    title = None if plotted["all"] else \
        f"Top {PLOT_TOP} of {len(attributes):,} attributes by the comparison's order (the table lists all)"
    figure = plots.difference_plot(attributes[:PLOT_TOP] + [dict(comparison["null"], reference=True)], title)
    return _env().get_template("compare.html.j2").render(c=comparison, figure=figure, plotted=plotted)
