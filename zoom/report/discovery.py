"""discover.html: a discovery on one page, beside its discover.json.

The proposals with their screening scores, the confirmed table (with how many were screened: the
Benjamini-Hochberg correction covers only the confirmed ones), and a gallery of a few base ->
counterfactual pairs per confirmed attribute, read from the confirmation audit's records (OUT/confirm),
whose own report.html holds the rest. Rendered like report.html (zoom.report.html's autoescaped
templates and filters): vocabulary words are user strings.
"""

from __future__ import annotations

from pathlib import Path

from .html import _env, image_src, short_spec

GALLERY_PAIRS = 4  # pairs shown per confirmed attribute (flipped first); confirm/report.html shows more
PAGE = "discover.html"


def _pairs(records: list[dict], name: str, run_dir: Path, folder: str) -> list[dict]:
    """Up to GALLERY_PAIRS finished records of one attribute, flipped ones first (weakest edit first); image
    paths made relative to the page, only when they are safe inside the run (image_src)."""
    ok = [r for r in records if r.get("attribute") == name and r.get("status") == "ok"]
    ok.sort(key=lambda r: (not r.get("flipped"), r.get("strength") or 0, r.get("seed") or 0))

    def src(path):
        inside = image_src(run_dir, path)  # None when missing or unsafe: shown as "image missing"
        return f"{folder}/{inside}" if inside else None

    return [{"seed": r.get("seed"), "flipped": r.get("flipped"), "validity": r.get("validity"),
             "base_src": src(r.get("base_image")), "cf_src": src(r.get("counterfactual_image")),
             "base_label": r.get("base_label", r.get("base_pred")),
             "final_label": r.get("final_label", r.get("final_pred")),
             "strength": r.get("strength"), "reach": r.get("reach", r.get("strength"))}
            for r in ok[:GALLERY_PAIRS]]


def _resolution(run_dir: Path) -> int:
    from ..rundir import read_config

    try:
        return int((read_config(run_dir).get("generator") or {}).get("resolution") or 512)
    except Exception:  # a page without pixelated small images is still a page
        return 512


def render_discovery(result: dict, out) -> str:
    """discover.html as a string, from discover.json's content and the discovery folder `out`."""
    from ..rundir import read_records

    out = Path(out)
    confirm_dir = out / "confirm"
    records = read_records(confirm_dir) if result["confirmed"] and (confirm_dir / "records").is_dir() else []
    chosen = set(result["confirm"]["chosen"])
    gallery = [{**c, "anchor": f"g-{i}", "pairs": _pairs(records, c["name"], confirm_dir, "confirm")}
               for i, c in enumerate(result["confirmed"])]
    links = {name: name for name in ("confirm/report.html", "screen/report.html", "discovered.yaml")
             if (out / name).is_file()}
    return _env().get_template("discovery.html.j2").render(
        r=result, target_name=short_spec(result.get("target")), chosen=chosen, gallery=gallery, links=links,
        pixelated=_resolution(confirm_dir) < 128 if records else False, cap=GALLERY_PAIRS,
        oracle=any(c.get("oracle_rate") is not None for c in result["confirmed"]))


def write_discovery(result: dict, out) -> Path:
    """Write OUT/discover.html atomically; returns its path."""
    from ..rundir import atomic_write

    path = Path(out) / PAGE
    atomic_write(path, render_discovery(result, out))
    return path
