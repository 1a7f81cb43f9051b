"""Aggregate per-item records into report.json (schema_version 1, DESIGN §4)."""

from __future__ import annotations

import bisect
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
from ..stats import bh_qvalues, censored_quantiles, clustered_rate_interval, mcnemar_greater_p, wilson_interval

SCHEMA_VERSION = 1
SIGNIFICANCE = 0.05  # BH false discovery rate at which an attribute is called significant
CONFIRM_QUANTILE = 0.95  # a confirmed flip moves the judge toward the attribute more than 95% of null twins do
CSV_COLUMNS = ["name", "prompt", "n", "flips", "flip_rate", "ci_low", "ci_high", "null_flip_rate", "confirmed_flips",
               "confirmed_rate", "confirmed_ci_low", "confirmed_ci_high", "null_confirmed_rate", "pairs_n",
               "attribute_only", "null_only", "p_value", "q_value", "significant", "raw_p_value", "raw_q_value",
               "raw_significant", "median_strength_to_flip", "mean_prob_drop", "validity_rate", "validity_null_rate",
               "failed", "skipped"]


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
    # Strength to flip as right-censored data: an unflipped seed only says "more than it reached". A
    # bracketed flip lies in (strength_low, strength]: its interval's midpoint (the bracket is at most
    # search.tolerance wide), not its upper end, which would bias every quantile up.
    q25, q50, q75 = censored_quantiles(
        [_flip_point(r) for r in flips if r["strength"] is not None],
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
    fabricated = [r["fabricated"] for r in ok if isinstance(r.get("fabricated"), int)]
    if fabricated:  # detection: confident detections matching no base detection, apart from the flips
        out.update(fabricated=sum(fabricated), items_with_fabricated=sum(f > 0 for f in fabricated))
    shares = [r["share"] for r in ok if r.get("share") is not None]
    if shares:
        out["mean_share"] = statistics.fmean(shares)
    curves = _dose_response(ok)
    if curves is not None:
        out["dose_response"] = curves
    return out


def seed_shares(records: list[dict]) -> dict:
    """Per seed, (flips, finished items) of an arm with several items per seed (the pooled null row)."""
    by_seed = defaultdict(lambda: [0, 0])
    for r in records:
        if _is_ok(r):
            by_seed[r["seed"]][0] += bool(r["flipped"])
            by_seed[r["seed"]][1] += 1
    return dict(by_seed)


def seed_clustered(by_seed: dict) -> dict:
    """The pooled rate of per-seed (flips, items) with the seed as the unit: a seed's K null twins share
    its base image, so they are not K independent draws (a Wilson interval over them covers 82% / 57%
    at K = 4 / 10 when seeds differ)."""
    flips, items = [f for f, _ in by_seed.values()], [m for _, m in by_seed.values()]
    low, high, effective = clustered_rate_interval(flips, items)
    return {"seeds": len(by_seed), "flips": sum(flips), "n": sum(items), "effective_n": _num(effective),
            "ci_low": _num(low), "ci_high": _num(high)}


def _seed_clustered(records: list[dict]) -> dict:
    """The pooled null row's interval fields (seed_clustered), or nothing without a finished item."""
    by_seed = seed_shares(records)
    if not by_seed:
        return {}
    clustered = seed_clustered(by_seed)
    return {k: clustered[k] for k in ("seeds", "effective_n", "ci_low", "ci_high")}


def _flip_point(r: dict) -> float:
    low = r.get("strength_low")
    return r["strength"] if low is None or low >= r["strength"] else (low + r["strength"]) / 2


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


def _task_metrics(records: list[dict], task: str | None) -> dict:
    """Keypoints, segmentation, detection: what the records' `task` details add, over finished items
    (raw flips, not confirmed ones): the NME distribution; the IoU with the base mask and flips per
    audited class; lost / relabelled / fabricated detections, per base label."""
    import numpy as np

    details = [(r, r["task"]) for r in records if _is_ok(r) and isinstance(r.get("task"), dict)]
    if not details or task not in ("keypoints", "segmentation", "detection"):
        return {}
    if task == "keypoints":
        nme = [t["nme"] for _, t in details if t.get("nme") is not None]
        out = {"n": len(nme), "nme_median": _num(float(np.median(nme))) if nme else None,
               "nme_p90": _num(float(np.quantile(nme, 0.9))) if nme else None}
    elif task == "segmentation":
        scored = [(r, t) for r, t in details if t.get("iou") is not None]
        by_class = defaultdict(list)
        for r, t in scored:
            by_class[str(t.get("class_label", t.get("class")))].append((r["flipped"], t["iou"]))
        out = {"n": len(scored),
               "mean_iou_drop": _num(statistics.fmean(1 - t["iou"] for _, t in scored)) if scored else None,
               "per_class": {label: {"n": len(cell), "flips": sum(f for f, _ in cell),
                                     "flip_rate": sum(f for f, _ in cell) / len(cell),
                                     "mean_iou": statistics.fmean(iou for _, iou in cell)}
                             for label, cell in sorted(by_class.items(), key=lambda kv: (-len(kv[1]), kv[0]))}}
    else:
        per_label = defaultdict(lambda: {"n": 0, "lost": 0, "relabelled": 0})
        for _, t in details:
            for label, cell in (t.get("by_label") or {}).items():
                for key in ("n", "lost", "relabelled"):
                    per_label[label][key] += cell[key]
        out = {"n": len(details), "base_detections": sum(c["n"] for c in per_label.values()),
               **{key: sum(t.get(key) or 0 for _, t in details) for key in ("lost", "relabelled", "fabricated")},
               "per_label": {label: {**c, "flips": c["lost"] + c["relabelled"],
                                     "flip_rate": (c["lost"] + c["relabelled"]) / c["n"]}
                             for label, c in sorted(per_label.items(), key=lambda kv: (-kv[1]["n"], kv[0]))
                             if c["n"]}}
    return {"task_metrics": out}


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


def _matched_null(name: str, by_pair: dict) -> list[dict]:
    """The null items that control attribute `name`: its twins, or the shared null (joint mode), from
    the null records grouped by `pair` once (_null_by_pair: a run of thousands of attributes would
    otherwise scan every null record once per attribute)."""
    return by_pair.get(name) or by_pair.get(None, [])


def _null_by_pair(null_records: list[dict]) -> dict:
    by_pair = defaultdict(list)
    for r in null_records:
        pair = r.get("pair")
        if pair is None or isinstance(pair, str):  # any other value controls no attribute
            by_pair[pair].append(r)
    return by_pair


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


def _order_statistic(m: int) -> int:
    """The order statistic (1-based, of m null scores) used as the threshold: the smallest k whose
    exceedance probability by one more exchangeable score, (m - k + 1) / (m + 1), is at most
    1 - CONFIRM_QUANTILE; with fewer than 19 scores, the largest one."""
    return max(1, min(m, math.ceil(CONFIRM_QUANTILE * (m + 1))))


def confirm(attribute: list[dict], null: list[dict], prompt: str, name: str) -> tuple[list[dict], list[dict], list]:
    """The attribute's and its null control's records with `flipped` narrowed to *confirmed* flips, and
    the null twins' judge moves toward the attribute's text (what chance looks like to the judge).

    A flip is confirmed when the judge CLIP's score for the attribute's text moved further (from the
    base image to the counterfactual) than the null twins' moves toward the same text do, 95% of the
    time (an order statistic of them), and, where the run has an oracle for the
    attribute, the oracle sees it. Both arms of a seed are held to the same threshold, taken from the
    null twins of the *other* seeds (leave one seed out), so it favours neither arm.
    """
    def toward(r):  # the null twin's judge change toward this attribute's text
        return (r.get("judge_change_toward") or {}).get(prompt)

    scores = {r["seed"]: toward(r) for r in null if _is_ok(r) and toward(r) is not None}
    ranked = sorted(scores.values())  # sorted once: a seed's leave-one-out order statistic is read off it

    def threshold(seed) -> float:
        m = len(ranked) - (seed in scores)
        if not m:
            return 0.0
        k = _order_statistic(m) - 1  # 0-based, among the other seeds' scores
        if seed in scores and k >= bisect.bisect_left(ranked, scores[seed]):
            k += 1  # the seed's own score sits at or before position k: step over it
        return max(0.0, ranked[k])

    def narrowed(r, change, oracle) -> dict:
        confirmed = bool(_is_ok(r) and r["flipped"] and change is not None and change > threshold(r["seed"])
                         and oracle is not False)
        return {**r, "flipped": confirmed, "raw_flipped": r["flipped"]}

    confirmed_attribute = [narrowed(r, r.get("judge_change"), r.get("oracle")) for r in attribute]
    confirmed_null = [narrowed(r, toward(r), (r.get("oracle_toward") or {}).get(name)) for r in null]
    return confirmed_attribute, confirmed_null, list(scores.values())


def _paired_p(tables: list[dict]) -> list[float | None]:
    """Exact one-sided McNemar p per paired table; None (untestable) without a complete pair."""
    return [_num(mcnemar_greater_p(t["attribute_only"], t["null_only"]) if t["n"] else float("nan")) for t in tables]


def confirmation_p(confirmed: list[dict], null_moves: list) -> float:
    """One-sided Mann-Whitney test: does the judge move toward the attribute's text further in the
    attribute's flipped counterfactuals than in its null twins' images? Rank-based, so it needs no
    threshold; an edit the judge cannot see moves it like a null edit does."""
    from scipy import stats

    moves = [r["judge_change"] for r in confirmed if _is_ok(r) and r["raw_flipped"] and r.get("judge_change") is not None]
    if not moves or not null_moves:
        return 1.0
    return float(stats.mannwhitneyu(moves, null_moves, alternative="greater").pvalue)


def _test(raw_tables: list[dict], confirmed_tables: list[dict] | None = None,
          confirmation_ps: list[float] | None = None) -> list[tuple]:
    """(p, q, significant) per attribute, BH over attributes. With confirmed tables the p-value is an
    intersection-union test, the largest of three: the raw paired p (the attribute flips the target more
    often than its null), the confirmed paired p (so do its confirmed flips) and the confirmation p (its
    flips move the judge toward the attribute further than its null twins' edits do). So an attribute the
    judge sees that flips no more often than the null is not called, nor is one whose extra flips show no
    attribute; whichever of the three hypotheses holds, the error rate stays at the level."""
    ps = [float("nan") if p is None else p for p in _paired_p(raw_tables)]
    if confirmed_tables is not None:
        ps = [max(p, float("nan") if c is None else c, v)
              for p, c, v in zip(ps, _paired_p(confirmed_tables), confirmation_ps)]
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
    target = resolved_config.get("target")
    task = target.get("task") if isinstance(target, dict) else None
    null = {"name": NULL_NAME, "prompt": null_label, **_counts(null_records), **_seed_clustered(null_records),
            "per_class": _per_class(null_records), **_task_metrics(null_records, task)}

    prompts = {a["name"]: a["prompt"] for a in prompts_config["attributes"]}
    attributes, tables, raw_tables, matched, confirmed_nulls = [], [], [], [], {}
    null_by_pair = _null_by_pair(null_records)
    for name, rs in groups.items():
        nulls = _matched_null(name, null_by_pair)
        prompt = prompts.get(name, rs[0]["prompt"])
        confirmed_rs, confirmed_ns, null_moves = confirm(rs, nulls, prompt, name)
        raw_table, table = pair_outcomes(rs, nulls), pair_outcomes(confirmed_rs, confirmed_ns)
        counts = _counts(confirmed_rs)
        row = {"name": name, "prompt": prompt, "slug": rs[0]["slug"], **_counts(rs),
               "confirmed_flips": counts["flips"], "confirmed_rate": counts["flip_rate"],
               "confirmed_ci_low": counts["ci_low"], "confirmed_ci_high": counts["ci_high"],
               "pairs": raw_table, "confirmed_pairs": table,
               "null_flip_rate": _num((raw_table["both"] + raw_table["null_only"]) / raw_table["n"]
                                      if raw_table["n"] else None),
               "null_confirmed_rate": _num((table["both"] + table["null_only"]) / table["n"] if table["n"] else None),
               "validity_null_rate": _validity_baseline(rs, nulls, prompt), **_oracle(rs, nulls, name),
               "per_class": _per_class(rs), **_task_metrics(rs, task), **_extrapolated(rs, resolved_config)}
        attributes.append(row)
        tables.append(table)
        raw_tables.append(raw_table)
        matched.append((confirmed_rs, confirmed_ns, null_moves))
        for r in confirmed_ns:  # joint mode's null slot stands in for every attribute: confirmed toward any
            confirmed_nulls[r["key"]] = r if r["flipped"] or r["key"] not in confirmed_nulls else confirmed_nulls[r["key"]]
    confirmation = [confirmation_p(rs, moves) for rs, _, moves in matched]
    for row, (p, q, sig), (raw_p, raw_q, raw_sig), confirmed_p, confirmation_pv in zip(
            attributes, _test(raw_tables, tables, confirmation), _test(raw_tables), _paired_p(tables), confirmation):
        row.update(p_value=p, q_value=q, significant=sig, testable=p is not None,
                   raw_p_value=raw_p, raw_q_value=raw_q, raw_significant=raw_sig, confirmed_p_value=confirmed_p,
                   confirmation_p_value=confirmation_pv)
    attributes.sort(key=lambda a: (-(a["confirmed_rate"] or 0), a["p_value"] if a["p_value"] is not None else 2,
                                   -(a["flip_rate"] or 0), a["name"]))
    if null_records:
        confirmed_null_records = list(confirmed_nulls.values()) or [{**r, "flipped": False} for r in null_records]
        counts, clustered = _counts(confirmed_null_records), _seed_clustered(confirmed_null_records)
        null.update(confirmed_flips=counts["flips"], confirmed_rate=counts["flip_rate"],
                    confirmed_ci_low=clustered.get("ci_low", counts["ci_low"]),
                    confirmed_ci_high=clustered.get("ci_high", counts["ci_high"]))

    ok = [r for r in records if _is_ok(r)]
    cost = {
        "counterfactuals": len(records),
        "seconds_per_counterfactual": _num(statistics.median(r["seconds"] for r in ok) if ok else None),
        "unet_calls_per_counterfactual": _num(statistics.median(r["unet_calls"] for r in ok) if ok else None),
        "steps_per_counterfactual": _num(statistics.median(r["steps"] for r in ok) if ok else None),
        "peak_memory_bytes": _over_ranks(rank_meta, "peak_memory_bytes"),
        "memory_kind": rank_meta[0]["memory_kind"] if rank_meta else None,
    }
    end = _over_ranks(rank_meta, "end_time")
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
        "test": "on the seeds where the attribute and its null control both finished, exact one-sided McNemar tests "
                "of flips (raw_p_value) and of confirmed flips (confirmed_p_value), and a one-sided Mann-Whitney test of "
                "the judge's move toward the attribute in its flips against the null twins' (confirmation_p_value); "
                "p_value is the largest of the three (intersection-union), Benjamini-Hochberg over attributes",
        "confirmation": f"a flip is confirmed when the judge CLIP moves toward the attribute's text by more than "
                        f"{CONFIRM_QUANTILE:.0%} of the null twins' moves toward it on the other seeds, and the "
                        "attribute's oracle (where configured) sees it",
        "flip_definition": _flip_definition(resolved_config),
        "strength_limit": _strength_limit(resolved_config),
        "failures": _failure_sensitivity(attributes, matched, records),
        "null": null,
        "attributes": attributes,
    }


