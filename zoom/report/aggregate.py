"""Aggregate per-item records into report.json (schema_version 1, DESIGN §4)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import ZoomError, printable
from ..rundir import atomic_write, load_run
from ..prompts import NULL_NAME
from ..stats import bh_qvalues, censored_quantiles, mcnemar_greater_p, wilson_interval

SCHEMA_VERSION = 1
SIGNIFICANCE = 0.05  # BH false discovery rate at which an attribute is called significant
CSV_COLUMNS = ["name", "prompt", "n", "flips", "flip_rate", "ci_low", "ci_high", "null_flip_rate", "pairs_n",
               "attribute_only", "null_only", "p_value", "q_value", "significant", "median_strength_to_flip",
               "mean_prob_drop", "validity_rate", "validity_null_rate", "failed", "skipped"]


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _is_ok(r: dict) -> bool:
    return r["status"] == "ok"


def _is_failed(r: dict) -> bool:
    return str(r["status"]).startswith("failed")


def _strength_limit(config: dict) -> float | None:
    search = config.get("search") or {}
    key = "delta_max" if search.get("edit_space") == "latent" else "alpha_max"
    return search.get(key)


def _counts(records: list[dict]) -> dict:
    """One arm's numbers over its finished (status ok) items."""
    ok = [r for r in records if _is_ok(r)]
    flips = [r for r in ok if r["flipped"]]
    n, k = len(ok), len(flips)
    low, high = wilson_interval(k, n)
    # Strength to flip as right-censored data: an unflipped seed only says "more than it reached".
    q25, q50, q75 = censored_quantiles(
        [r["strength"] for r in flips if r["strength"] is not None],
        [r.get("reach", r["strength"]) for r in ok if not r["flipped"] and r.get("reach", r["strength"]) is not None])
    out = {
        "n": n,
        "flips": k,
        "flip_rate": _num(k / n if n else float("nan")),
        "ci_low": _num(low),
        "ci_high": _num(high),
        "median_strength_to_flip": q50,
        "strength_quartiles": [q25, q50, q75],
        "mean_prob_drop": _num(statistics.fmean(r["base_prob"] - r["final_prob"] for r in ok
                                                 if r["base_prob"] is not None and r["final_prob"] is not None)
                               if ok else None),
        "failed": sum(_is_failed(r) for r in records),
        "skipped": sum(not _is_ok(r) and not _is_failed(r) for r in records),
    }
    valid = [r["validity"] for r in flips if r.get("validity") is not None]
    if valid or any(r.get("validity") is not None for r in ok):
        v_low, v_high = wilson_interval(sum(valid), len(valid))
        out.update(validity_rate=_num(sum(valid) / len(valid) if valid else None), validity_n=len(valid),
                   validity_ci_low=_num(v_low), validity_ci_high=_num(v_high))
    else:
        out.update(validity_rate=None)
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
    """Exploratory: flip counts split by base prediction, with a Wilson interval per cell and no test."""
    by_class = defaultdict(list)
    for r in records:
        if _is_ok(r):
            by_class[r["base_label"]].append(r)
    out = {}
    for label, rs in sorted(by_class.items(), key=lambda kv: (-len(kv[1]), str(kv[0]))):
        k = sum(r["flipped"] for r in rs)
        low, high = wilson_interval(k, len(rs))
        out[label] = {"n": len(rs), "flips": k, "flip_rate": k / len(rs), "ci_low": low, "ci_high": high}
    return out


def pair_outcomes(attribute: list[dict], null: list[dict], impute_failed=None) -> dict:
    """The attribute's and its null control's outcomes on the same seeds.

    Complete pairs (both items ok) give the 2x2 table the test uses; `incomplete` counts seeds where
    one side failed, was skipped or is missing. With impute_failed=True/False, failed items count as
    flips / non-flips instead (the sensitivity of the verdict to failures).
    """
    def outcome(r):
        if r is None:
            return None
        if _is_ok(r):
            return bool(r["flipped"])
        if impute_failed is not None and _is_failed(r):
            return impute_failed
        return None

    by_seed_a = {r["seed"]: outcome(r) for r in attribute}
    by_seed_n = {r["seed"]: outcome(r) for r in null}
    table = {"n": 0, "both": 0, "attribute_only": 0, "null_only": 0, "neither": 0, "incomplete": 0}
    for seed in sorted(set(by_seed_a) | set(by_seed_n)):
        a, b = by_seed_a.get(seed), by_seed_n.get(seed)
        if a is None or b is None:
            table["incomplete"] += 1
            continue
        table["n"] += 1
        key = "both" if a and b else "attribute_only" if a else "null_only" if b else "neither"
        table[key] += 1
    return table


