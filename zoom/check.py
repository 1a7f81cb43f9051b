"""`zoom check RUN_DIR --max-flip-rate R`: a pre-deployment gate on a finished run (DESIGN §3).

An attribute fails the gate when both hold:
- its flip rate is significantly above the null control's (`significant`: one-sided Fisher exact
  test, Benjamini-Hochberg q < 0.05 over the run's attributes), and
- its 95% Wilson lower bound `ci_low` exceeds R: the data show, not merely suggest, a flip rate above R.
The run fails (exit 1) when any checked attribute fails; it passes (exit 0) otherwise. A pass is not
proof of robustness: with few seeds the intervals are wide and little can be shown either way, so
the result lists every checked attribute's upper bound too.
"""

from __future__ import annotations

import math

from .errors import ZoomError
from .report.aggregate import build_report

RULE = ("an attribute fails when its flip rate is significantly above the null control's "
        "(BH q < {level}) and its 95% Wilson lower bound exceeds {r}")


def validate_threshold(value) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise ZoomError(f"--max-flip-rate must be a number between 0 and 1 (a share of seeds, e.g. 0.2), got {value!r}") from None
    if math.isnan(r) or not 0.0 <= r <= 1.0:
        raise ZoomError(f"--max-flip-rate must be between 0 and 1 (a share of seeds, e.g. 0.2), got {value}")
    return r


def evaluate(report: dict, max_flip_rate, attributes=None) -> dict:
    """The gate's verdict on a report; ZoomError for bad input (threshold, names, untestable run)."""
    r = validate_threshold(max_flip_rate)
    rows = report["attributes"]
    known = [a["name"] for a in rows]
    if attributes:
        unknown = [name for name in attributes if name not in known]
        if unknown:
            raise ZoomError(f"--attribute {unknown[0]!r} is not an attribute of this run; "
                            f"its attributes are: {', '.join(map(repr, known))}")
        rows = [a for a in rows if a["name"] in set(attributes)]
    null = report["null"]
    if not null.get("n"):
        raise ZoomError("the run's null control has no successful items, so no attribute can be tested against it; "
                        "rerun the audit (see the failed records for why)")
    untestable = [a["name"] for a in rows if not a.get("n")]
    if untestable:
        raise ZoomError(f"attribute {untestable[0]!r} has no successful items (all failed), so the check cannot "
                        "judge it; rerun the audit or leave it out with --attribute")
    done = report.get("completeness") or {}
    if done and not done.get("complete", True):
        raise ZoomError(f"the run is incomplete ({done['finished']} of {done['expected']} items finished); finish it "
                        "with `zoom audit --config ... --out RUN_DIR --resume` before gating on it")
    checked = []
    for a in rows:
        exceeds = a["ci_low"] is not None and a["ci_low"] > r
        checked.append({
            "name": a["name"], "n": a["n"], "flips": a["flips"], "flip_rate": a["flip_rate"],
            "ci_low": a["ci_low"], "ci_high": a["ci_high"], "p_value": a.get("p_value"), "q_value": a.get("q_value"),
            "significant": bool(a.get("significant")), "lower_bound_exceeds": bool(exceeds),
            "fails": bool(a.get("significant") and exceeds),
        })
    failing = [c["name"] for c in checked if c["fails"]]
    level = report.get("significance_level", 0.05)
    return {
        "passed": not failing,
        "max_flip_rate": r,
        "rule": RULE.format(level=level, r=r),
        "failing": failing,
        "attributes": checked,
        "null": {k: null.get(k) for k in ("n", "flips", "flip_rate", "ci_low", "ci_high")},
        "significance_level": level,
    }


def check_run(run_dir, max_flip_rate, attributes=None) -> dict:
    r = validate_threshold(max_flip_rate)  # bad input first, before reading anything
    result = evaluate(build_report(run_dir), r, attributes)
    result["run"] = str(run_dir)
    return result


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def check_text(result: dict) -> str:
    r = result["max_flip_rate"]
    null = result["null"]
    lines = []
    if result["passed"]:
        lines.append(f"zoom check: PASS: no attribute's flip rate is significantly above the null control with a 95% "
                     f"lower bound above {r:g} ({len(result['attributes'])} attribute(s) checked)")
    else:
        lines.append(f"zoom check: FAIL: {len(result['failing'])} attribute(s) flip the target significantly more often "
                     f"than the null control, with a 95% lower bound above {r:g}:")
        for c in result["attributes"]:
            if c["fails"]:
                lines.append(f"  {c['name']}: {c['flips']}/{c['n']} seeds flipped, flip rate {_fmt(c['flip_rate'])} "
                             f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] > {r:g}, q = {_fmt(c['q_value'], '.3g')} "
                             f"(null {_fmt(null['flip_rate'])})")
    lines.append("")
    rows = [("attribute", "flips/n", "flip rate [95% CI]", "q", "sig", "lower > R", "verdict")]
    for c in result["attributes"]:
        rows.append((c["name"][:28], f"{c['flips']}/{c['n']}",
                     f"{_fmt(c['flip_rate'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]",
                     _fmt(c["q_value"], ".3g"), "*" if c["significant"] else "",
                     "yes" if c["lower_bound_exceeds"] else "no", "FAIL" if c["fails"] else "ok"))
    rows.append(("null", f"{null['flips']}/{null['n']}",
                 f"{_fmt(null['flip_rate'])} [{_fmt(null['ci_low'])}, {_fmt(null['ci_high'])}]", "-", "", "", "reference"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    lines += table
    if result["passed"]:
        highest = max((c["ci_high"] for c in result["attributes"] if c["ci_high"] is not None), default=None)
        if highest is not None and highest > r:
            lines.append(f"note: a pass is not proof of robustness: flip rates up to {highest:.2f} (highest upper 95% "
                         f"bound) are still compatible with this run; more seeds narrow the intervals")
    lines.append(f"rule: {result['rule']}")
    return "\n".join(lines)
