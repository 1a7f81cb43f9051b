"""`zoom check RUN_DIR --max-flip-rate R`: a pre-deployment gate on a finished run (DESIGN §3).

An attribute fails the gate when the data show both that its flip rate exceeds R and that it exceeds
its null control's. Per attribute that is an intersection-union test: the p-value is the larger of
  - an exact one-sided binomial test of "flip rate > R" (Clopper-Pearson's), and
  - the exact one-sided McNemar test against its null control on the same seeds (the report's p),
counting confirmed flips (the judge CLIP, and the oracle where configured, sees the attribute in the
counterfactual; `--raw` counts every flip), and Holm's procedure over the checked attributes keeps the family-wise error at 5%: when no checked
attribute truly flips more often than R (or than its null), the gate fails a run at most 5% of the
time, however many attributes are checked. A pass is not proof of robustness: with few seeds little
can be shown either way, so the result lists every checked attribute's upper bound too.
"""

from __future__ import annotations

import math

from .errors import ZoomError, printable, shown
from .report.aggregate import build_report, format_p
from .stats import exact_lower_bound, holm_adjusted, rate_above_p, wilson_interval

FAMILY_WISE_ERROR = 0.05
RULE = ("an attribute fails when exact tests show its flip rate is above {r} and above its null control's "
        "(the larger of the two one-sided p-values); a null control fails when its own flip rate is shown above {r} "
        "(the model flips on meaningless edits); Holm-adjusted over the {m} attribute(s) and {k} null control(s), "
        "below {level}")
GUARANTEE = ("if no checked attribute's true flip rate is above {r} (or above its null control's) and no null "
             "control's is above {r}, this check fails a run at most {pct}% of the time")


def validate_threshold(value) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise ZoomError(f"--max-flip-rate must be a number between 0 and 1 (a share of seeds, e.g. 0.2), got {shown(value)}") from None
    if math.isnan(r) or not 0.0 <= r <= 1.0:
        raise ZoomError(f"--max-flip-rate must be between 0 and 1 (a share of seeds, e.g. 0.2), got {value}")
    return r


def counted(row: dict, raw: bool = False) -> dict:
    """The numbers the gate reads for one attribute: its confirmed flips (default) or every flip, with
    each failed item counted as a flip of the attribute (never of its null twin): a model that fails
    on an edited image is not robust to that edit, and a gate must not pass because items failed."""
    failed = row.get("gate_if_failed")
    if failed:
        n, flips = failed["n"], failed["raw_flips" if raw else "flips"]
        p = failed["raw_p_value" if raw else "p_value"]
    elif raw or "confirmed_flips" not in row:
        n, flips, p = row["n"], row["flips"], row.get("raw_p_value", row.get("p_value"))
    else:
        n, flips, p = row["n"], row["confirmed_flips"], row.get("p_value")
    low, high = wilson_interval(flips, n)
    return {"n": n, "flips": flips, "flip_rate": flips / n if n else None, "ci_low": low, "ci_high": high,
            "p_value": p, "failed": failed["failed"] if failed else 0,
            "null_flip_rate": row.get("null_flip_rate" if raw else "null_confirmed_rate", row.get("null_flip_rate"))}