def _matched_null(name: str, null_records: list[dict]) -> list[dict]:
    """The null items that control attribute `name`: its twins, or the shared null (joint mode)."""
    twins = [r for r in null_records if r.get("pair") == name]
    return twins or [r for r in null_records if r.get("pair") is None]


def _validity_baseline(attribute: list[dict], null: list[dict], prompt: str) -> float | None:
    """On the seeds where the attribute flipped, the share whose null twin moved the judge's score for
    this attribute in the same direction as the attribute edit did: what validity is by chance."""
    nulls = {r["seed"]: r for r in null if _is_ok(r)}
    hits = []
    for r in attribute:
        twin = nulls.get(r["seed"])
        if not (_is_ok(r) and r["flipped"] and r.get("validity") is not None and twin):
            continue
        change = (twin.get("judge_change_toward") or {}).get(prompt)
        if change is None:
            continue
        sign = 1.0 if r.get("edit_space") == "latent" or not r.get("alpha") else math.copysign(1.0, r["alpha"])
        hits.append(sign * change > 0)
    return sum(hits) / len(hits) if hits else None


def _oracle(attribute: list[dict], null: list[dict], name: str) -> dict:
    """Ground-truth validity where the run names an oracle for the attribute: among flipped
    counterfactuals, how often the oracle sees the attribute, how often it already saw it in the base
    image, how often it sees it after the null edit on the same seeds, and its agreement with the judge."""
    flipped = [r for r in attribute if _is_ok(r) and r["flipped"] and r.get("oracle") is not None]
    if not any(r.get("oracle") is not None for r in attribute):
        return {}
    k = sum(r["oracle"] for r in flipped)
    low, high = wilson_interval(k, len(flipped))
    nulls = {r["seed"]: r for r in null if _is_ok(r)}
    baseline = [nulls[r["seed"]]["oracle_toward"][name] for r in flipped
                if name in (nulls.get(r["seed"], {}).get("oracle_toward") or {})]
    judged = [r for r in flipped if r.get("judge_change") is not None]
    return {
        "oracle_rate": _num(k / len(flipped) if flipped else None), "oracle_n": len(flipped),
        "oracle_ci_low": _num(low), "oracle_ci_high": _num(high),
        "oracle_base_rate": _num(sum(r["oracle_base"] for r in flipped) / len(flipped) if flipped else None),
        "oracle_null_rate": _num(sum(baseline) / len(baseline) if baseline else None),
        "oracle_judge_agreement": _num(sum(r["oracle"] == (r["judge_change"] > 0) for r in judged) / len(judged)
                                       if judged else None),
    }


def _test(rows: list[dict], tables: list[dict]) -> list[tuple[float | None, float | None, bool]]:
    """(p, q, significant) per attribute from its paired table: exact one-sided McNemar, then BH.
    A table with no complete pair is untestable (p None)."""
    ps = [mcnemar_greater_p(t["attribute_only"], t["null_only"]) if t["n"] else float("nan") for t in tables]
    qs = bh_qvalues(ps)
    return [(_num(p), _num(q), bool(_num(q) is not None and q < SIGNIFICANCE)) for p, q in zip(ps, qs)]


