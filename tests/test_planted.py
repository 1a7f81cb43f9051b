"""Planted ground truth: targets whose true sensitivity is known by construction (tests/planted.py)
come out of a real audit as they should. The readouts are saved as TorchScript and audited through
the `torchscript:` spec and the CLI, like any user model (the audits are the session fixtures
`planted_run` and `blind_run` of conftest.py, shared with the report, check and compare tests). The
tiny judge is random, so the raw flips are what these targets are known to drive (tests/planted.py)."""

import json

from click.testing import CliRunner

from planted import PLANTED


def test_planted_attribute_is_found_first_and_significant(planted_run):
    _, report = planted_run
    ranked = sorted(report["attributes"], key=lambda a: -a["flip_rate"])
    assert ranked[0]["name"] == PLANTED
    assert ranked[0]["raw_significant"] and ranked[0]["raw_q_value"] < 0.01
    assert all(not a["raw_significant"] for a in ranked[1:]), "only the planted attribute matters"
    # A margin, not a photo finish: the planted attribute flips more often than any other and the null.
    assert ranked[0]["flip_rate"] >= ranked[1]["flip_rate"] + 0.1
    assert ranked[0]["flip_rate"] >= report["null"]["flip_rate"] + 0.12  # >= 0.16 at seeds 0-900 (README)


def test_larger_edits_that_the_target_does_not_read_are_not_significant(planted_run):
    """The null twin of each attribute is as large as the attribute's own edit and searched with the same
    objective. eyeglasses and hat move the conditioning further than the paraphrase does, and their image
    change is orthogonal to the planted readout: matched in size, their nulls flip as often as they do."""
    import os

    from planted import DOMAIN, PROMPTS
    from zoom.generator import Generator

    out, report = planted_run
    generator = Generator.from_pretrained(os.path.join(os.environ["ZOOM_TINY"], "sd"), resolution=64)
    domain = generator.embed(DOMAIN)
    norm = {name: float((generator.embed(p) - domain).norm()) for name, p in PROMPTS.items()}
    larger = [name for name in ("eyeglasses", "hat") if norm[name] > 1.1 * norm["null"]]
    assert larger == ["eyeglasses", "hat"], norm
    rows = {a["name"]: a for a in report["attributes"]}
    for name in larger:
        assert not rows[name]["raw_significant"], rows[name]
        assert rows[name]["pairs"]["n"] == rows[name]["n"]  # every seed paired with its null twin
    assert rows[PLANTED]["raw_significant"]


def test_attribute_blind_target_has_nothing_significant(blind_run):
    out, report = blind_run
    assert not any(a["raw_significant"] or a["significant"] for a in report["attributes"])
    # Not vacuous: the blind target does flip, about as often under the null as under attributes.
    assert report["null"]["flips"] > 0 and sum(a["flips"] for a in report["attributes"]) > 0

    # `zoom report` rebuilds the same report.json from the records alone.
    from zoom.cli import main

    before = (out / "report.json").read_text()
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    assert json.loads((out / "report.json").read_text()) == json.loads(before)
