"""Does the search find the flips that are there? Each search mode against a dense grid, on the world.

    python tools/recall.py [--samples 16] [--targets 0.2,0.99] [--domains all] [--out runs/recall]

For every (target, domain) it audits the same seeds and attributes four ways through zoom's Python
API with the bundled `demo` config (the world's generator, CLIPs and oracles):
- `dense`: the sweep on 41 points of [0, 1] (step 0.025): the reference, the flips that are there;
- `single`: the default bracketing search (coarse grid, then bisection to `search.tolerance`);
- `joint`: every attribute's weight (and the null slot's) at once, gradients from the brackets' start.
Recall of single mode = the share of the items (seed, attribute or null twin) that the dense grid
flips which the bracket flips too; its strength error is measured against the dense grid's first
flip, whose true value lies within one grid step (0.025) below it. Joint mode's recall is the share
of the seeds some attribute flips in single mode that the joint search flips. Prints a markdown
table and writes recall.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate_world import DOMAINS, domain_prompts, target_spec  # noqa: E402

DENSE_POINTS = 41  # 0, 0.025, ..., 1.0
DENSE_STEP = 1.0 / (DENSE_POINTS - 1)


def audit(out: Path, name: str, samples: int, seed: int, **overrides) -> tuple[dict, list[dict]]:
    import zoom
    from zoom.rundir import read_records

    run = out / name
    if (run / "report.json").exists():
        report = json.loads((run / "report.json").read_text())
    else:
        report = zoom.audit("demo", run, samples=samples, seed=seed, progress=False, resume=run.exists(), **overrides)
    return report, read_records(run)


def compare(dense: list[dict], single: list[dict], joint: list[dict], tolerance: float) -> dict:
    ok = lambda rs: {r["key"]: r for r in rs if r["status"] == "ok"}  # noqa: E731
    d, s = ok(dense), ok(single)
    keys = sorted(set(d) & set(s))
    there = [k for k in keys if d[k]["flipped"]]
    found = [k for k in there if s[k]["flipped"]]
    extra = [k for k in keys if s[k]["flipped"] and not d[k]["flipped"]]
    # the dense grid's first flip is exact to one step: the truth lies in (strength - step, strength]
    errors = [max(0.0, s[k]["strength"] - d[k]["strength"], d[k]["strength"] - DENSE_STEP - s[k]["strength"])
              for k in found]
    within = [e <= tolerance + 1e-9 for e in errors]
    non_monotone = [k for k in there if d[k].get("monotone") is False]
    single_seeds = {r["seed"] for r in single if r["status"] == "ok" and r["flipped"] and r["attribute"] != "null"}
    joint_seeds = {r["seed"] for r in joint if r["status"] == "ok" and r.get("any_flip")}
    per_item = lambda rs, key: statistics.median(r[key] for r in rs if r["status"] == "ok")  # noqa: E731
    return {
        "items": len(keys), "dense_flips": len(there), "single_found": len(found), "single_extra": len(extra),
        "single_recall": len(found) / len(there) if there else None,
        "strength_error_median": statistics.median(errors) if errors else None,
        "strength_error_max": max(errors) if errors else None,
        "strength_within_tolerance": sum(within) / len(within) if within else None,
        "dense_non_monotone": len(non_monotone),
        "single_flipped_seeds": len(single_seeds), "joint_found_of_those": len(single_seeds & joint_seeds),
        "joint_recall": len(single_seeds & joint_seeds) / len(single_seeds) if single_seeds else None,
        "joint_extra_seeds": len(joint_seeds - single_seeds),
        "unet_calls_per_item": {"dense": per_item(dense, "unet_calls"), "single": per_item(single, "unet_calls"),
                                "joint": per_item(joint, "unet_calls")},
        "seconds_per_item": {"dense": per_item(dense, "seconds"), "single": per_item(single, "seconds"),
                             "joint": per_item(joint, "seconds")},
    }


def measure(out: Path, samples: int, seed: int, targets, domains) -> dict:
    from zoom.config import SearchConfig

    tolerance = SearchConfig().tolerance
    results = {"samples": samples, "seed": seed, "tolerance": tolerance, "cells": []}
    for p in targets:
        for domain in domains:
            prompts = domain_prompts(domain)
            name = f"{domain}-p{round(p * 100):02d}"
            common = dict(target_spec=target_spec(p), prompts=prompts["prompts"], oracle=prompts["oracle"])
            _, dense = audit(out, f"{name}-dense", samples, seed, mode="sweep", search_sweep_points=DENSE_POINTS,
                             **common)
            _, single = audit(out, f"{name}-single", samples, seed, mode="single", **common)
            _, joint = audit(out, f"{name}-joint", samples, seed, mode="joint", **common)
            cell = {"target": p, "domain": domain, **compare(dense, single, joint, tolerance)}
            results["cells"].append(cell)
            print(json.dumps(cell), flush=True)
    return results


def table(results: dict) -> str:
    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    lines = ["| target | domain | dense flips | single recall | strength error (median / max) | joint recall "
             "(of single's seeds) | UNet calls per item: dense / single / joint |", "|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        name = "balanced" if c["target"] == 0.2 else f"p = {c['target']}"
        calls = c["unet_calls_per_item"]
        lines.append(f"| {name} | {c['domain']} | {c['dense_flips']}/{c['items']} | "
                     f"{c['single_found']}/{c['dense_flips']} ({f(c['single_recall'])}) | "
                     f"{f(c['strength_error_median'], '.3f')} / {f(c['strength_error_max'], '.3f')} | "
                     f"{c['joint_found_of_those']}/{c['single_flipped_seeds']} ({f(c['joint_recall'])}) | "
                     f"{calls['dense']:g} / {calls['single']:g} / {calls['joint']:g} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--targets", default="0.2,0.99", help="bias levels, 0.2 = the balanced target")
    parser.add_argument("--domains", default=",".join(DOMAINS), help=f"of {', '.join(DOMAINS)}")
    parser.add_argument("--out", default="runs/recall")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = measure(out, args.samples, args.seed, [float(t) for t in args.targets.split(",")],
                      args.domains.split(","))
    (out / "recall.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
