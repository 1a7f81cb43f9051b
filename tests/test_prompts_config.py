"""Prompt files and run configs: everything shipped loads; bad input is a ZoomError naming the key."""

import glob
import os
import re
import socket
from pathlib import Path

import pytest
import yaml

from zoom.config import dump_config, load_config
from zoom.errors import ZoomError, looks_like_path
from zoom.prompts import load_prompts

ROOT = Path(__file__).parents[1]
PROMPT_FILES = sorted(glob.glob(str(ROOT / "prompts" / "*.yaml")))
CONFIG_FILES = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))

IMAGENET_X_FACTORS = {
    "pose", "background", "pattern", "color", "smaller", "shape", "partial_view", "subcategory",
    "texture", "larger", "darker", "object_blocking", "person_blocking", "style", "brighter",
    "multiple_objects",
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _write_yaml(path: Path, data) -> Path:
    return _write(path, yaml.safe_dump(data, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Shipped prompt files
# ---------------------------------------------------------------------------------------------


def test_shipped_files_are_found():
    names = {os.path.basename(p) for p in PROMPT_FILES}
    assert {"faces.yaml", "imagenet_x.yaml"} <= names
    assert {"demo.yaml", "tiny.yaml", "default.yaml"} <= {os.path.basename(p) for p in CONFIG_FILES}


@pytest.mark.parametrize("path", PROMPT_FILES, ids=os.path.basename)
def test_shipped_prompt_file_loads(path):
    ps = load_prompts(path)
    assert ps.domain.strip()
    assert ps.nulls and all(p.strip() and p != ps.domain for p in ps.nulls)
    assert len(ps.attributes) >= 4
    assert len({a.name.lower() for a in ps.attributes}) == len(ps.attributes)
    assert len({a.slug for a in ps.attributes}) == len(ps.attributes)
    assert all(a.prompt != ps.domain for a in ps.attributes)


def test_imagenet_x_has_the_16_factors():
    ps = load_prompts(ROOT / "prompts" / "imagenet_x.yaml")
    names = [a.name for a in ps.attributes]
    assert len(names) == 16
    assert set(names) == IMAGENET_X_FACTORS


# ---------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_network_no_models(monkeypatch):
    """Any network access or model load during the test fails loudly."""

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a config must not touch the network or load a model")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket.socket, "connect_ex", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)

    import diffusers
    import open_clip
    import torch
    import transformers

    import zoom.generator
    import zoom.guide
    import zoom.runner
    import zoom.targets

    monkeypatch.setattr(zoom.generator.Generator, "from_pretrained", forbidden)
    monkeypatch.setattr(zoom.guide.Clip, "load", forbidden)
    monkeypatch.setattr(zoom.targets, "load_target", forbidden)
    monkeypatch.setattr(zoom.runner, "load_models", forbidden)
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", forbidden)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbidden)
    monkeypatch.setattr(open_clip, "create_model", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_shipped_config_loads_offline_without_models(path, tiny, no_network_no_models):
    config = load_config(path)
    resolved = config.resolved()
    assert set(resolved) >= {"generator", "guide", "judge", "target", "prompts", "search", "precision"}
    assert "${" not in yaml.safe_dump(resolved)  # environment variables expanded
    assert isinstance(resolved["prompts"], dict) and resolved["prompts"]["attributes"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_resolved_config_round_trips(path, tiny, tmp_path):
    config = load_config(path)
    resolved = config.resolved()

    # the prompt content is copied in, whatever form the config gave it in
    assert resolved["prompts"] == load_prompts(config.prompts).to_dict()
    assert set(resolved["prompts"]) <= {"domain", "attributes", "null"}
    # local paths are absolute
    model = resolved["generator"]["model"]
    assert os.path.isabs(model) or not looks_like_path(model)

    text = dump_config(resolved)
    assert yaml.safe_load(text) == resolved
    stored = _write(tmp_path / "config.yaml", text)
    again = load_config(stored)
    assert again.resolved() == resolved
    # and once more: resolving is idempotent
    stored2 = _write(tmp_path / "config2.yaml", dump_config(again.resolved()))
    assert load_config(stored2).resolved() == resolved


def test_demo_resolved_has_demo_prompts_and_absolute_paths(tiny):
    resolved = load_config(ROOT / "configs" / "tiny.yaml").resolved()
    assert [a["name"] for a in resolved["prompts"]["attributes"]] == ["eyeglasses", "smile", "beard", "hat"]
    assert resolved["prompts"]["null"] == "a picture of a person's face"
    assert resolved["generator"]["model"] == str(Path(tiny["sd"]))
    assert resolved["target"]["spec"] == f"hf:{Path(tiny['target'])}"
    assert resolved["guide"]["model"] == f"local-dir:{Path(tiny['guide'])}"
    # defaults are filled in
    assert resolved["search"]["seed"] == 0 and resolved["search"]["kappa"] == 0.0


def test_prompts_file_path_is_resolved_and_copied(tmp_path, tiny):
    cfg = _write_yaml(tmp_path / "c.yaml", {"prompts": str(ROOT / "prompts" / "weather.yaml"),
                                            "target": {"spec": "torchvision:resnet18"}})
    config = load_config(cfg)
    assert config.prompts == str(ROOT / "prompts" / "weather.yaml")
    assert config.resolved()["prompts"] == load_prompts(ROOT / "prompts" / "weather.yaml").to_dict()
    # relative to the config's own folder
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(sub / "mine.yaml", 'domain: "a photo of a cat"\nattributes:\n'
           '  - {name: a, prompt: "a photo of a black cat"}\n')
    cfg2 = _write_yaml(sub / "c.yaml", {"prompts": "mine.yaml"})
    assert load_config(cfg2).prompts == str(sub / "mine.yaml")


# ---------------------------------------------------------------------------------------------
# Overrides and bad values
# ---------------------------------------------------------------------------------------------

DEMO = ROOT / "configs" / "tiny.yaml"


def test_cli_overrides_take_effect(tiny):
    base = load_config(DEMO)
    assert base.search.samples != 3 and base.search.mode != "sweep"
    config = load_config(DEMO, {"search.samples": 3, "search.mode": "sweep"})
    assert config.search.samples == 3
    assert config.search.mode == "sweep"
    assert config.resolved()["search"]["samples"] == 3
    # None means "option not given": the file's value stays
    config = load_config(DEMO, {"search.samples": None, "precision": "bf16", "target.spec": "timm:resnet18"})
    assert config.search.samples == base.search.samples
    assert config.precision == "bf16"
    assert config.target.spec == "timm:resnet18"


def test_override_into_section_missing_from_file(tmp_path, tiny):
    cfg = _write_yaml(tmp_path / "c.yaml", {"prompts": str(ROOT / "prompts" / "faces.yaml")})
    assert load_config(cfg, {"search.samples": 5}).search.samples == 5


def test_override_into_empty_section(tmp_path, tiny):
    cfg = _write(tmp_path / "c.yaml", f"prompts: {ROOT / 'prompts' / 'faces.yaml'}\nsearch:\n")
    assert load_config(cfg).search.samples == 64  # an empty section alone is fine
    assert load_config(cfg, {"search.samples": 5}).search.samples == 5


@pytest.mark.parametrize("overrides,must_name", [
    ({"search.samples": 0}, "search.samples"),
    ({"search.samples": -3}, "search.samples"),
    ({"search.mode": "fast"}, "search.mode"),
    ({"search.foo": 1}, "search.foo"),
    ({"search.samples": "many"}, "search.samples"),
    ({"search.samples": True}, "search.samples"),
    ({"search.lr": "fast"}, "search.lr"),
    ({"search.mode": "sweep", "search.edit_space": "latent"}, "search.edit_space"),
    ({"target.spec": "keras:foo"}, "keras:foo"),
    ({"target.spec": "torchvision"}, "target.spec"),
    ({"precision": "fp8"}, "precision"),
    ({"device": "tpu"}, "device"),
    ({"generator.resolution": 4}, "generator.resolution"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_values_raise_zoom_error_naming_the_key(overrides, must_name, tiny):
    with pytest.raises(ZoomError) as err:
        load_config(DEMO, overrides)
    assert must_name in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,must_name", [
    ("search:\n  foo: 1\n", "search.foo"),
    ("search:\n  samples: many\n", "search.samples"),
    ("search:\n  samples: 0\n", "search.samples"),
    ("search:\n  mode: fast\n", "search.mode"),
    ("search:\n  mode: sweep\n  edit_space: latent\n", "search.edit_space"),
    ("target:\n  spec: keras:foo\n", "keras:foo"),
    ("search: 5\n", "search"),
    ("generator: [1, 2]\n", "generator"),
])
def test_bad_values_in_file(tmp_path, text, must_name):
    cfg = _write(tmp_path / "c.yaml", f"prompts: {ROOT / 'prompts' / 'faces.yaml'}\n" + text)
    with pytest.raises(ZoomError) as err:
        load_config(cfg)
    assert must_name in str(err.value)


def test_config_file_problems(tmp_path):
    with pytest.raises(ZoomError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = _write(tmp_path / "bad.yaml", "search: {samples: 3\n")
    with pytest.raises(ZoomError, match="not valid YAML"):
        load_config(bad)
    lst = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ZoomError, match="mapping"):
        load_config(lst)
    # a config whose prompts file is broken fails at load time, naming the prompts file
    broken = _write(tmp_path / "p.yaml", "domain: x\nattributes: []\n")
    cfg = _write_yaml(tmp_path / "c.yaml", {"prompts": str(broken)})
    with pytest.raises(ZoomError, match="attributes"):
        load_config(cfg)
    cfg = _write_yaml(tmp_path / "c2.yaml", {"prompts": str(tmp_path / "nope.yaml")})
    with pytest.raises(ZoomError, match="nope.yaml"):
        load_config(cfg)


# ---------------------------------------------------------------------------------------------
# Prompt files: accepted and rejected shapes
# ---------------------------------------------------------------------------------------------

GOOD_ATTRS = ('attributes:\n'
              '  - name: eyeglasses\n    prompt: "a photo of a face wearing eyeglasses"\n'
              '  - name: smile\n    prompt: "a photo of a smiling face"\n')


def test_null_may_be_a_list_of_paraphrases(tmp_path):
    path = _write(tmp_path / "p.yaml", 'domain: "a photo of a face"\n' + GOOD_ATTRS +
                  'null:\n  - "a picture of a face"\n  - "an image of a face"\n  - "a picture of a face"\n')
    ps = load_prompts(path)
    assert ps.nulls == ("a picture of a face", "an image of a face")  # duplicates counted once
    assert ps.to_dict()["null"] == ["a picture of a face", "an image of a face"]
    assert load_prompts(ps.to_dict()) == ps  # the resolved config's copy reads back the same


def test_bare_null_key_is_the_null_paraphrase(tmp_path):
    path = _write(tmp_path / "p.yaml", 'domain: "a photo of a face"\n' + GOOD_ATTRS + 'null: "a picture of a face"\n')
    assert None in yaml.safe_load(path.read_text())  # YAML really reads the key as None
    ps = load_prompts(path)
    assert ps.nulls == ("a picture of a face",)
    assert [a.name for a in ps.attributes] == ["eyeglasses", "smile"]
    assert ps.to_dict()["null"] == "a picture of a face"
    # quoted "null" key and no null at all
    quoted = _write(tmp_path / "q.yaml", 'domain: "a photo of a face"\n' + GOOD_ATTRS + '"null": "a picture of a face"\n')
    assert load_prompts(quoted).nulls == ("a picture of a face",)
    none = _write(tmp_path / "n.yaml", 'domain: "a photo of a face"\n' + GOOD_ATTRS)
    assert load_prompts(none).nulls == ()
    assert "null" not in load_prompts(none).to_dict()


def test_prompts_from_mapping_equal_file(tmp_path):
    path = _write(tmp_path / "p.yaml", 'domain: "a photo of a face"\n' + GOOD_ATTRS + 'null: "a picture of a face"\n')
    from_file = load_prompts(path)
    assert load_prompts(from_file.to_dict()) == from_file


@pytest.mark.parametrize("text,match", [
    ('domain: "a photo of a face"\nattributes: []\n', "attributes"),
    ('domain: "a photo of a face"\n', "attributes"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: Smile, prompt: "a smiling face"}\n'
     '  - {name: smile, prompt: "a grinning face"}\n', "twice"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a, prompt: "a smiling face"}\n'
     '  - {name: b, prompt: "a smiling face"}\n', "twice"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a, prompt: "a smiling face"}\n'
     '  - {name: b, prompt: "a   smiling  face "}\n', "twice"),  # duplicate once whitespace is cleaned
    ('domain: "a photo of a face"\nattributes:\n  - {name: "null", prompt: "a smiling face"}\n', "null"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: " NULL ", prompt: "a smiling face"}\n', "null"),
    ('attributes:\n  - {name: a, prompt: "a smiling face"}\n', "domain"),
    ('domain: ""\nattributes:\n  - {name: a, prompt: "a smiling face"}\n', "domain"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a, prompt: "a smiling face"\n', "not valid YAML"),
    ('domain: "a photo of a face"\nattributes: [\n', "not valid YAML"),
    ('- just\n- a list\n', "mapping"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a}\n', r"attributes\[0\]"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a, prompt: "a photo of a face"}\n', "domain"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a, prompt: "a smiling face"}\nnull: 3\n', "null"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a, prompt: "a smiling face"}\nnull: []\n', "null"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a, prompt: "a smiling face"}\nnull: ["a face", 3]\n', "null"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a, prompt: "a smiling face"}\nnull: ["a photo of a face"]\n',
     "domain prompt itself"),
    ('domain: "a photo of a face"\nattributes:\n  - {name: a, prompt: "a smiling face"}\nextra: 1\n', "extra"),
])
def test_bad_prompt_files_raise(tmp_path, text, match):
    path = _write(tmp_path / "p.yaml", text)
    with pytest.raises(ZoomError, match=match):
        load_prompts(path)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(ZoomError, match="does not exist"):
        load_prompts(tmp_path / "nope.yaml")


SLUG_SAFE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def test_slugs_are_filesystem_safe_and_unique(tmp_path):
    names = ["<script>alert(1)</script>", "../../etc", "..", ".", "/", "a/b", "a b", "a-b", "a_b",
             "C:\\Windows\\system32", "émoji 😀", "眼镜", "x" * 300, "x" * 299 + "y", "nul\x00byte",
             "$(rm -rf ~)", "CON", "  spaced  "]
    attrs = [{"name": n, "prompt": f"a photo of a face, variant {i}"} for i, n in enumerate(names)]
    ps = load_prompts({"domain": "a photo of a face", "attributes": attrs})
    slugs = [a.slug for a in ps.attributes]
    assert len(set(slugs)) == len(slugs)
    assert len({s.lower() for s in slugs}) == len(slugs)  # unique on case-insensitive file systems too
    for slug in slugs:
        assert SLUG_SAFE.match(slug), slug
        assert len(slug) <= 64
        assert slug != "null"  # the null control's own slug
        target = (tmp_path / slug)
        target.write_text("x")
        assert target.resolve().parent == tmp_path.resolve()
    assert len(list(tmp_path.iterdir())) == len(slugs)
    # the names themselves are kept as given (stripped) for the report
    assert ps.attributes[0].name == "<script>alert(1)</script>"
    assert ps.attributes[1].name == "../../etc"


def test_an_oracle_for_an_attribute_the_prompts_lack_is_skipped_with_a_note(capsys):
    """One config serves several prompt sets: the demo's oracles name its four attributes, and an audit
    of another set runs, saying which oracle it leaves out."""
    config = load_config("demo", {"prompts": {"domain": "a small plain green square on a white background",
                                              "attributes": [{"name": "red", "prompt": "a small plain red square on a "
                                                                                       "white background"}]}})
    assert list(config.oracle) == ["red"]
    assert capsys.readouterr().err == ""  # said once the run starts, so that a later refusal stays one line
    assert len(config.notes) == 3 and "oracle.blue background" in config.notes[0] and "not used" in config.notes[0]
    assert config.overridden == ["prompts"]


def test_the_oracle_notes_are_printed_when_the_run_starts_not_before_a_refusal(tmp_path):
    from click.testing import CliRunner

    from zoom.cli import main

    prompts = tmp_path / "p.yaml"
    prompts.write_text("domain: a small plain green square on a white background\n"
                       "attributes:\n  - name: hat\n    prompt: a small plain green square wearing a hat\n")
    refused = CliRunner().invoke(main, ["audit", "--config", "demo", "--prompts", str(prompts), "--samples", "1",
                                        "--out", str(tmp_path / "run")])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.stderr  # the error line only
    prompts.write_text("domain: a small plain green square on a white background\n"
                       "attributes:\n  - name: red\n    prompt: a small plain red square on a white background\n")
    ran = CliRunner().invoke(main, ["audit", "--config", "demo", "--prompts", str(prompts), "--samples", "1",
                                    "--out", str(tmp_path / "ok")])
    assert ran.exit_code == 0, ran.output
    assert ran.stderr.count("zoom: note: config key oracle.") == 3
