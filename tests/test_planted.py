"""Planted ground truth: targets whose true sensitivity is known by construction (tests/planted.py)
come out of a real audit as they should. The readouts are saved as TorchScript and audited through
the `torchscript:` spec and the CLI, like any user model."""

import json

import pytest
import torch
from click.testing import CliRunner

from planted import PLANTED, blind_readout, planted_readout

SAMPLES = 32


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
    readout = planted_readout(calibration)
    _, report = _audit(tmp_path, demo_config_path, readout, "planted")
    ranked = report["attributes"]
    assert ranked[0]["name"] == PLANTED
    assert ranked[0]["significant"] and ranked[0]["q_value"] < 0.01
    assert all(not a["significant"] for a in ranked[1:]), "only the planted attribute matters"
    # A clear margin, not a photo finish: the planted attribute flips far more often than any other.
    assert ranked[0]["flip_rate"] >= ranked[1]["flip_rate"] + 0.2
    assert ranked[0]["flip_rate"] >= report["null"]["flip_rate"] + 0.3


def test_attribute_blind_target_has_nothing_significant(tmp_path, calibration, demo_config_path):
    readout = blind_readout(calibration)
    out, report = _audit(tmp_path, demo_config_path, readout, "blind")
    assert not any(a["significant"] for a in report["attributes"])
    # Not vacuous: the blind target does flip, about as often under the null as under attributes.
    assert report["null"]["flips"] > 0 and sum(a["flips"] for a in report["attributes"]) > 0

    # `zoom report` rebuilds the same report.json from the records alone.
    from zoom.cli import main

    before = (out / "report.json").read_text()
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    assert json.loads((out / "report.json").read_text()) == json.loads(before)
