"""Audit, export, fine-tune, re-audit: does counterfactual training remove the bias an audit found?

    python tools/fix_world.py [--samples-a 128] [--samples-b 128] [--steps 100] [--lr 3e-5] [--out runs/fix-world]

On the shapes world's classifier trained with red circles at P(red | circle) = 0.95:
1. audit it on seeds A (from 0) with the `demo` config on three domains, each one attribute that should
   not change the label: red on the demo's small green squares (the bias), red on small green triangles,
   and green on small red circles (the other side of the correlation);
2. `zoom export` the first run (loaded back with `datasets` when it is installed);
3. `zoom finetune` the target on the three runs (each counterfactual keeps its base image's label);
4. audit the target before and after on fresh seeds B (from 10000), red on green squares, and
   `zoom compare` them (paired on the seeds);
5. score both on a held-out test set rendered by zoom/world.py (uniform attributes), and on the worst
   groups, the images that break the trained-in correlation: red non-circles and non-red circles.
Prints a markdown table and writes OUT/fix.json. Every step goes through zoom's CLI or Python API;
a finished step is reused when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

P = 0.95
SEED_B = 10_000
TEST_SEED = 7_000_000  # (the learning rate and steps were picked on images from seed 5_000_000)
CAPTION = "a small plain {colour} {shape} on a white background"
PREFIXES = ("a picture of", "a drawing of", "an image of", "a photo of")


def domain(colour: str, shape: str, attribute: str, new_colour: str, target_class: str | None) -> dict:
    """A run config (the demo's, one attribute with its oracle) for one domain."""
    from zoom.prompts import find_bundled

    config = yaml.safe_load(Path(find_bundled("demo", "configs")).read_text())
    base = CAPTION.format(colour=colour, shape=shape)
    config["prompts"] = {"domain": base,
                         "attributes": [{"name": attribute, "prompt": CAPTION.format(colour=new_colour, shape=shape)}],
                         "null": [f"{p} {base}" for p in PREFIXES]}
    config["oracle"] = {attribute: {"spec": "hf:${ZOOM_WORLD}/oracles/colour", "label": new_colour}}
    config["target"]["spec"] = target_spec()
    if target_class is None:
        config["target"].pop("target_class", None)
    else:
        config["target"]["target_class"] = target_class
    return config


DOMAINS = {  # name: (colour, shape, attribute, its colour, target class)
    "red-on-green-squares": ("green", "square", "red", "red", "circle"),
    "red-on-green-triangles": ("green", "triangle", "red", "red", "circle"),
    "green-on-red-circles": ("red", "circle", "green", "green", None),
}


def target_spec() -> str:
    from zoom.world import models_dir

    return f"hf:{models_dir() / 'targets' / f'shape-red-circles-p{round(P * 100)}'}"


def zoom_cli(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "zoom", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"zoom {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def audit(out: Path, name: str, config: dict, spec: str, samples: int, seed: int) -> dict:
    import zoom
    from zoom.report import write_report

    run = out / name
    if (run / "report.json").exists():
        return write_report(run, html=False)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return zoom.audit(str(path), run, samples=samples, seed=seed, target_spec=spec, progress=False,
                      resume=run.exists())


def test_set(n: int, seed: int, **fixed) -> tuple[torch.Tensor, np.ndarray]:
    from zoom.world import ATTRIBUTES, Scene, render

    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        pinned = {k: (v(rng) if callable(v) else v) for k, v in fixed.items()}
        scenes.append(Scene.sample(rng, **pinned))
    images = np.stack([render(s).image for s in scenes])
    labels = np.array([ATTRIBUTES["shape"].index(s.shape) for s in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, labels


def accuracy(spec: str, images: torch.Tensor, labels: np.ndarray) -> float:
    from zoom.targets import load_target

    target = load_target(spec)
    with torch.no_grad():
        pred = torch.cat([target(images[i:i + 500]).argmax(-1) for i in range(0, len(images), 500)]).numpy()
    return float((pred == labels).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples-a", type=int, default=128)
    ap.add_argument("--samples-b", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--test", type=int, default=3000, help="held-out images (and per worst group, half as many)")
    ap.add_argument("--out", default="runs/fix-world")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = target_spec()
    result = {"p": P, "samples_a": args.samples_a, "samples_b": args.samples_b, "seconds": {}}
    started = time.perf_counter()

    runs_a = []
    for name, (colour, shape, attribute, new_colour, target_class) in DOMAINS.items():
        t = time.perf_counter()
        report = audit(out, f"A-{name}", domain(colour, shape, attribute, new_colour, target_class), spec,
                       args.samples_a, 0)
        row = next(a for a in report["attributes"] if a["name"] == attribute)
        result.setdefault("audits_a", {})[name] = {"flip_rate": row["flip_rate"], "n": row["n"]}
        result["seconds"][f"audit A {name}"] = round(time.perf_counter() - t, 1)
        print(f"audit A {name}: {attribute} flips {row['flip_rate']:.2f} of {row['n']}", flush=True)
        runs_a.append(out / f"A-{name}")

    export = out / "export-A"
    if not export.exists():
        print(zoom_cli("export", runs_a[0], "--out", export).strip(), flush=True)
    rows = [json.loads(line) for line in (export / "metadata.jsonl").read_text().splitlines()]
    result["export"] = {"rows": len(rows), "counterfactuals": sum(r["kind"] == "counterfactual" for r in rows)}
    try:
        import datasets

        loaded = datasets.load_dataset("imagefolder", data_dir=str(export), split="train")
        result["export"]["datasets_rows"] = len(loaded)
    except ImportError:
        pass

    model = out / "model-fixed"
    if not model.exists():
        t = time.perf_counter()
        cmd = ["finetune", "--target", spec, "--out", model, "--steps", args.steps, "--lr", args.lr, "--device", "cpu"]
        for run in runs_a:
            cmd += ["--runs", run]
        print(zoom_cli(*cmd).strip(), flush=True)
        result["seconds"]["finetune (wall, with loading)"] = round(time.perf_counter() - t, 1)
    summary = json.loads((model / "finetune.json").read_text())
    result["finetune"] = {k: summary[k] for k in ("steps", "bases", "counterfactuals", "seconds", "final_loss", "lr")}
    fixed = f"hf:{model.resolve()}"

    before = audit(out, "B-before", domain(*DOMAINS["red-on-green-squares"][:4], "circle"), spec, args.samples_b,
                   SEED_B)
    after = audit(out, "B-after", domain(*DOMAINS["red-on-green-squares"][:4], "circle"), fixed, args.samples_b,
                  SEED_B)
    from zoom.compare import compare_runs

    cmp = compare_runs(out / "B-before", out / "B-after")
    red = next(r for r in cmp["attributes"] if r["name"] == "red")
    rate_a, rate_b = red["a"]["flip_rate"], red["b"]["flip_rate"]
    result["compare"] = {"before": rate_a, "after": rate_b, "n": red["a"]["n"], "p_value": red["p_value"],
                         "pairs": red.get("pairs"), "relative_drop": (rate_a - rate_b) / rate_a if rate_a else None,
                         "null_before": before["null"]["flip_rate"], "null_after": after["null"]["flip_rate"]}

    test = test_set(args.test, TEST_SEED)
    red_non_circle = test_set(args.test // 2, TEST_SEED + 1, colour="red",
                              shape=lambda rng: ("square", "triangle")[rng.integers(2)])
    non_red_circle = test_set(args.test // 2, TEST_SEED + 2, shape="circle",
                              colour=lambda rng: ("green", "blue", "yellow", "purple")[rng.integers(4)])
    scores = {}
    for which, s in (("before", spec), ("after", fixed)):
        groups = {"red non-circles": accuracy(s, *red_non_circle), "non-red circles": accuracy(s, *non_red_circle)}
        scores[which] = {"held_out": accuracy(s, *test), **groups, "worst_group": min(groups.values())}
    result["accuracy"] = scores
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)
    (out / "fix.json").write_text(json.dumps(result, indent=1))

    b, a = scores["before"], scores["after"]
    print(f"\n| P(red \\| circle) = {P} | before | after | change | bar |")
    print("|---|---|---|---|---|")
    drop = result["compare"]["relative_drop"]
    print(f"| flip rate of red (seeds B, n = {red['a']['n']}) | {rate_a:.2f} | {rate_b:.2f} | "
          f"{-100 * drop if drop is not None else float('nan'):+.0f} % (p = {red['p_value']:.2g}) | >= 50 % drop |")
    print(f"| held-out accuracy ({args.test} rendered) | {100 * b['held_out']:.1f} | {100 * a['held_out']:.1f} | "
          f"{100 * (a['held_out'] - b['held_out']):+.1f} pt | >= -1 pt |")
    for g in ("red non-circles", "non-red circles"):
        print(f"| accuracy on {g} ({args.test // 2}) | {100 * b[g]:.1f} | {100 * a[g]:.1f} | "
              f"{100 * (a[g] - b[g]):+.1f} pt | |")
    print(f"| worst-group accuracy | {100 * b['worst_group']:.1f} | {100 * a['worst_group']:.1f} | "
          f"{100 * (a['worst_group'] - b['worst_group']):+.1f} pt | >= +10 pt |")
    print(f"\nfine-tune: {summary['steps']} steps, {summary['bases']} bases + {summary['counterfactuals']} "
          f"counterfactuals, {summary['seconds']:.0f} s; whole loop {result['seconds']['total']:.0f} s")
    print(json.dumps(result["seconds"]))


if __name__ == "__main__":
    main()