def _over_ranks(rank_meta: list[dict], key: str):
    """The largest (latest) value of a rank meta field over the ranks; None (unknown) when any rank's is null
    (zoom writes them all when a rank finishes, so a null one means that rank's is not known, nor the run's)."""
    values = [m[key] for m in rank_meta]
    if not values or any(v is None for v in values):
        return None
    if key == "end_time":  # ISO times with their offsets (rundir checks): compared as times, not as text
        import datetime as dt

        return max(values, key=dt.datetime.fromisoformat)
    return max(values)


def _flip_definition(config: dict) -> str:
    """What "flipped" means for the run's task (fixed by its config before the run)."""
    from ..tasks import describe_task

    target = config.get("target") if isinstance(config.get("target"), dict) else {}
    return describe_task(target)


def _extrapolated(records: list[dict], config: dict) -> dict:
    """With alpha_max > 1 a flip past alpha = 1 (the attribute's own caption) is an extrapolated edit."""
    search = config.get("search") or {}
    if search.get("edit_space", "text") == "latent" or not (search.get("alpha_max") or 0) > 1:
        return {}
    return {"extrapolated_flips": sum(1 for r in records if _is_ok(r) and r["flipped"]
                                      and (r.get("strength") or 0) > 1 + 1e-9)}


def _failure_sensitivity(attributes: list[dict], matched: list, records: list[dict]) -> dict:
    """How the significant set would read if every failed item had flipped, or none had."""
    failed = sum(_is_failed(r) for r in records)
    out = {"failed": failed, "skipped": sum(not _is_ok(r) and not _is_failed(r) for r in records)}
    if not failed:
        return out
    by_name = {rs[0]["attribute"]: (rs, nulls, moves) for rs, nulls, moves in matched}
    for key, value in (("significant_if_failed_flipped", True), ("significant_if_failed_not_flipped", False)):
        arms = [by_name[a["name"]] for a in attributes]
        confirmed = [pair_outcomes(rs, nulls, impute_failed=value) for rs, nulls, _ in arms]
        raw = [pair_outcomes(*[[{**r, "flipped": r["raw_flipped"]} for r in side] for side in (rs, nulls)],
                             impute_failed=value) for rs, nulls, _ in arms]
        confirmation = [confirmation_p(rs, moves) for rs, _, moves in arms]
        out[key] = [a["name"] for a, (_, _, sig) in zip(attributes, _test(raw, confirmed, confirmation)) if sig]
    for a in attributes:
        a["gate_if_failed"] = _gate_if_failed(*by_name[a["name"]])
    return out


