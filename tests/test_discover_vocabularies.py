"""`zoom discover`: the bundled vocabularies, the tokenizer filter before screening, and discover.html."""

import pytest
from click.testing import CliRunner
from test_hostile import assert_one_line_exit_2

from zoom.cli import main
from zoom.discover import load_vocabulary, propose, readable_proposals
from zoom.errors import ZoomError
from zoom.prompts import bundled, load_prompts
from zoom.report.discovery import render_discovery

IMAGENET_X_FACTORS = {"pose", "background", "pattern", "color", "smaller", "shape", "partial view", "subcategory",
                      "texture", "larger", "darker", "object blocking", "person blocking", "style", "brighter",
                      "multiple objects"}


def _discover(tmp_path, vocabulary_text, *more):
    path = tmp_path / "v.yaml"
    path.write_text(vocabulary_text, encoding="utf-8")
    return CliRunner().invoke(main, ["discover", "--config", "demo", "--vocabulary", str(path), *more,
                                     "--out", str(tmp_path / "out")])


def test_the_bundled_vocabularies_are_the_world_and_the_general_ones():
    assert set(bundled("vocabularies")) == {"world", "faces", "objects", "scenes", "imagenet_x"}


@pytest.mark.parametrize("vocabulary, prompt_set", [
    ("faces", "faces"), ("objects", "animals"), ("objects", "imagenet_x"), ("scenes", "weather"),
    ("imagenet_x", "imagenet_x"), ("imagenet_x", "animals")])
def test_each_general_vocabulary_proposes_words_and_phrases_for_its_domain(vocabulary, prompt_set):
    import open_clip

    vocab = load_vocabulary(vocabulary)
    proposals = propose(load_prompts(prompt_set).domain, vocab)
    assert {p.kind for p in proposals} == {"substitution", "phrase"}
    names = [p.name.lower() for p in proposals]
    assert len(set(names)) == len(names) and len({p.prompt for p in proposals}) == len(proposals)
    assert len({c.name for c in vocab.categories}) == len(vocab.categories)
    assert all(p.category for p in proposals)  # every phrase sits in a named group
    # CLIP's BPE tokenizer (Stable Diffusion's and the default CLIPs') reads every word of them
    assert readable_proposals(proposals, load_prompts(prompt_set).domain,
                              [("guide CLIP", open_clip.get_tokenizer("ViT-B-32"))], vocab) == proposals


def test_the_imagenet_x_vocabulary_covers_its_16_factors():
    proposals = propose(load_prompts("imagenet_x").domain, load_vocabulary("imagenet_x"))
    assert {p.category for p in proposals} == IMAGENET_X_FACTORS
    assert "a dark photo of an object" in {p.prompt for p in proposals}


def test_phrase_groups_name_the_category_and_are_checked(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("phrases: {lighting: [at night, in fog], pose: [upside down, at night]}\n", encoding="utf-8")
    proposals = propose("a photo of a cat", load_vocabulary(str(path)))
    assert [(p.name, p.category) for p in proposals] == [("at night", "lighting"), ("in fog", "lighting"),
                                                         ("upside down", "pose")]
    for text, words in [("phrases: {lighting: night}\n", "mapping of group names"),
                        ("categories: [{name: c, words: [a, b]}, {name: c, words: [d, e]}]\n", "unique")]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ZoomError, match=words):
            load_vocabulary(str(path))


def test_words_the_models_cannot_read_are_left_out_with_one_warning(tmp_path):
    # the world's tokenizers are word-level: "magenta" and "banana" are not among their words; the budget
    # refuses the run after the filter, before any model is loaded
    result = _discover(tmp_path, "categories: [{name: colour, words: [green, red, magenta]}]\n"
                                 "phrases: [banana split, '<img onerror=x>']\n", "--budget", "10")
    assert result.exit_code == 2
    warning, error = result.stderr.rstrip("\n").split("\n")
    assert warning.startswith("zoom: warning: ") and "3 of 4 proposals left out" in warning
    assert all(w in warning for w in ("'magenta'", "'banana split'", "'<img onerror=x>'", "generator"))
    assert "'red'" not in warning
    assert error.startswith("zoom: error: ") and "too small for 1 proposals" in error
    assert not (tmp_path / "out").exists()


