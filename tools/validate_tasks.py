"""The world's structured-task targets under audit: is each planted defect found? Prints the README's
task validation table (markdown).

    python tools/validate_tasks.py [--samples 32] [--seed 1000] [--tasks ...] [--out runs/validation-tasks]

Every audit is the `demo` config (the world's generator, CLIPs and oracles) with the target replaced by
one of zoom/data/world/tasks (tools/train_world_tasks.py) and its task, on the three domains of
tools/validate_world.py with their four attributes (red, another background, striped, large). "large"
is causal for every task (a larger shape has another mask, box and extreme points). The planted
defects: segmentation-misses-striped: "striped"; detection-loses-small-red: "red" (every domain is
small); keypoints-black-shifted (annotated 6 px to the right on black): "black background" on the
blue triangle on gray, "white background" on the yellow square on black, none on the green square.
Per task and domain: the biased and the unbiased model's audits, and `zoom compare` of the two on the
same seeds (what the defect adds to what the edit itself changes). The generator does not keep a
shape's geometry under every edit (a blue triangle made black-backgrounded often becomes a square), so
each significant attribute is shown with how many of its flips the world's shape oracle reads as
another shape than the base image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate_world import DOMAINS, domain_prompts  # noqa: E402

CAUSAL = "large"
MODELS = {  # task -> (unbiased, biased, {domain: the attribute the defect should flip, or None})
    "segmentation": ("segmentation", "segmentation-misses-striped", dict.fromkeys(DOMAINS, "striped")),
    "detection": ("detection", "detection-loses-small-red", dict.fromkeys(DOMAINS, "red")),
    "keypoints": ("keypoints", "keypoints-black-shifted",
                  {"green-square": None, "blue-triangle": "black background", "yellow-square": "white background"}),
}


def task_audit(out: Path, task: str, model: str, domain: str, samples: int, seed: int) -> dict:
    """The demo config with its whole target section replaced (the demo's target_class is a classifier's);
    a finished audit is read back, its report rebuilt from the records."""
    import zoom
    from zoom.config import load_config
    from zoom.report import write_report
    from zoom.world import models_dir

    run = out / f"{model}-{domain}"
    if (run / "report.json").exists():
        return write_report(run, html=False)
    d = domain_prompts(domain)
    config = load_config("demo", {"target": {"spec": f"hf:{models_dir() / 'tasks' / model}", "task": task},
                                  "prompts": d["prompts"], "oracle": d["oracle"], "search.samples": samples,
                                  "search.seed": seed})
    return zoom.audit(config, run, progress=False, resume=run.exists())


def shape_changes(run: Path) -> dict:
    """Per attribute: of its raw flips, how many counterfactuals the world's shape oracle reads as another
    shape than their base image. The generator sometimes changes the shape with another attribute (a
    blue triangle made a square by a black background); such a flip is the scene's, not the model's."""
    import numpy as np
    import torch
    from PIL import Image

    from zoom.rundir import read_records
    from zoom.targets import load_target
    from zoom.world import models_dir

    flips = [r for r in read_records(run) if r["flipped"] and r["status"] == "ok"]
    if not flips:
        return {}
    oracle = load_target(f"hf:{models_dir() / 'oracles' / 'shape'}")

    def shapes(key):
        images = [np.array(Image.open(run / r[key]).convert("RGB")) for r in flips]
        with torch.no_grad():
            return oracle(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255).argmax(1)

    changed = (shapes("base_image") != shapes("counterfactual_image")).tolist()
    out = {}
    for r, c in zip(flips, changed):
        entry = out.setdefault(r["attribute"], [0, 0])  # (the null twins pooled under "null")
        entry[0] += int(c)
        entry[1] += 1
    return out


def summarise(report: dict, planted: str | None, run: Path) -> dict:
    rows = {a["name"]: a for a in report["attributes"]}
    non_causal = [a for a in report["attributes"] if a["name"] != CAUSAL]  # the report's order: most sensitive first
    keep = ("flips", "n", "confirmed_flips", "confirmed_rate", "null_confirmed_rate", "q_value", "significant")
    return {
        "attributes": {n: {k: a.get(k) for k in keep} for n, a in rows.items()},
        "first_non_causal": non_causal[0]["name"] if non_causal else None,
        "order": [a["name"] for a in report["attributes"]],
        "significant": [a["name"] for a in report["attributes"] if a["significant"]],
        "planted": planted,
        "shape_changed_of_flips": shape_changes(run),
        "null_flip_rate": report["null"]["flip_rate"],
        "seconds_per_counterfactual": report.get("cost", {}).get("seconds_per_counterfactual"),
    }


def compared(out: Path, unbiased: str, biased: str, domain: str) -> list[str]:
    """The attributes whose raw flip rate is significantly higher on the biased model than on the
    unbiased one, the same seeds paired (`zoom compare`): what the defect adds to the scene's own changes."""
    from zoom.compare import compare_runs

    c = compare_runs(out / f"{unbiased}-{domain}", out / f"{biased}-{domain}")
    return [r["name"] for r in c["attributes"] if r["significant"] and (r["difference"] or 0) > 0]


def validate(out: Path, samples: int, seed: int, tasks=tuple(MODELS)) -> dict:
    results = {"samples": samples, "seed": seed, "tasks": {}}
    for task in tasks:
        unbiased, biased, planted = MODELS[task]
        cells = {}
        for domain in DOMAINS:
            cell = {}
            for role, model in (("biased", biased), ("unbiased", unbiased)):
                start = time.time()
                report = task_audit(out, task, model, domain, samples, seed)
                cell[role] = summarise(report, planted[domain] if role == "biased" else None, out / f"{model}-{domain}")
                cell[role]["wall_seconds"] = round(time.time() - start, 1)
            cell["biased_above_unbiased"] = compared(out, unbiased, biased, domain)
            cells[domain] = cell
        results["tasks"][task] = cells
    return results


def table(results: dict) -> str:
    lines = ["| task | domain | planted attribute | biased: planted confirmed/n, rank among non-causal, "
             "significant | unbiased: significant | biased above unbiased (paired) |", "|---|---|---|---|---|---|"]

    def significant(c):
        changed = c["shape_changed_of_flips"]  # flips whose shape the shape oracle sees changed
        return ", ".join(f"{n} ({changed.get(n, [0, 0])[0]}/{changed.get(n, [0, 0])[1]} reshaped)"
                         for n in c["significant"]) or "none"

    for task, cells in results["tasks"].items():
        for domain, cell in cells.items():
            b, u = cell["biased"], cell["unbiased"]
            p = b["planted"]
            if p is None:
                planted = "—"
            else:
                a = b["attributes"][p]
                order = [n for n in b["order"] if n != CAUSAL]
                planted = f"{a['confirmed_flips']}/{a['n']}, {order.index(p) + 1} of {len(order)}"
            lines.append(f"| {task} | {domain} | {p or 'none on this domain'} | {planted}; {significant(b)} | "
                         f"{significant(u)} | {', '.join(cell['biased_above_unbiased']) or 'none'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1000, help="first seed (the tests use others)")
    parser.add_argument("--out", default="runs/validation-tasks")
    parser.add_argument("--tasks", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = validate(out, args.samples, args.seed, args.tasks.split(","))
    (out / "validation.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