def _gate_if_failed(confirmed: list[dict], nulls: list[dict], moves: list) -> dict | None:
    """The numbers `zoom check` gates on when items failed: a failed attribute item counts as a flip (a
    model that fails on the edited image is not robust to the edit), a failed null item as none."""
    failed = sum(_is_failed(r) for r in confirmed)
    if not failed and not any(_is_failed(r) for r in nulls):
        return None

    def imputed(rs, value):
        return [{**r, "status": "ok", "flipped": value, "raw_flipped": value} if _is_failed(r) else r for r in rs]

    rs, ns = imputed(confirmed, True), imputed(nulls, False)
    table = pair_outcomes(rs, ns)
    raw_table = pair_outcomes(*[[{**r, "flipped": r["raw_flipped"]} for r in side] for side in (rs, ns)])
    raw_p, confirmed_p = _paired_p([raw_table, table])
    ok = [r for r in rs if _is_ok(r)]
    return {"failed": failed, "n": len(ok), "flips": sum(r["flipped"] for r in ok),
            "raw_flips": sum(r["raw_flipped"] for r in ok), "raw_p_value": raw_p,
            "p_value": None if raw_p is None or confirmed_p is None else
            max(raw_p, confirmed_p, confirmation_p(confirmed, moves))}


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
    """The terminal table: raw flips beside confirmed ones; the rate, null, p, q and significance columns
    are about confirmed flips (the report's headline)."""
    limit = report.get("strength_limit")
    oracle = any("oracle_rate" in a for a in report["attributes"])
    rows = [("attribute", "flips/n", "confirmed", "confirmed rate [95% CI]", "null", "p", "q", "sig", "strength",
             "validity") + (("oracle",) if oracle else ())]
    for a in report["attributes"] + [report["null"]]:
        is_null = a is report["null"]
        ci = f"{_fmt(a.get('confirmed_rate'))} [{_fmt(a.get('confirmed_ci_low'))}, {_fmt(a.get('confirmed_ci_high'))}]"
        sig = "" if is_null else ("*" if a.get("significant") else ("untestable" if not a.get("testable", True) else ""))
        validity = _fmt(a.get("validity_rate"))
        if a.get("validity_null_rate") is not None:
            validity += f" ({_fmt(a['validity_null_rate'])})"
        confirmed = a.get("confirmed_flips")
        row = (printable(a["name"])[:28], f"{a['flips']}/{a['n']}", "-" if confirmed is None else str(confirmed), ci,
               "" if is_null else _fmt(a.get("null_confirmed_rate")),
               "" if is_null else format_p(a.get("p_value")), "" if is_null else format_p(a.get("q_value")),
               sig, format_strength(a, limit), "" if is_null else validity)
        if oracle:
            row += ("" if "oracle_rate" not in a else f"{_fmt(a['oracle_rate'])} ({_fmt(a.get('oracle_null_rate'))})",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("confirmed: flips in which the judge CLIP (and the oracle, where configured) sees the attribute; "
                 "rate, null, p, q and sig are about confirmed flips")
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