def test_a_vocabulary_the_models_cannot_read_at_all_is_one_line_exit_2(tmp_path):
    result = _discover(tmp_path, "categories: [{name: colour, words: [green, magenta, teal]}]\n")
    assert_one_line_exit_2(result, "proposes nothing", "'magenta' and 'teal'", "use only words the models know: ",
                           "purple")
    assert not (tmp_path / "out").exists()


def test_phrases_that_read_as_the_domain_once_tokenized_are_one_line_exit_2(tmp_path):
    # different as text (case, spacing, a full stop), the same tokens for the generator's tokenizer
    result = _discover(tmp_path, "phrases: ['A Small plain  green square on a white background.']\n")
    assert_one_line_exit_2(result, "proposes nothing", "read as the domain itself once tokenized")
    assert not (tmp_path / "out").exists()


def _result(name):
    proposal = {"name": name, "prompt": f"a photo, {name}", "kind": "phrase", "category": "<b>group</b>",
                "replaces": None, "changes_label": False, "rank": 1,
                "screening": {"score": 0.5, "raw_gap": 0.5, "confirmed_flips": 2, "flips": 2, "n": 4}}
    label = {**proposal, "name": "circle", "kind": "substitution", "changes_label": True, "rank": 2,
             "screening": {"score": None, "confirmed_flips": None, "n": None}}
    confirmed = {"name": name, "prompt": proposal["prompt"], "flips": 5, "n": 8, "flip_rate": 0.625,
                 "confirmed_flips": 5, "confirmed_rate": 0.625, "confirmed_ci_low": 0.3, "confirmed_ci_high": 0.86,
                 "null_confirmed_rate": 0.0, "oracle_rate": None, "p_value": 0.03, "q_value": 0.03, "significant": True}
    return {"vocabulary": {"name": "<script>v</script>", "source": "v.yaml"}, "domain": "a photo",
            "target": "hf:some/target", "proposer": "words", "screen": {"method": "bracket", "seeds": [0, 3]},
            "screened": 2, "top_k": 1, "confirm": {"seeds": [4, 11], "chosen": [name]},
            "proposals": [proposal, label], "confirmed": [confirmed],
            "cost": {"screening": {"counterfactuals": 16, "unet_calls": 1200, "search_seconds": 3.0, "wall_seconds": None},
                     "confirmation": {"counterfactuals": 16, "unet_calls": 1300, "search_seconds": 3.5,
                                      "wall_seconds": 4.0}}}


def test_the_discovery_page_escapes_vocabulary_words(tmp_path):
    page = render_discovery(_result("<img onerror=x>"), tmp_path)
    assert "<img onerror" not in page and "&lt;img onerror=x&gt;" in page
    assert "<script>" not in page and "<b>group" not in page
    assert "2 screened, 1 confirmed, Benjamini–Hochberg over 1" in page
    assert "changes the label" in page and "1,300 UNet calls" in page
    assert "confirm/report.html" not in page  # no confirmation audit in this folder: no dead link


def test_the_discovery_page_takes_a_gradient_screen_and_a_free_direction(tmp_path):
    result = _result("red")
    result["proposals"][0].update(screening={"score": 0.2, "raw_gap": None, "confirmed_flips": None, "n": 3},
                                  free_direction=1)
    result["free_direction"] = {"method": "a free direction", "named": ["red"]}
    result["cost"] = {"free_direction": {"unet_calls": 40, "wall_seconds": 2.0}, "screening": {"unet_calls": 50},
                      "confirmation": None}
    page = render_discovery(result, tmp_path)
    assert "near the free direction" in page and "Nearest proposals: red" in page and "free direction</dt>" in page
