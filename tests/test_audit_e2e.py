"""Whole audits: the demo as a user runs it, every search mode and edit space, a real-weights target,
and resume after an interruption."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zoom.cli import main

RECORD_FIELDS = {"key", "seed", "attribute", "base_pred", "final_pred", "flipped", "steps", "strength",
                 "base_prob", "final_prob", "validity", "base_image", "counterfactual_image", "seconds", "status"}
ATTRIBUTE_FIELDS = {"name", "prompt", "n", "flips", "flip_rate", "ci_low", "ci_high", "p_value", "q_value",
                    "significant", "median_strength_to_flip", "mean_prob_drop", "validity_rate", "per_class"}


def _records(run_dir):
    lines = []
    for path in sorted((Path(run_dir) / "records").glob("rank-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def _check_report(run_dir, attributes: int, samples: int, joint: bool = False):
    report = json.loads((Path(run_dir) / "report.json").read_text())
    assert report["schema_version"] == 1
    assert {"run", "cost", "null", "attributes"} <= set(report)
    assert {"counterfactuals", "seconds_per_counterfactual", "unet_calls_per_counterfactual",
            "peak_memory_bytes"} <= set(report["cost"])
    assert {"config", "versions", "device", "precision", "num_processes", "start_time", "end_time"} <= set(report["run"])
    assert {"n", "flips", "flip_rate", "ci_low", "ci_high"} <= set(report["null"])
    assert len(report["attributes"]) == attributes
    rates = [a["confirmed_rate"] for a in report["attributes"]]
    assert rates == sorted(rates, reverse=True), "attributes are sorted by sensitivity (confirmed flips)"
    for a in report["attributes"]:
        assert ATTRIBUTE_FIELDS <= set(a)
        assert a["n"] == samples
        assert a["ci_low"] <= a["flip_rate"] <= a["ci_high"]
        assert a["confirmed_flips"] <= a["flips"] and a["p_value"] >= a["raw_p_value"]
    records = _records(run_dir)
    # single and sweep: each attribute and its null twin; joint: the attributes and one null slot
    assert len(records) == ((attributes + 1) if joint else 2 * attributes) * samples
    assert len({r["key"] for r in records}) == len(records)
    for r in records:
        assert RECORD_FIELDS <= set(r)
        assert r["status"] == "ok"
        assert r["alpha"] >= 0  # toward the attribute, never away from it
        assert (Path(run_dir) / r["base_image"]).is_file() and (Path(run_dir) / r["counterfactual_image"]).is_file()
    assert (Path(run_dir) / "report.csv").read_text().count("\n") == attributes + 2
    return report, records


def test_zoom_demo_end_to_end_in_a_subprocess(demo_run):
    """`zoom demo` audits the shapes world's biased classifier offline and says what it found."""
    out, stdout, seconds, report = demo_run
    assert "shapes world" in stdout and "RANDOMLY" not in stdout  # a trained model: no random-model banner
    assert "confirmed rate" in stdout and str(out.resolve() / "report.html") in stdout
    _check_report(out, attributes=4, samples=report["run"]["config"]["search"]["samples"])
    assert report["run"]["config"]["search"]["samples"] >= 16 and report["run"]["random_models"] is False
    assert report["attributes"][0]["name"] == "red" and report["attributes"][0]["significant"]
    config = (out / "config.yaml").read_text()
    assert "${ZOOM_WORLD}" not in config and "zoom/data/world" in config  # paths resolved and absolute
    assert "shapes world" in (out / "report.html").read_text()  # the description, at the top of the page


@pytest.mark.parametrize("seed", [100, 200])
def test_the_demo_verdict_holds_at_other_seeds(tmp_path, seed):
    """The demo's claim (red first and significant, nothing else significant) at two more disjoint seed
    ranges than the demo's own 0-15 (README: it held at eight ranges, 0-715)."""
    import zoom

    report = zoom.audit("demo", tmp_path / "run", seed=seed, progress=False)
    first, *others = report["attributes"]
    assert first["name"] == "red" and first["significant"] and first["confirmed_flips"] >= 12, first
    assert not any(a["significant"] for a in others), others


@pytest.mark.parametrize("mode,edit_space", [("single", "text"), ("single", "latent"), ("single", "both"),
                                             ("joint", "text"), ("sweep", "text")])
