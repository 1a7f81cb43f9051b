"""Planted ground truth: targets whose true sensitivity is known by construction.

The targets are built from the generator's behaviour as the diffusers pipeline itself shows it,
not from zoom's internals: on calibration seeds (disjoint from the audit's), render the domain
prompt and each prompt's edited conditioning with StableDiffusionPipeline, take every prompt's
mean image change, and read the image out along

- planted: attribute A's mean change with every other prompt's mean change projected out, so only
  A moves the readout on average (the tiny random models change images in correlated ways, cosines
  up to ~0.7 between unrelated prompts, hence the projection);
- blind: a random direction orthogonal to every prompt's mean change, so no attribute moves it.

The readout is a two-class classifier (logits [0, k (s - tau)]) saved as TorchScript and audited
through the `torchscript:` spec and the CLI, like any user model.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

DOMAIN = "a photo of a person's face"
PROMPTS = {
    "eyeglasses": "a photo of a person's face wearing eyeglasses",
    "smile": "a photo of a smiling person's face",
    "beard": "a photo of a person's face with a beard",
    "hat": "a photo of a person's face wearing a hat",
    "null": "a picture of a person's face",
}
PLANTED = "smile"
CALIBRATION_SEEDS = range(1000, 1032)
SAMPLES = 32


class Readout(nn.Module):
    def __init__(self, direction, center, tau: float, scale: float):
        super().__init__()
        self.register_buffer("direction", direction)
        self.register_buffer("center", center)
        self.tau, self.scale = tau, scale

    def forward(self, images):
        s = (images.flatten(1) - self.center) @ self.direction
        logit = self.scale * (s - self.tau)
        return torch.stack([torch.zeros_like(logit), logit], -1)


@pytest.fixture(scope="module")
def calibration(tiny):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd"], safety_checker=None, requires_safety_checker=False)
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


def _audit(tmp_path, demo_config_path, readout, name):
    from zoom.cli import main

    model_path = tmp_path / f"{name}.pt"
    torch.jit.script(readout).save(str(model_path))
    out = tmp_path / f"run-{name}"
    result = CliRunner().invoke(main, ["audit", "--config", str(demo_config_path), "--target",
                                       f"torchscript:{model_path}", "--samples", str(SAMPLES), "--out", str(out)])
    assert result.exit_code == 0, result.output
    print(f"\n{name} target:\n{result.stdout}")
    report = json.loads((out / "report.json").read_text())
    for a in report["attributes"] + [report["null"]]:
        print(f"  {name}: {a['name']:<11} flips {a['flips']:>2}/{a['n']}  flip_rate {a['flip_rate']:.3f}  "
              f"q {a.get('q_value')}")
    return out, report


@pytest.fixture(scope="module")
def demo_config_path(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("cfg") / "planted.yaml"
    path.write_text((__import__("pathlib").Path(__file__).parents[1] / "configs" / "demo.yaml").read_text()
                    .replace("max_steps: 8", "max_steps: 10"))
    return path


def test_planted_attribute_is_found_first_and_significant(tmp_path, calibration, demo_config_path):
    base, changes = calibration
    direction = _orthogonal_part(changes[PLANTED], [v for k, v in changes.items() if k != PLANTED])
    center = base.mean(0)
    spread = float(((base - center) @ direction).std())
    readout = Readout(direction, center, tau=2.0 * spread, scale=4.0 / spread)
    _, report = _audit(tmp_path, demo_config_path, readout, "planted")
    ranked = report["attributes"]
    assert ranked[0]["name"] == PLANTED
    assert ranked[0]["significant"] and ranked[0]["q_value"] < 0.01
    assert all(not a["significant"] for a in ranked[1:]), "only the planted attribute matters"
    # A clear margin, not a photo finish: the planted attribute flips far more often than any other.
    assert ranked[0]["flip_rate"] >= ranked[1]["flip_rate"] + 0.2
    assert ranked[0]["flip_rate"] >= report["null"]["flip_rate"] + 0.3


def test_attribute_blind_target_has_nothing_significant(tmp_path, calibration, demo_config_path):
    base, changes = calibration
    random = torch.randn(base.shape[1], generator=torch.Generator().manual_seed(0))
    direction = _orthogonal_part(random, list(changes.values()))
    center = base.mean(0)
    spread = float(((base - center) @ direction).std())
    readout = Readout(direction, center, tau=0.5 * spread, scale=4.0 / spread)
    out, report = _audit(tmp_path, demo_config_path, readout, "blind")
    assert not any(a["significant"] for a in report["attributes"])
    # Not vacuous: the blind target does flip, about as often under the null as under attributes.
    assert report["null"]["flips"] > 0 and sum(a["flips"] for a in report["attributes"]) > 0

    # `zoom report` rebuilds the same report.json from the records alone.
    from zoom.cli import main

    before = (out / "report.json").read_text()
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    assert json.loads((out / "report.json").read_text()) == json.loads(before)
