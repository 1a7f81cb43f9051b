"""Targets whose true sensitivity is known by construction, for tests of the statistics end to end.

They are built from the generator's behaviour as the diffusers pipeline itself shows it, not from
zoom's internals: on calibration seeds (disjoint from the audits'), render the domain prompt and each
prompt's edited conditioning with StableDiffusionPipeline, take every prompt's mean image change, and
read the image out along

- planted: attribute A's mean change with every other prompt's mean change projected out, so only A
  moves the readout on average (the tiny random models change images in correlated ways, cosines up
  to ~0.7 between unrelated prompts, hence the projection);
- blind: a random direction orthogonal to every prompt's mean change, so no attribute moves it.

The readout is zoom.targets.DirectionReadout: two classes, logits [0, k (s - tau)].

The tiny judge CLIP is random: it cannot see a smile, so confirmation means nothing on these models
and the tests built on these audits read the raw flips (`raw_significant`, `zoom check --raw`).
Confirmed flips are tested where a judge can see: on the shapes world (test_world_audits.py,
test_search.py) and by simulation (test_calibration.py).
"""

import torch

from zoom.targets import DirectionReadout

DOMAIN = "a photo of a person's face"
PROMPTS = {
    "eyeglasses": "a photo of a person's face wearing eyeglasses",
    "smile": "a photo of a smiling person's face",
    "beard": "a photo of a person's face with a beard",
    "hat": "a photo of a person's face wearing a hat",
    "null": "a picture of a person's face",
}  # the attributes and null of configs/tiny.yaml
PLANTED = "smile"
CALIBRATION_SEEDS = range(1000, 1032)


def calibrate(sd_folder):
    """(base images [N, P], {name: mean image change [P]}) from the diffusers pipeline itself."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    embed = {p: pipe.encode_prompt(p, "cpu", 1, False)[0] for p in [DOMAIN, *PROMPTS.values()]}

    def render(embeds):
        n = len(CALIBRATION_SEEDS)
        return pipe(prompt_embeds=embeds.expand(n, -1, -1), num_inference_steps=1, guidance_scale=0.0,
                    generator=[torch.Generator().manual_seed(s) for s in CALIBRATION_SEEDS], output_type="pt").images

    base = render(embed[DOMAIN])
    changes = {name: (render(embed[DOMAIN] + 1.5 * (embed[p] - embed[DOMAIN])) - base).mean(0).flatten()
               for name, p in PROMPTS.items()}
    return base.flatten(1), changes


def _orthogonal_part(vector, others):
    q, _ = torch.linalg.qr(torch.stack(others).T)
    residual = vector - q @ (q.T @ vector)
    return residual / residual.norm()


def _readout(base, direction, tau_in_spreads):
    center = base.mean(0)
    spread = float(((base - center) @ direction).std())
    return DirectionReadout(direction, center, tau=tau_in_spreads * spread, scale=4.0 / spread)


def planted_readout(calibration, attribute=PLANTED):
    """Flips only when pushed along `attribute`: most base images sit 2 spreads below the boundary."""
    base, changes = calibration
    direction = _orthogonal_part(changes[attribute], [v for k, v in changes.items() if k != attribute])
    return _readout(base, direction, 2.0)


def blind_readout(calibration):
    """Ignores every attribute; the boundary at half a spread lets per-seed noise flip some images."""
    base, changes = calibration
    random = torch.randn(base.shape[1], generator=torch.Generator().manual_seed(0))
    return _readout(base, _orthogonal_part(random, list(changes.values())), 0.5)


# The blind target at 48 seeds: nothing significant at ten seed ranges (0-900). At 192 the raw test
# finds the attribute edits' larger image changes (README, Limits): the null is matched in
# conditioning size, not in image change, and this target reads every pixel direction.
BLIND_SAMPLES = 48
PLANTED_SAMPLES = 192  # README: at 192 seeds the verdict held at ten seed ranges (0-900); at 48 it missed one in five


def planted_config(folder):
    """configs/tiny.yaml searched up to alpha = 1.5, the alpha the readouts were calibrated at (past the
    captions: an extrapolated edit, which the report counts as such), max_steps 10 for gradients."""
    from pathlib import Path

    path = Path(folder) / "planted.yaml"
    path.write_text((Path(__file__).parents[1] / "configs" / "tiny.yaml").read_text()
                    .replace("max_steps: 8", "max_steps: 10\n  alpha_max: 1.5"))
    return path


def audit_readout(folder, config_path, readout, name, samples=PLANTED_SAMPLES, seed=None):
    """Save a readout as TorchScript and audit it through the `torchscript:` spec and the CLI, like any
    user model; returns (run directory, report)."""
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from zoom.cli import main

    folder = Path(folder)
    model_path = folder / f"{name}.pt"
    torch.jit.script(readout).save(str(model_path))
    out = folder / f"run-{name}"
    result = CliRunner().invoke(main, ["audit", "--config", str(config_path), "--target", f"torchscript:{model_path}",
                                       "--samples", str(samples), "--out", str(out),
                                       *([] if seed is None else ["--seed", str(seed)])])
    assert result.exit_code == 0, result.output
    print(f"\n{name} target:\n{result.stdout}")
    report = json.loads((out / "report.json").read_text())
    for a in report["attributes"] + [report["null"]]:
        print(f"  {name}: {a['name']:<11} flips {a['flips']:>2}/{a['n']}  flip_rate {a['flip_rate']:.3f}  "
              f"raw q {a.get('raw_q_value')}")
    return out, report