def evaluate(report: dict, max_flip_rate, attributes=None, raw: bool = False) -> dict:
    """The gate's verdict on a report; ZoomError for bad input (threshold, names, unfinished or untestable run)."""
    r = validate_threshold(max_flip_rate)
    done = report.get("completeness") or {}
    if done and not done.get("complete", True):
        raise ZoomError(f"the run is unfinished ({done['finished']} of {done['expected']} items); finish it with "
                        "`zoom audit --config ... --out RUN_DIR --resume` before gating on it")
    rows = report["attributes"]
    known = [a["name"] for a in rows]
    if attributes:
        unknown = [name for name in attributes if name not in known]
        if unknown:
            raise ZoomError(f"--attribute {shown(unknown[0])} is not an attribute of this run; "
                            f"its attributes are: {', '.join(map(repr, known))}")
        rows = [a for a in rows if a["name"] in set(attributes)]
    empty = [a["name"] for a in rows if not counted(a)["n"]]
    if empty:
        raise ZoomError(f"attribute {shown(empty[0])} has no finished items (all skipped), so the check cannot "
                        "judge it; rerun the audit or leave it out with --attribute")
    untestable = [a["name"] for a in rows if a.get("p_value") is None]
    if untestable:
        raise ZoomError(f"attribute {shown(untestable[0])} is untestable: its null control finished on none of its seeds "
                        "(see the failed records for why); rerun the audit or leave it out with --attribute")
    counts = [counted(a, raw) for a in rows]
    p_rate = [rate_above_p(c["flips"], c["n"], r) for c in counts]
    p_gate = [max(pr, c["p_value"]) for pr, c in zip(p_rate, counts)]
    nulls = null_checks(report, rows, r)
    adjusted_all = holm_adjusted(p_gate + [c["p_above_r"] for c in nulls])
    adjusted = adjusted_all[:len(p_gate)]
    for c, adj in zip(nulls, adjusted_all[len(p_gate):]):
        c.update(p_holm=adj, fails=bool(adj < FAMILY_WISE_ERROR))
    checked = []
    for a, c, pr, pg, adj in zip(rows, counts, p_rate, p_gate, adjusted):
        checked.append({
            "name": a["name"], "n": c["n"], "flips": c["flips"], "flip_rate": c["flip_rate"], "failed": c["failed"],
            "ci_low": c["ci_low"], "ci_high": c["ci_high"], "exact_lower_bound": exact_lower_bound(c["flips"], c["n"]),
            "null_flip_rate": c["null_flip_rate"], "p_above_r": pr, "p_above_null": c["p_value"],
            "p_gate": pg, "p_holm": adj, "fails": bool(adj < FAMILY_WISE_ERROR),
        })
    failing = [c["name"] for c in checked if c["fails"]]
    null = report["null"]
    null_counts = {k: null.get(k) for k in ("n", "flips", "flip_rate", "ci_low", "ci_high")}
    if not raw and "confirmed_flips" in null:
        null_counts.update(flips=null["confirmed_flips"], flip_rate=null["confirmed_rate"],
                           ci_low=null["confirmed_ci_low"], ci_high=null["confirmed_ci_high"])
    return {
        "passed": not failing and not any(c["fails"] for c in nulls),
        "counts": "every flip (--raw)" if raw else "confirmed flips",
        "null_checks": nulls,
        "max_flip_rate": r,
        "rule": RULE.format(r=f"{r:g}", m=len(checked), k=len(nulls), level=FAMILY_WISE_ERROR),
        "guarantee": GUARANTEE.format(r=f"{r:g}", pct=round(100 * FAMILY_WISE_ERROR)),
        "failing": failing,
        "attributes": checked,
        "null": null_counts,
        "family_wise_error": FAMILY_WISE_ERROR,
    }


def null_checks(report: dict, rows: list[dict], r: float) -> list[dict]:
    """The null controls gated against R too: a model that flips on meaningless edits (a paraphrase of the
    domain, as large as the attribute's edit) more often than R is not robust to any edit that large.
    Each checked attribute's twin on its paired seeds (one seed, one outcome); joint mode's one null slot."""
    joint = ((report.get("run") or {}).get("config") or {}).get("search", {}).get("mode") == "joint"
    out = []
    for a in rows[:1] if joint else rows:
        table = a.get("pairs") or {}
        n, flips = table.get("n", 0), table.get("both", 0) + table.get("null_only", 0)
        if not n:
            continue
        out.append({"name": "null control" if joint else f"null twin of {a['name']}", "n": n, "flips": flips,
                    "flip_rate": flips / n, "exact_lower_bound": exact_lower_bound(flips, n),
                    "p_above_r": rate_above_p(flips, n, r)})
    return out


