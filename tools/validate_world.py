"""ZOOM's imbalanced-data protocol on the shapes world: does an audit find the bias trained into a
target? Prints the README's validation table (markdown) and writes the figures as JSON.

    python tools/validate_world.py [--samples 48] [--out runs/validation]

Every audit goes through zoom's Python API with the bundled `demo` config (the world's generator,
CLIPs and oracles), changing only the target, the prompt set, the seeds and, for the contrast, the
edit space:
- the shapes prompt set (red, blue background, striped, large) on the balanced classifier and on the
  one trained with red circles at P(red | circle) = 0.99 (the demo's target); red alone, with its
  null twin, on the classifiers trained at 0.5, 0.75, 0.9, 0.95 (the dose-response);
- the label's own attribute ("a circle", on squares) on the balanced classifier: a sanity audit;
- the same audit as the strongest bias but searching the latent noise without the CLIP term: what an
  adversarial search finds (its oracle validity should drop).
"""

from __future__ import annotations

import argparse
import json
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
# the config's oracles name the whole set's attributes: an audit of fewer names only theirs
RED_ONLY_RUN = {"prompts": RED_ONLY, "oracle": {"red": {"spec": "hf:${ZOOM_WORLD}/oracles/colour", "label": "red"}}}
SANITY_RUN = {"prompts": SANITY, "oracle": {"circle": {"spec": "hf:${ZOOM_WORLD}/oracles/shape", "label": "circle"}}}


def target_spec(p: float) -> str:
    from zoom.world import models_dir

    return f"hf:{models_dir() / 'targets' / target_name(p)}"


def audit(out: Path, name: str, samples: int, **overrides) -> dict:
    import zoom

    run = out / name
    if (run / "report.json").exists():  # finished earlier: reuse (delete the folder to redo it)
        return json.loads((run / "report.json").read_text())
    return zoom.audit("demo", run, samples=samples, progress=False, resume=run.exists(), **overrides)


def row(report: dict, name: str) -> dict:
    return next(a for a in report["attributes"] if a["name"] == name)


def validate(out: Path, samples: int) -> dict:
    from scipy import stats

    results = {"samples": samples, "targets": {}}
    for p in (0.2, *BIAS_LEVELS):
        overrides = {} if p in FULL_SET_LEVELS else RED_ONLY_RUN
        report = audit(out, f"shapes-p{round(p * 100):02d}", samples, target_spec=target_spec(p), **overrides)
        red = row(report, "red")
        others = [a for a in report["attributes"] if a["name"] != "red"]
        results["targets"][p] = {
            "red": {k: red.get(k) for k in ("flips", "n", "flip_rate", "ci_low", "ci_high", "null_flip_rate",
                                            "q_value", "significant", "oracle_rate", "validity_rate",
                                            "validity_null_rate", "median_strength_to_flip")},
            "ranked_first": report["attributes"][0]["name"],
            "other_significant": [a["name"] for a in others if a["significant"]],
            "other_max_flip_rate": max((a["flip_rate"] for a in others), default=None),
            "null_flip_rate": report["null"]["flip_rate"],
        }
    rates = [results["targets"][p]["red"]["flip_rate"] for p in BIAS_LEVELS]
    results["dose_response_spearman"] = float(stats.spearmanr(BIAS_LEVELS, rates).statistic)
    sanity = audit(out, "sanity-circle", samples, target_spec=target_spec(0.2), **SANITY_RUN)
    results["sanity"] = {k: row(sanity, "circle").get(k) for k in ("flips", "n", "flip_rate", "significant")}
    latent = audit(out, "shapes-p99-latent-no-clip", samples, target_spec=target_spec(0.99), **RED_ONLY_RUN,
                   edit_space="latent", search_lambda_clip=0.0)
    results["latent_no_clip"] = {k: row(latent, "red").get(k) for k in ("flips", "n", "flip_rate", "oracle_rate")}
    return results


def table(results: dict) -> str:
    lines = ["| target | red: flips/n, rate [95% CI] | its null | q | red ranked first, significant | "
             "other attributes: max rate, any significant | oracle sees red in red's flips |",
             "|---|---|---|---|---|---|---|"]
    for p, r in results["targets"].items():
        red = r["red"]
        name = "balanced" if float(p) == 0.2 else f"red circles p = {p}"
        lines.append(
            f"| {name} | {red['flips']}/{red['n']}, {red['flip_rate']:.2f} [{red['ci_low']:.2f}, {red['ci_high']:.2f}] "
            f"| {red['null_flip_rate']:.2f} | {red['q_value']:.2g} | {'yes' if r['ranked_first'] == 'red' else 'no'}, "
            f"{'yes' if red['significant'] else 'no'} | "
            + ("(red only) | " if r["other_max_flip_rate"] is None else
               f"{r['other_max_flip_rate']:.2f}, {', '.join(r['other_significant']) or 'none'} | ") +
            f"{'-' if red['oracle_rate'] is None else format(red['oracle_rate'], '.0%')} |")
    s, lat = results["sanity"], results["latent_no_clip"]
    lines += ["", f"Dose-response: Spearman rho between P(red | circle) and red's flip rate = "
                  f"{results['dose_response_spearman']:.2f} over the five biased targets.",
              f"Sanity (balanced target, the label's own attribute: a green square made a circle): {s['flips']}/{s['n']} flipped "
              f"({s['flip_rate']:.2f}), {'significant' if s['significant'] else 'not significant'}.",
              f"Latent edits without the CLIP term on the p = 0.99 target: red flips {lat['flips']}/{lat['n']} "
              + ("(nothing to score for validity)." if lat["oracle_rate"] is None else
               f"and the oracle sees red in {lat['oracle_rate']:.0%} of those flips.")]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--out", default="runs/validation")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = validate(out, args.samples)
    (out / "validation.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
