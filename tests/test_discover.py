"""`zoom discover`: proposals from a vocabulary, screening, confirmation on fresh seeds, and bad input."""

import json
import os

import pytest
from click.testing import CliRunner
from test_hostile import assert_one_line_exit_2

from zoom.cli import main
from zoom.discover import load_vocabulary, plan_sizes, propose
from zoom.errors import ZoomError
from zoom.prompts import load_prompts

DEMO_DOMAIN = "a small plain green square on a white background"




def test_world_vocabulary_proposes_each_other_word_of_each_slot():
    proposals = propose(DEMO_DOMAIN, load_vocabulary("world"))
    names = [p.name for p in proposals]
    assert names == ["red", "blue", "yellow", "purple", "black background", "gray background", "blue background",
                     "orange background", "large", "striped", "circle", "triangle"]
    by_name = {p.name: p for p in proposals}
    assert by_name["red"].prompt == "a small plain red square on a white background"
    assert by_name["blue background"].prompt == "a small plain green square on a blue background"
    assert by_name["circle"].changes_label and not by_name["red"].changes_label
    assert by_name["red"].oracle["label"] == "red" and by_name["red"].oracle["spec"].endswith("oracles/colour")


def test_a_word_inside_a_longer_slot_belongs_to_that_slot():
    # the "blue" of "blue background" is a background, not a colour to substitute
    proposals = propose("a small plain blue triangle on a blue background", load_vocabulary("world"))
    names = [p.name for p in proposals]
    assert "white background" in names and "red" in names
    assert not any(p.prompt.endswith("red background") and p.name == "red" for p in proposals)
    assert len({p.prompt for p in proposals}) == len(proposals)


def test_phrases_become_domain_comma_phrase(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("phrases: [wearing a hat, '  ']\n", encoding="utf-8")
    [p] = propose("a photo of a person", load_vocabulary(str(path)))
    assert (p.name, p.prompt, p.kind) == ("wearing a hat", "a photo of a person, wearing a hat", "phrase")


def test_budget_cuts_the_screening_seeds_first():
    assert plan_sizes(12, 8, 16, 5, None) == (8, 5)
    assert plan_sizes(12, 8, 16, 5, 2 * 16 * 5 + 2 * 12 * 3) == (3, 5)
    with pytest.raises(ZoomError, match="too small"):
        plan_sizes(12, 8, 16, 5, 100)


@pytest.mark.parametrize("content, words", [
    ("", ["empty"]),
    ("categories: []\nphrases: []\n", ["no words"]),
    ("categories: [{name: c, words: [only]}]\n", ["at least two"]),
    ("[unclosed\n", ["vocabulary"]),
])
def test_bad_vocabulary_files_are_one_line_exit_2(tmp_path, content, words):
    path = tmp_path / "v.yaml"
    path.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["discover", "--config", "demo", "--vocabulary", str(path), "--out", str(out)])
    assert_one_line_exit_2(result, *words)
    assert not out.exists()


def test_missing_and_unreadable_vocabularies_are_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["discover", "--config", "demo", "--vocabulary", str(tmp_path / "nope.yaml"),
                                       "--out", str(out)])
    assert_one_line_exit_2(result, "does not exist")
    result = CliRunner().invoke(main, ["discover", "--config", "demo", "--vocabulary", str(tmp_path), "--out", str(out)])
    assert_one_line_exit_2(result, "not a file")
    path = tmp_path / "v.yaml"
    path.write_bytes(b"phrases: [\xff\xfe]\n")
    result = CliRunner().invoke(main, ["discover", "--config", "demo", "--vocabulary", str(path), "--out", str(out)])
    assert_one_line_exit_2(result, "UTF-8")
    if os.geteuid() != 0:
        path.write_text("phrases: [a]\n", encoding="utf-8")
        path.chmod(0)
        result = CliRunner().invoke(main, ["discover", "--config", "demo", "--vocabulary", str(path), "--out", str(out)])
        assert_one_line_exit_2(result, "cannot be read")
    assert not out.exists()


def test_phrases_that_read_as_the_domain_propose_nothing(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text(f"phrases: ['  ']\ncategories: [{{name: fruit, words: [apple, pear]}}]\n", encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["discover", "--config", "demo", "--vocabulary", str(path), "--out", str(out)])
    assert_one_line_exit_2(result, "proposes nothing")
    path.write_text(f"phrases: ['{DEMO_DOMAIN.upper()}']\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["discover", "--config", "demo", "--vocabulary", str(path), "--out", str(out)])
    assert_one_line_exit_2(result, "proposes nothing")
    assert not out.exists()


def test_a_budget_of_zero_is_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    for budget in ("0", "-3"):
        result = CliRunner().invoke(main, ["discover", "--config", "demo", "--budget", budget, "--out", str(out)])
        assert_one_line_exit_2(result, "--budget")
    result = CliRunner().invoke(main, ["discover", "--config", "demo", "--budget", "10", "--out", str(out)])
    assert_one_line_exit_2(result, "too small")
    assert not out.exists()


def test_discover_on_the_world_end_to_end_and_resume(tmp_path):
    out = tmp_path / "found"
    args = ["discover", "--config", "demo", "--vocabulary", "world", "--screen-samples", "3", "--samples", "4",
            "--top-k", "2", "--seed", "300", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    found = json.loads((out / "discover.json").read_text())
    assert found["screened"] == 12 and found["top_k"] == 2
    assert found["screen"]["seeds"] == [300, 302] and found["confirm"]["seeds"] == [303, 306]  # disjoint
    assert [p["rank"] for p in found["proposals"]] == list(range(1, 13))
    assert found["proposals"][0]["name"] == "red"  # the demo's target: red squares look like circles to it
    assert found["confirm"]["chosen"][0] == "red" and len(found["confirm"]["chosen"]) <= 2
    assert not any(p["changes_label"] for p in found["proposals"] if p["name"] in found["confirm"]["chosen"])
    assert {c["name"] for c in found["confirmed"]} == set(found["confirm"]["chosen"])
    assert found["cost"]["screening"]["counterfactuals"] == 3 * 12 * 2
    assert found["cost"]["screening"]["unet_calls"] > 0 and found["cost"]["confirmation"]["unet_calls"] > 0
    assert (out / "confirm" / "report.html").exists() and (out / "discover.md").exists()
    page = (out / "discover.html").read_text()  # the discovery's page: its gallery shows the confirmation's images
    assert 'href="confirm/report.html"' in page and 'src="confirm/images/' in page and "12 screened" in page
    assert "red" in result.output and "UNet calls" in result.output
    if found["discovered"]:
        prompts = load_prompts(str(out / "discovered.yaml"))  # what `zoom audit --prompts` reads
        assert [a.name for a in prompts.attributes] == found["discovered"]
        assert prompts.domain == DEMO_DOMAIN and prompts.nulls
    # a finished discovery resumed: read back, same answer; without --resume: refused
    again = CliRunner().invoke(main, args + ["--resume"])
    assert again.exit_code == 0, (again.output, again.exception)
    assert json.loads((out / "discover.json").read_text())["proposals"] == found["proposals"]
    assert_one_line_exit_2(CliRunner().invoke(main, args), "already exists")
    changed = CliRunner().invoke(main, [*args[:-2], "--top-k", "3", "--out", str(out), "--resume"])
    assert_one_line_exit_2(changed, "differs")