def aggregate(records: list[dict], resolved_config: dict, run: dict, rank_meta: list[dict]) -> dict:
    if not records:
        raise ZoomError("the run directory has no finished records to report on")
    groups = defaultdict(list)
    for r in records:
        groups[r["attribute"]].append(r)
    null_records = groups.pop(NULL_NAME, [])
    prompts_config = resolved_config.get("prompts") or {}
    null_prompts = prompts_config.get("null")
    null_label = (" | ".join(null_prompts) if isinstance(null_prompts, list) else null_prompts) or \
        (null_records[0]["prompt"] if null_records else None)
    null = {"name": NULL_NAME, "prompt": null_label, **_counts(null_records), "per_class": _per_class(null_records)}

    prompts = {a["name"]: a["prompt"] for a in prompts_config["attributes"]}
    attributes, tables, matched = [], [], []
    for name, rs in groups.items():
        nulls = _matched_null(name, null_records)
        table = pair_outcomes(rs, nulls)
        prompt = prompts.get(name, rs[0]["prompt"])
        row = {"name": name, "prompt": prompt, "slug": rs[0]["slug"], **_counts(rs), "pairs": table,
               "null_flip_rate": _num((table["both"] + table["null_only"]) / table["n"] if table["n"] else None),
               "validity_null_rate": _validity_baseline(rs, nulls, prompt), **_oracle(rs, nulls, name),
               "per_class": _per_class(rs)}
        attributes.append(row)
        tables.append(table)
        matched.append((rs, nulls))
    for row, (p, q, sig) in zip(attributes, _test(attributes, tables)):
        row.update(p_value=p, q_value=q, significant=sig, testable=p is not None)
    attributes.sort(key=lambda a: (-(a["flip_rate"] or 0), a["p_value"] if a["p_value"] is not None else 2, a["name"]))

    ok = [r for r in records if _is_ok(r)]
    cost = {
        "counterfactuals": len(records),
        "seconds_per_counterfactual": _num(statistics.median(r["seconds"] for r in ok) if ok else None),
        "unet_calls_per_counterfactual": _num(statistics.median(r["unet_calls"] for r in ok) if ok else None),
        "steps_per_counterfactual": _num(statistics.median(r["steps"] for r in ok) if ok else None),
        "peak_memory_bytes": max((m["peak_memory_bytes"] for m in rank_meta), default=None),
        "memory_kind": rank_meta[0]["memory_kind"] if rank_meta else None,
    }
    end = max((m["end_time"] for m in rank_meta), default=None)
    search = resolved_config.get("search") or {}
    samples = search.get("samples")
    twins = search.get("mode") != "joint" and not any(r.get("pair") is None for r in null_records)
    per_seed = 2 * len(prompts) if twins else len(prompts) + 1
    expected = samples * per_seed if isinstance(samples, int) else None
    return {
        "schema_version": SCHEMA_VERSION,
        "run": {**run, "end_time": end, "config": resolved_config},
        "cost": cost,
        "completeness": {"finished": len(records), "expected": expected,
                         "complete": expected is None or len(records) >= expected},
        "significance_level": SIGNIFICANCE,
        "test": "exact one-sided McNemar test on seeds where the attribute and its null control both finished; "
                "Benjamini-Hochberg over attributes",
        "strength_limit": _strength_limit(resolved_config),
        "failures": _failure_sensitivity(attributes, matched, records),
        "null": null,
        "attributes": attributes,
    }


def _failure_sensitivity(attributes: list[dict], matched: list, records: list[dict]) -> dict:
    """How the significant set would read if every failed item had flipped, or none had."""
    failed = sum(_is_failed(r) for r in records)
    out = {"failed": failed, "skipped": sum(not _is_ok(r) and not _is_failed(r) for r in records)}
    if not failed:
        return out
    by_name = {rs[0]["attribute"]: (rs, nulls) for rs, nulls in matched}
    for key, value in (("significant_if_failed_flipped", True), ("significant_if_failed_not_flipped", False)):
        tables = [pair_outcomes(*by_name[a["name"]], impute_failed=value) for a in attributes]
        out[key] = [a["name"] for a, (_, _, sig) in zip(attributes, _test(attributes, tables)) if sig]
    return out


def build_report(run_dir) -> dict:
    """The report of a run directory from its records alone, without writing anything."""
    return aggregate(*load_run(run_dir))


