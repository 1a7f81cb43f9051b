"""`zoom compare RUN_A RUN_B`: the same attributes in two runs side by side.

Per attribute: both flip rates with their Wilson intervals, the difference B - A with a 95% interval,
an exact two-sided test of equal rates, and Benjamini-Hochberg q-values across the attributes. The
null control is compared too, as a reference outside the BH family.

When one run's seeds are all among the other's (same first seed; --samples may differ), an
attribute's items are paired by seed on the seeds both drew: the test is an exact McNemar test on the
seeds where both runs finished, and the interval Newcombe's paired score interval. Otherwise the runs
are unpaired samples: Fisher's exact test and Newcombe's hybrid score interval.

The null row pools K null twins per seed (one per attribute), which share the seed's image: there the
seed is the unit. Its test is a permutation test of the per-seed flip shares (seeds exchanged between
the runs, or each seed's two shares swapped when paired) and its interval combines the two runs' seed-
clustered intervals. A single-mode run's null (a twin per attribute) and a joint-mode run's (one slot
competing with the attributes) measure different things: that row is shown without a test.

Two runs are comparable when they audit the same prompts (domain, attributes, null) with the same
generator; the target, the number of seeds, the precision or the hardware may differ. Differences in
the search budget are allowed but reported as warnings: they change flip rates on their own.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import ZoomError, printable, shown, shown_path
from .prompts import NULL_NAME
from .report.aggregate import SIGNIFICANCE, format_p, seed_clustered, seed_shares
from .stats import (bh_qvalues, difference_interval, interval_difference,
                    mcnemar_two_sided_p, paired_difference_interval, seed_permutation_p, two_sided_exact_p)

SCHEMA_VERSION = 1
# generator keys that change memory or speed but not a single image
_GENERATOR_IGNORED = {"gradient_checkpointing"}
# search keys that only choose which seeds or how they are batched
_SEARCH_IGNORED = {"samples", "seed", "batch_size"}


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _prompt_set(config: dict) -> tuple:
    p = config.get("prompts") or {}
    attrs = {a["name"]: a["prompt"] for a in p.get("attributes") or []}
    return p.get("domain"), attrs, p.get("null")


def _short(x, width=60) -> str:
    text = repr(x)
    return text if len(text) <= width else text[: width - 1] + "…"


def _names(names: list, first: int = 4) -> str:
    """A few attribute names for an error line, and how many more (two runs may differ in thousands)."""
    text = ", ".join(shown(n, 40) for n in names[:first])
    return text + (f" and {len(names) - first:,} more" if len(names) > first else "")


def comparability(report_a: dict, report_b: dict) -> tuple[list[str], list[str]]:
    """(reasons the runs cannot be compared, warnings about what differs but is allowed)."""
    ca, cb = report_a["run"].get("config") or {}, report_b["run"].get("config") or {}
    refuse, warn = [], []
    (da, aa, na), (db, ab, nb) = _prompt_set(ca), _prompt_set(cb)
    if da != db:
        refuse.append(f"domain prompt ({_short(da)} vs {_short(db)})")
    if aa != ab:
        only_a, only_b = sorted(set(aa) - set(ab)), sorted(set(ab) - set(aa))
        reworded = sorted(k for k in set(aa) & set(ab) if aa[k] != ab[k])
        parts = ([f"only in A: {_names(only_a)}"] if only_a else []) + \
                ([f"only in B: {_names(only_b)}"] if only_b else []) + \
                ([f"reworded: {_names(reworded)}"] if reworded else [])
        refuse.append(f"attributes ({'; '.join(parts)})")
    if na != nb:
        refuse.append(f"null prompt ({_short(na)} vs {_short(nb)})")
    ga, gb = ca.get("generator") or {}, cb.get("generator") or {}
    for key in sorted((set(ga) | set(gb)) - _GENERATOR_IGNORED):
        if ga.get(key) != gb.get(key):
            refuse.append(f"generator.{key} ({_short(ga.get(key))} vs {_short(gb.get(key))})")
    ha, hb = (((r["run"].get("models") or {}).get("generator") or {}).get("files") or {}
              for r in (report_a, report_b))
    if ha.get("sha256") and hb.get("sha256") and ha["sha256"] != hb["sha256"] and ga.get("model") == gb.get("model"):
        refuse.append(f"generator weights (sha256 {ha['sha256'][:12]}… vs {hb['sha256'][:12]}…)")
    sa, sb = ca.get("search") or {}, cb.get("search") or {}
    for key in sorted((set(sa) | set(sb)) - _SEARCH_IGNORED):
        if sa.get(key) != sb.get(key):
            warn.append(f"search.{key} differs ({shown(sa.get(key))} vs {shown(sb.get(key))}): the search budget or method "
                        "changes flip rates on its own, so part of a difference may come from it")
    for name, r in (("A", report_a), ("B", report_b)):
        done = r.get("completeness") or {}
        if done and not done.get("complete", True):
            warn.append(f"run {name} is incomplete ({done['finished']} of {done['expected']} items)")
    return refuse, warn


def _side(row: dict) -> dict:
    keys = ("n", "flips", "flip_rate", "ci_low", "ci_high", "p_value", "q_value", "significant",
            "median_strength_to_flip", "validity_rate")
    return {k: row.get(k) for k in keys if k in row}


def _row(name: str, prompt, a: dict, b: dict, pairs: dict | None) -> dict:
    """One attribute (or the null) in both runs; pairs: the by-seed table of A's and B's outcomes, or
    None for unpaired runs."""
    if pairs is not None:
        low, high = paired_difference_interval(pairs["both"], pairs["b_only"], pairs["a_only"], pairs["neither"])
        p = mcnemar_two_sided_p(pairs["b_only"], pairs["a_only"]) if pairs["n"] else float("nan")
    else:
        low, high = difference_interval(b["flips"], b["n"], a["flips"], a["n"])
        p = two_sided_exact_p(b["flips"], b["n"], a["flips"], a["n"])
    diff = b["flip_rate"] - a["flip_rate"] if a["n"] and b["n"] else None
    if pairs is not None:
        diff = (pairs["b_only"] - pairs["a_only"]) / pairs["n"] if pairs["n"] else None
    row = {"name": name, "prompt": prompt, "a": _side(a), "b": _side(b), "difference": _nan_to_none(diff),
           "diff_ci_low": _nan_to_none(low), "diff_ci_high": _nan_to_none(high), "p_value": _nan_to_none(p)}
    if pairs is not None:
        row["pairs"] = pairs
    return row


def _paired_table(records_a: list[dict], records_b: list[dict]) -> dict:
    """A's and B's outcomes on the items both runs finished, matched by key (seed and arm)."""
    ok_a = {r["key"]: bool(r["flipped"]) for r in records_a if r["status"] == "ok"}
    ok_b = {r["key"]: bool(r["flipped"]) for r in records_b if r["status"] == "ok"}
    table = {"n": 0, "both": 0, "a_only": 0, "b_only": 0, "neither": 0}
    for key in ok_a.keys() & ok_b.keys():
        a, b = ok_a[key], ok_b[key]
        table["n"] += 1
        table["both" if a and b else "a_only" if a else "b_only" if b else "neither"] += 1
    return table


def drawn_seeds(report: dict) -> set[int]:
    search = (report["run"].get("config") or {}).get("search") or {}
    if not isinstance(search.get("seed"), int) or not isinstance(search.get("samples"), int):
        return set()
    return set(range(search["seed"], search["seed"] + search["samples"]))


def _null_row(report_a: dict, report_b: dict, nulls_a: list[dict], nulls_b: list[dict], common) -> dict:
    """The null control in both runs (their null records) with the seed as the unit (see the module
    docstring); common: the seeds to pair on, or None for unpaired runs."""
    mode_a, mode_b = ((r["run"].get("config") or {}).get("search", {}).get("mode") for r in (report_a, report_b))
    shares_a, shares_b = seed_shares(nulls_a), seed_shares(nulls_b)
    if common is not None:
        both = sorted(set(shares_a) & set(shares_b) & common)
        shares_a, shares_b = {s: shares_a[s] for s in both}, {s: shares_b[s] for s in both}

    def side(shares):
        c = seed_clustered(shares)
        return {"n": c["n"], "seeds": c["seeds"], "flips": c["flips"], "flip_rate": c["flips"] / c["n"] if c["n"] else None,
                "ci_low": c["ci_low"], "ci_high": c["ci_high"]}

    a, b = side(shares_a), side(shares_b)
    row = {"name": NULL_NAME, "prompt": report_a["null"].get("prompt"), "a": a, "b": b, "difference": None,
           "diff_ci_low": None, "diff_ci_high": None, "p_value": None, "unit": "seed"}
    if (mode_a == "joint") != (mode_b == "joint"):
        row["no_test"] = (f"the null rows are not compared: run {'A' if mode_a == 'joint' else 'B'} searched in joint "
                          "mode (one null slot that competes with the attributes for each flip) and the other in "
                          f"{mode_b if mode_a == 'joint' else mode_a} mode (a null twin per attribute); "
                          "their null rows measure different things")
        return row
    if not a["n"] or not b["n"]:
        return row
    low, high = interval_difference(b["flip_rate"], (b["ci_low"], b["ci_high"]), a["flip_rate"], (a["ci_low"], a["ci_high"]))
    share = {name: [f / m for f, m in shares.values()] for name, shares in (("a", shares_a), ("b", shares_b))}
    row.update(difference=b["flip_rate"] - a["flip_rate"], diff_ci_low=low, diff_ci_high=high,
               p_value=_nan_to_none(seed_permutation_p(share["b"], share["a"], paired=common is not None)))
    return row


def _describe(report: dict, path) -> dict:
    config = report["run"].get("config") or {}
    return {"path": str(path), "target": (config.get("target") or {}).get("spec"),
            "samples": (config.get("search") or {}).get("samples"), "mode": (config.get("search") or {}).get("mode"),
            "precision": report["run"].get("precision"), "end_time": report["run"].get("end_time")}


def compare_reports(report_a: dict, report_b: dict, records_a: list[dict], records_b: list[dict],
                    path_a="A", path_b="B", *, pair: bool = True) -> dict:
    """The comparison of two reports and their records (ZoomError when their prompts or generator
    differ). Items are paired by seed when one run's seeds are all among the other's (pair=False treats
    the runs as independent samples whatever their seeds)."""
    refuse, warnings = comparability(report_a, report_b)
    if refuse:
        raise ZoomError(f"cannot compare {shown_path(path_a)} with {shown_path(path_b)}: they differ in "
                        f"{'; '.join(refuse[:3])}{' …' if len(refuse) > 3 else ''}. compare needs runs of the same "
                        "prompt set and generator (the target, seeds and hardware may differ)")
    seeds_a, seeds_b = drawn_seeds(report_a), drawn_seeds(report_b)
    common = seeds_a & seeds_b
    paired = pair and bool(common) and common in (seeds_a, seeds_b)
    if paired and seeds_a != seeds_b:
        longer, extra = ("A", len(seeds_a - common)) if len(seeds_a) > len(seeds_b) else ("B", len(seeds_b - common))
        warnings.append(f"paired on the {len(common)} seeds both runs drew ({min(common)}-{max(common)}); "
                        f"run {longer}'s other {extra} seeds are left out of the tests")

    grouped_a, grouped_b = {}, {}  # each run's records by attribute, once (runs may hold thousands)
    for records, grouped in ((records_a, grouped_a), (records_b, grouped_b)):
        for r in records:
            grouped.setdefault(r["attribute"], []).append(r)

    def table(name):
        if not paired:
            return None
        return _paired_table(grouped_a.get(name, []), grouped_b.get(name, []))

    by_b = {a["name"]: a for a in report_b["attributes"]}
    rows = [_row(a["name"], a.get("prompt"), a, by_b[a["name"]], table(a["name"]))
            for a in report_a["attributes"] if a["name"] in by_b]
    missing = sorted(set(by_b) ^ {a["name"] for a in report_a["attributes"]})
    if missing:
        warnings.append(f"no finished items in one of the runs for: {_names(missing, 10)}")
    if not paired:
        warnings.append("unpaired: neither run's seeds are all among the other's, so each run's seeds are treated as "
                        "an independent sample; the same search.seed gives a paired, more powerful comparison")
    qs = bh_qvalues([r["p_value"] if r["p_value"] is not None else float("nan") for r in rows])
    for r, q in zip(rows, qs):
        r["q_value"] = _nan_to_none(q)
        r["significant"] = bool(r["q_value"] is not None and r["q_value"] < SIGNIFICANCE)
    rows.sort(key=lambda r: (r["p_value"] if r["p_value"] is not None else 2, -abs(r["difference"] or 0), r["name"]))
    null = _null_row(report_a, report_b, grouped_a.get(NULL_NAME, []), grouped_b.get(NULL_NAME, []),
                     common if paired else None)
    if null.get("no_test"):
        warnings.append(null["no_test"])
    return {
        "schema_version": SCHEMA_VERSION,
        "significance_level": SIGNIFICANCE,
        "difference": "B - A",
        "paired": paired,
        "test": ("exact two-sided McNemar test on seeds both runs finished; Newcombe's paired score interval"
                 if paired else "two-sided Fisher exact test (unpaired); Newcombe's hybrid score interval")
                + "; null row (K twins per seed): permutation test of per-seed flip shares, seed-clustered intervals",
        "run_a": _describe(report_a, path_a),
        "run_b": _describe(report_b, path_b),
        "domain": ((report_a["run"].get("config") or {}).get("prompts") or {}).get("domain"),
        "attributes": rows,
        "null": null,
        "warnings": warnings,
    }


def compare_runs(run_a, run_b) -> dict:
    """Load both run directories from their records (no models) and compare them."""
    from .report.aggregate import aggregate, load_run

    if Path(run_a).resolve() == Path(run_b).resolve():
        raise ZoomError(f"compare needs two different run directories; got {shown_path(run_a)} twice")
    loaded_a, loaded_b = load_run(run_a), load_run(run_b)
    return compare_reports(aggregate(*loaded_a), aggregate(*loaded_b), loaded_a[0], loaded_b[0], run_a, run_b)


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def compare_table(c: dict) -> str:
    lines = [f"A: {c['run_a']['path']}  (target {c['run_a']['target']}, {c['run_a']['samples']} seeds)",
             f"B: {c['run_b']['path']}  (target {c['run_b']['target']}, {c['run_b']['samples']} seeds)",
             f"{'paired by seed' if c['paired'] else 'unpaired'}: {c['test']}"]
    rows = [("attribute", "A flips/n", "A rate", "B flips/n", "B rate", "B-A [95% CI]", "p", "q", "sig")]
    for r in c["attributes"] + [dict(c["null"], q_value=None, significant=False)]:
        a, b = r["a"], r["b"]
        rows.append((printable(r["name"])[:28], f"{a['flips']}/{a['n']}", _fmt(a["flip_rate"]), f"{b['flips']}/{b['n']}",
                     _fmt(b["flip_rate"]),
                     f"{_fmt(r['difference'], '+.2f')} [{_fmt(r['diff_ci_low'], '+.2f')}, {_fmt(r['diff_ci_high'], '+.2f')}]",
                     format_p(r["p_value"]), format_p(r.get("q_value")),
                     "*" if r["significant"] else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    lines += table
    different = [r["name"] for r in c["attributes"] if r["significant"]]
    if different:
        lines.append(f"different (BH q < {c['significance_level']}): {', '.join(map(printable, different))}")
    else:
        lines.append(f"no attribute's flip rate differs significantly between A and B (BH q < {c['significance_level']})")
    lines += [f"warning: {printable(w)}" for w in c["warnings"]]
    return "\n".join(lines)