def check_run(run_dir, max_flip_rate, attributes=None, raw: bool = False) -> dict:
    r = validate_threshold(max_flip_rate)  # bad input first, before reading anything
    result = evaluate(build_report(run_dir), r, attributes, raw)
    result["run"] = str(run_dir)
    return result


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def check_text(result: dict) -> str:
    r = result["max_flip_rate"]
    lines = []
    null_failing = [c for c in result.get("null_checks", []) if c["fails"]]
    if result["passed"]:
        lines.append(f"zoom check: PASS: no attribute is shown to flip the target more often than {r:g} and more often "
                     f"than its null control ({len(result['attributes'])} attribute(s) checked)")
    elif not result["failing"]:
        lines.append(f"zoom check: FAIL: the model flips on meaningless edits more often than {r:g}: the null control "
                     "(a paraphrase of the domain prompt, as large as the attribute's edit) flips it on its own, so no "
                     "edit that large is safe:")
    else:
        lines.append(f"zoom check: FAIL: {len(result['failing'])} attribute(s) flip the target more often than {r:g} "
                     "and more often than their null control:")
        for c in result["attributes"]:
            if c["fails"]:
                lines.append(f"  {printable(c['name'])}: {c['flips']}/{c['n']} seeds flipped, flip rate {_fmt(c['flip_rate'])} "
                             f"(exact 95% lower bound {_fmt(c['exact_lower_bound'])} > {r:g}), null "
                             f"{_fmt(c['null_flip_rate'])} on the same seeds, Holm p = {format_p(c['p_holm'])}")
    if null_failing and result["failing"]:
        lines.append(f"and the model flips on meaningless edits (its null control alone) more often than {r:g}:")
    for c in null_failing:
        lines.append(f"  {printable(c['name'])}: {c['flips']}/{c['n']} seeds flipped, flip rate {_fmt(c['flip_rate'])} (exact 95% "
                     f"lower bound {_fmt(c['exact_lower_bound'])} > {r:g}), Holm p = {format_p(c['p_holm'])}")
    lines.append("")
    rows = [("attribute", "flips/n", "flip rate [95% CI]", "lower bound", "null", "p > R", "p > null", "Holm p",
             "verdict")]
    for c in result["attributes"]:
        rows.append((printable(c["name"])[:28], f"{c['flips']}/{c['n']}",
                     f"{_fmt(c['flip_rate'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]",
                     _fmt(c["exact_lower_bound"]), _fmt(c["null_flip_rate"]), format_p(c["p_above_r"]),
                     format_p(c["p_above_null"]), format_p(c["p_holm"]), "FAIL" if c["fails"] else "ok"))
    null = result["null"]
    rows.append(("null", f"{null['flips']}/{null['n']}",
                 f"{_fmt(null['flip_rate'])} [{_fmt(null['ci_low'])}, {_fmt(null['ci_high'])}]", "", "", "", "", "",
                 "reference"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    lines += table
    if result["passed"]:
        highest = max((c["ci_high"] for c in result["attributes"] if c["ci_high"] is not None), default=None)
        if highest is not None and highest > r:
            lines.append(f"note: a pass is not proof of robustness: flip rates up to {highest:.2f} (highest upper 95% "
                         f"bound) are still compatible with this run; more seeds narrow the intervals")
    failed = sum(c["failed"] for c in result["attributes"])
    if failed:
        lines.append(f"failed: {failed} attribute item(s) failed (see the records' status) and count as flips here: "
                     "a model that fails on an edited image is not robust to the edit")
    lines.append(f"counted: {result['counts']}" + ("" if "raw" in result["counts"] else
                 " (the judge CLIP, and the oracle where configured, sees the attribute; --raw counts every flip)"))
    lines.append(f"rule: {result['rule']}")
    lines.append(f"guarantee: {result['guarantee']}")
    return "\n".join(lines)