def write_report(run_dir, *, html: bool = True, lock: bool = False) -> dict:
    """Rebuild report.json, report.csv and report.html from the run directory alone (atomically).
    lock: take the run's lock first (`zoom report` on a run an audit may be writing)."""
    run_dir = Path(run_dir)
    if lock:
        from ..rundir import RunLock, read_config

        read_config(run_dir)  # a missing or damaged run says so before a lock file is created in it
        held = RunLock(run_dir)
        try:
            return write_report(run_dir, html=html)
        finally:
            held.release()
    records, resolved, run, meta = load_run(run_dir)
    report = aggregate(records, resolved, run, meta)
    atomic_write(run_dir / "report.json", json.dumps(report, indent=1, allow_nan=False))
    atomic_write(run_dir / "report.csv", to_csv(report))
    if html:
        from .html import render_report

        atomic_write(run_dir / "report.html", render_report(report, records, run_dir))
    return report


def _csv_cell(value):
    """A cell a spreadsheet shows as text: user strings that start like a formula (=, +, -, @, tab, CR)
    get a leading apostrophe, so `=HYPERLINK(...)` in an attribute name never runs."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report["attributes"] + [report["null"]]:
        pairs = row.get("pairs") or {}
        flat = {**row, "pairs_n": pairs.get("n"), "attribute_only": pairs.get("attribute_only"),
                "null_only": pairs.get("null_only")}
        writer.writerow({k: _csv_cell(flat.get(k)) for k in CSV_COLUMNS})
    return buffer.getvalue()


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def format_p(x) -> str:
    """p- and q-values, one style everywhere: 3 decimals, 4 below 0.01, scientific below 1e-4."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x < 1e-4:
        return f"{x:.1e}"
    return f"{x:.4f}" if x < 0.01 else f"{x:.3f}"


def format_strength(row: dict, limit) -> str:
    """The Kaplan-Meier median strength, or '> limit' when fewer than half the seeds flipped."""
    if row.get("median_strength_to_flip") is not None:
        return f"{row['median_strength_to_flip']:.2f}"
    if not row.get("n"):
        return "-"
    return f">{limit:g}" if isinstance(limit, (int, float)) else ">max"


def summary_table(report: dict) -> str:
    limit = report.get("strength_limit")
    oracle = any("oracle_rate" in a for a in report["attributes"])
    rows = [("attribute", "flips/n", "flip rate [95% CI]", "null", "p", "q", "sig", "strength", "validity")
            + (("oracle",) if oracle else ())]
    for a in report["attributes"] + [report["null"]]:
        is_null = a is report["null"]
        ci = f"{_fmt(a['flip_rate'])} [{_fmt(a['ci_low'])}, {_fmt(a['ci_high'])}]"
        sig = "" if is_null else ("*" if a.get("significant") else ("untestable" if not a.get("testable", True) else ""))
        validity = _fmt(a.get("validity_rate"))
        if a.get("validity_null_rate") is not None:
            validity += f" ({_fmt(a['validity_null_rate'])})"
        row = (printable(a["name"])[:28], f"{a['flips']}/{a['n']}", ci, "" if is_null else _fmt(a.get("null_flip_rate")),
               "" if is_null else format_p(a.get("p_value")), "" if is_null else format_p(a.get("q_value")),
               sig, format_strength(a, limit), "" if is_null else validity)
        if oracle:
            row += ("" if "oracle_rate" not in a else f"{_fmt(a['oracle_rate'])} ({_fmt(a.get('oracle_null_rate'))})",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failures = report.get("failures") or {}
    if failures.get("failed"):
        lines.append(failure_line(report))
    return "\n".join(lines)


def failure_line(report: dict) -> str:
    f = report["failures"]
    actual = [a["name"] for a in report["attributes"] if a.get("significant")]

    def names(xs):
        return ", ".join(map(printable, xs)) if xs else "none"

    return (f"{f['failed']} item(s) failed and are left out of the pairs; significant now: {names(actual)}; "
            f"if every failed item had flipped: {names(f['significant_if_failed_flipped'])}; "
            f"if none had: {names(f['significant_if_failed_not_flipped'])}")