def test_every_mode_and_edit_space_runs(tmp_path, demo_config, mode, edit_space):
    import dataclasses

    from zoom.runner import run_audit

    search = dataclasses.replace(demo_config.search, mode=mode, edit_space=edit_space, samples=4,
                                 batch_size=4, max_steps=3, sweep_points=5)
    config = dataclasses.replace(demo_config, search=search)
    report = run_audit(config, tmp_path / "run", progress=False)
    report, records = _check_report(tmp_path / "run", attributes=4, samples=4, joint=mode == "joint")
    for r in records:
        if edit_space == "latent":
            assert r["alpha"] == 0 and 0 < r["delta_rel"] <= search.delta_max + 1e-4
            assert r["strength"] == pytest.approx(r["delta_rel"])
        if mode == "single" and edit_space == "text":  # the bracket: forward passes, the flip in (low, strength]
            from zoom.search import REFINE_ROUNDS  # grid, probes near the boundary, bisection

            assert search.grid_points <= r["unet_calls"] <= search.grid_points + 2 * REFINE_ROUNDS + 4
            assert isinstance(r["monotone"], bool)
            assert r["strength_low"] < r["strength"] <= 1.0 if r["flipped"] else r["strength_low"] == 1.0
        if mode == "sweep":
            grid = [point[0] for point in r["curve"]]
            assert grid == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # [0, alpha_max]: never away from it
            assert r["unet_calls"] == 4  # alpha = 0 is the base image itself
            assert r["alpha"] in (0.25, 0.5, 0.75, 1.0)
            if r["flipped"]:
                flip_alphas = [a for a, _, pred in r["curve"] if pred != r["base_pred"]]
                assert r["strength"] == pytest.approx(min(flip_alphas))
        if mode == "joint":
            assert 0 <= r["share"] <= 1
            assert r["flipped"] <= r["any_flip"]
    if mode == "joint":
        by_seed = {}
        for r in records:
            by_seed.setdefault(r["seed"], []).append(r)
        for rs in by_seed.values():  # shares of one seed's joint search add up to one
            assert sum(r["share"] for r in rs) == pytest.approx(1.0, abs=1e-4)
            assert sum(r["flipped"] for r in rs) <= 1  # one dominant direction per flipped seed
        assert all("mean_share" in a for a in report["attributes"])


def test_real_mobilenet_v2_runs_as_a_multiclass_audit_target(tmp_path, tiny, mobilenet_v2_weights):
    result = CliRunner().invoke(main, ["audit", "--config", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"),
                                       "--target", f"torchvision:mobilenet_v2:{mobilenet_v2_weights}",
                                       "--samples", "4", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report, records = _check_report(tmp_path / "run", attributes=4, samples=4)
    from torchvision.models import MobileNet_V2_Weights

    categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    for r in records:
        assert r["base_label"] == categories[r["base_pred"]]  # ImageNet class names, not indices
        assert 0 < r["base_prob"] <= 1
    assert set(report["attributes"][0]["per_class"]) <= set(categories)


def test_resume_finishes_with_exactly_the_uninterrupted_records(tmp_path, tiny):
    config = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    full, cut = tmp_path / "full", tmp_path / "cut"
    for out in (full, cut):
        assert CliRunner().invoke(main, ["audit", "--config", config, "--samples", "16",
                                         "--out", str(out)]).exit_code == 0
    # Interrupt `cut` after its first block: drop the second block's lines, leave a torn half line.
    path = cut / "records" / "rank-0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    first_block = [line for line in lines if json.loads(line)["seed"] < 8]
    path.write_text("".join(first_block) + lines[-1][: len(lines[-1]) // 2])
    (cut / "report.json").unlink()
    result = CliRunner().invoke(main, ["audit", "--config", config, "--samples", "16", "--out", str(cut), "--resume"])
    assert result.exit_code == 0, result.output

    def comparable(run):
        return {r["key"]: {k: v for k, v in r.items() if k != "seconds"} for r in _records(run)}

    assert len(_records(cut)) == len(_records(full)) == 8 * 16  # none lost, none duplicated
    assert comparable(cut) == comparable(full)
    a, b = (json.loads((run / "report.json").read_text()) for run in (full, cut))
    assert a["attributes"] == b["attributes"] and a["null"] == b["null"]


def test_resume_refuses_a_different_config(tmp_path, tiny):
    config = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["audit", "--config", config, "--samples", "8", "--out", str(out)]).exit_code == 0
    before = (out / "records" / "rank-0.jsonl").read_text()
    result = CliRunner().invoke(main, ["audit", "--config", config, "--samples", "9", "--out", str(out), "--resume"])
    assert result.exit_code == 2
    assert "differs" in result.stderr and "search" in result.stderr
    assert (out / "records" / "rank-0.jsonl").read_text() == before


def test_python_api_audits_an_in_memory_module(tmp_path, tiny, calibration):
    import zoom
    from planted import PLANTED, planted_readout

    report = zoom.audit(str(Path(__file__).parents[1] / "configs" / "tiny.yaml"), tmp_path / "run",
                        target=planted_readout(calibration), samples=8, progress=False)
    assert report["attributes"][0]["name"] == PLANTED
    assert report["run"]["config"]["target"]["spec"] == "python:(in-memory module)"
    with pytest.raises(zoom.ZoomError, match="already exists"):
        zoom.audit(str(Path(__file__).parents[1] / "configs" / "tiny.yaml"), tmp_path / "run",
                   target=planted_readout(calibration), samples=8)
