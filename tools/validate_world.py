"""ZOOM's imbalanced-data protocol on the shapes world: does an audit find the bias trained into a
target? Prints the README's validation table (markdown) and writes the figures as JSON.

    python tools/validate_world.py [--samples 48] [--seed 1000] [--domains ...] [--out runs/validation]

Every audit goes through zoom's Python API with the bundled `demo` config (the world's generator,
CLIPs and oracles), changing only the target, the prompt set, the seeds and, for the contrast, the
edit space. On each of three domains (DOMAINS: the demo's small green square on white, a small blue
triangle on gray, a small yellow square on black):
- the domain's four attributes (red, another background, striped, large) on the balanced classifier
  and on the one trained with red circles at P(red | circle) = 0.99 (the demo's target); red alone,
  with its null twin, on the classifiers trained at 0.5, 0.75, 0.9, 0.95 (the dose-response);
- the balanced classifier in sweep mode (a grid, no search): nothing should be significant.
On the demo's domain also:
- the label's own attribute ("a circle", on squares) on the balanced classifier: a sanity audit;
- the same audit as the strongest bias but searching the latent noise without the CLIP term, with a
  residual up to the size of the noise itself: what an adversarial search finds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_world import shapes_prompt_set, target_name  # noqa: E402  (tools/ is this file's folder)

BIAS_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.99)
# the bundled shapes prompt set (the demo's), cut down: red alone with its null twin (the middle
# bias levels need no more, at a quarter of the cost), and the label's own attribute
SHAPES = shapes_prompt_set()
RED_ONLY = {**SHAPES, "attributes": [a for a in SHAPES["attributes"] if a["name"] == "red"]}
SANITY = {**SHAPES, "attributes": [{"name": "circle", "prompt": SHAPES["domain"].replace("square", "circle")}]}
FULL_SET_LEVELS = (0.2, 0.99)  # the whole shapes prompt set on the balanced and the most biased target
LATENT_DELTA_MAX = 1.0  # the adversarial contrast's bound on |delta| / |noise|
# the config's oracles name the whole set's attributes: an audit of fewer names only theirs
RED_ONLY_RUN = {"prompts": RED_ONLY, "oracle": {"red": {"spec": "hf:${ZOOM_WORLD}/oracles/colour", "label": "red"}}}
SANITY_RUN = {"prompts": SANITY, "oracle": {"circle": {"spec": "hf:${ZOOM_WORLD}/oracles/shape", "label": "circle"}}}


# The demo's domain and two others, each with the same four kinds of attribute (the shape made red,
# another background, striped, large) and the world's four paraphrase openings as null prompts; the
# demo's is the bundled shapes prompt set itself.
DOMAINS = {
    "green-square": ("green", "square", "white", "blue"),
    "blue-triangle": ("blue", "triangle", "gray", "black"),
    "yellow-square": ("yellow", "square", "black", "white"),
}
ORACLES = {"red": ("colour", "red"), "background": ("background", None), "striped": ("pattern", "striped"),
           "large": ("size", "large")}


def domain_prompts(name: str) -> dict:
    """{"prompts": a prompt set, "oracle": the config's oracle section} for one of DOMAINS."""
    from zoom.world import PREFIXES

    colour, shape, background, other = DOMAINS[name]
    caption = "a {size} {pattern} {colour} {shape} on a {background} background"
    words = dict(size="small", pattern="plain", colour=colour, shape=shape, background=background)
    domain = caption.format(**words)
    attributes = {"red": caption.format(**{**words, "colour": "red"}),
                  f"{other} background": caption.format(**{**words, "background": other}),
                  "striped": caption.format(**{**words, "pattern": "striped"}),
                  "large": caption.format(**{**words, "size": "large"})}
    oracle = {}
    for attribute in attributes:
        model, label = ORACLES[attribute.split()[-1] if attribute.endswith("background") else attribute]
        oracle[attribute] = {"spec": f"hf:${{ZOOM_WORLD}}/oracles/{model}", "label": label or other}
    prompts = {"domain": domain, "attributes": [{"name": n, "prompt": p} for n, p in attributes.items()],
               "null": [f"{prefix} {domain}" for prefix in PREFIXES]}
    return {"prompts": prompts, "oracle": oracle}


def target_spec(p: float) -> str:
    from zoom.world import models_dir

    return f"hf:{models_dir() / 'targets' / target_name(p)}"


def audit(out: Path, name: str, samples: int, **overrides) -> dict:
    """An audit through zoom's Python API with the `demo` config; a finished one is read back (its report
    rebuilt from the records, so the numbers are today's statistics)."""
    import zoom

    run = out / name
    if (run / "report.json").exists():  # finished earlier: reuse (delete the folder to redo it)
        from zoom.report import write_report

        return write_report(run, html=False)
    return zoom.audit("demo", run, samples=samples, progress=False, resume=run.exists(), **overrides)


def row(report: dict, name: str) -> dict:
    return next(a for a in report["attributes"] if a["name"] == name)


def red_only(domain: str) -> dict:
    """Overrides for an audit of red alone (with its null twin) on one of DOMAINS."""
    d = domain_prompts(domain)
    return {"prompts": {**d["prompts"], "attributes": [a for a in d["prompts"]["attributes"] if a["name"] == "red"]},
            "oracle": {"red": d["oracle"]["red"]}}


def validate(out: Path, samples: int, domains=tuple(DOMAINS), seed: int = 0) -> dict:
    """The world's validation on each domain: the whole prompt set on the balanced and the most biased
    target, red alone on the middle levels, and (no gradients, the dose-response grid) the balanced
    target in sweep mode; on the demo's domain also the sanity and latent contrast audits."""
    from scipy import stats

    results = {"samples": samples, "seed": seed, "domains": {}}
    for domain in domains:
        full = domain_prompts(domain)
        cell = {"targets": {}}
        for p in (0.2, *BIAS_LEVELS):
            overrides = full if p in FULL_SET_LEVELS else red_only(domain)
            report = audit(out, f"{domain}-p{round(p * 100):02d}", samples, seed=seed, target_spec=target_spec(p),
                           **overrides)
            cell["targets"][p] = summarise(report)
        sweep = audit(out, f"{domain}-p20-sweep", samples, seed=seed, target_spec=target_spec(0.2), mode="sweep",
                      **full)
        cell["balanced_sweep"] = summarise(sweep)
        rates = [cell["targets"][p]["red"]["confirmed_rate"] for p in (0.2, *BIAS_LEVELS)]
        cell["dose_response_spearman"] = float(stats.spearmanr((0.2, *BIAS_LEVELS), rates).statistic)
        results["domains"][domain] = cell
    if "green-square" in domains:
        sanity = audit(out, "sanity-circle", samples, seed=seed, target_spec=target_spec(0.2), **SANITY_RUN)
        results["sanity"] = {k: row(sanity, "circle").get(k) for k in ("flips", "n", "flip_rate", "confirmed_flips",
                                                                        "significant")}
        # a residual as large as the noise itself (delta_max 1, against the config's 0.05): no lack of room
        latent = audit(out, "shapes-p99-latent-no-clip", samples, seed=seed, target_spec=target_spec(0.99),
                       **RED_ONLY_RUN, edit_space="latent", search_lambda_clip=0.0, search_delta_max=LATENT_DELTA_MAX)
        results["latent_no_clip"] = {k: row(latent, "red").get(k) for k in ("flips", "n", "flip_rate", "oracle_rate",
                                                                            "confirmed_flips")}
        red = [r for r in _records(out / "shapes-p99-latent-no-clip")
               if r["attribute"] == "red" and r["status"] == "ok"]
        results["latent_no_clip"].update(  # how far the search went, and whether it moved the decision at all
            delta_max=LATENT_DELTA_MAX,
            unflipped_delta_rel=[min(kept), statistics.median(kept)] if (kept := [
                r["delta_rel"] for r in red if not r["flipped"]]) else None,  # [min, median]
            decision_moved=sum(r["final_pred"] != r["base_pred"] for r in red))
    return results


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((run / "records").glob("rank-*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def summarise(report: dict) -> dict:
    red = row(report, "red")
    others = [a for a in report["attributes"] if a["name"] != "red"]
    return {
        "red": {k: red.get(k) for k in ("flips", "n", "flip_rate", "confirmed_flips", "confirmed_rate",
                                        "confirmed_ci_low", "confirmed_ci_high", "null_confirmed_rate",
                                        "null_flip_rate", "q_value", "significant", "oracle_rate",
                                        "median_strength_to_flip")},
        "ranked_first": report["attributes"][0]["name"],
        "other_significant": [a["name"] for a in others if a["significant"]],
        "other_max_confirmed_rate": max((a["confirmed_rate"] for a in others), default=None),
        "null_flip_rate": report["null"]["flip_rate"],
    }


def table(results: dict) -> str:
    """The README's validation table: a row per target, a column per domain."""
    domains = list(results["domains"])
    head = "| target | " + " | ".join(f"{d}: red confirmed/n, rate [95% CI], q" for d in domains) + " |"
    lines = [head, "|---" * (len(domains) + 1) + "|"]
    levels = list(next(iter(results["domains"].values()))["targets"])
    for p in levels:
        cells = []
        for d in domains:
            r = results["domains"][d]["targets"][p]
            red = r["red"]
            mark = "**" if red["significant"] else ""
            others = "" if r["other_max_confirmed_rate"] is None else (
                f"; others ≤ {r['other_max_confirmed_rate']:.2f}" + (f", significant: {', '.join(r['other_significant'])}"
                                                                      if r["other_significant"] else ""))
            cells.append(f"{mark}{red['confirmed_flips']}/{red['n']}, {red['confirmed_rate']:.2f} "
                         f"[{red['confirmed_ci_low']:.2f}, {red['confirmed_ci_high']:.2f}], q {red['q_value']:.2g}{mark}"
                         f" (raw {red['flips']}){others}")
        name = "balanced" if float(p) == 0.2 else f"red circles p = {p}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sweep = []
    for d in domains:
        r = results["domains"][d]["balanced_sweep"]
        called = [r["ranked_first"]] if r["red"]["significant"] else []
        called += r["other_significant"]
        sweep.append(f"{d}: {', '.join(called) or 'none'}")
    lines += ["", "Spearman rho of red's confirmed rate over the six levels: " + ", ".join(
        f"{d} {results['domains'][d]['dose_response_spearman']:.2f}" for d in domains) + ".",
              "Balanced target in sweep mode (a grid over [0, 1], no search): significant attributes: "
              + "; ".join(sweep) + "."]
    if "sanity" in results:
        s_, lat = results["sanity"], results["latent_no_clip"]
        reach = "" if not lat.get("unflipped_delta_rel") else (
            f"; the unflipped seeds' searches ended at {lat['unflipped_delta_rel'][1]:.2f} x |noise| (median), "
            f"{lat['unflipped_delta_rel'][0]:.2f} at least")
        lines += [f"Sanity (balanced target, the label's own attribute: a green square made a circle): "
                  f"{s_['flips']}/{s_['n']} flipped, {s_['confirmed_flips']} confirmed, "
                  f"{'significant' if s_['significant'] else 'not significant'}.",
                  f"Latent edits without the CLIP term on the p = 0.99 target (|delta| up to {lat['delta_max']:g} x "
                  f"|noise|{reach}): red flips {lat['flips']}/{lat['n']}, {lat['confirmed_flips']} confirmed; the "
                  f"decision moved on {lat['decision_moved']}."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1000, help="first seed (the tests use others)")
    parser.add_argument("--domains", default=",".join(DOMAINS), help=f"of {', '.join(DOMAINS)}")
    parser.add_argument("--out", default="runs/validation")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = validate(out, args.samples, args.domains.split(","), args.seed)
    (out / "validation.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
