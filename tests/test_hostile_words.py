"""Hostile prompts and weights files that used to be accepted or refused for the wrong reason:

- words a tokenizer cannot read (the shapes world's tokenizer knows only the world's words; any
  tokenizer maps characters outside its vocabulary to its unknown token) are refused, naming the words,
  the prompt and the tokenizer, before any image is made;
- a prompt with nothing visible in it (zero-width, control or blank characters only) is refused when the
  prompt file is read, whatever the tokenizer;
- a prompt that encodes exactly like the domain is refused with its true token count;
- a weights file that is a pickle of Python objects is named as such (not blamed on the hub), in zoom's
  one line only.

Every refusal: one `zoom: error:` line, exit code 2, no run directory.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_hostile import TINY, _set, assert_one_line_exit_2, invoke

ROOT = Path(__file__).parents[1]
SHAPES = yaml.safe_load((ROOT / "zoom" / "data" / "prompts" / "shapes.yaml").read_text(encoding="utf-8"))
DOMAIN = SHAPES["domain"]  # "a small plain green square on a white background"
WORLD_WORDS = "use only the words it knows: an, background, black"


def _shapes_with(prompt: str = None, **changes) -> dict:
    """The bundled shapes prompts (every attribute the demo's oracles expect), plus attribute 'hat'."""
    data = json.loads(json.dumps(SHAPES))
    if prompt is not None:
        data["attributes"].append({"name": "hat", "prompt": prompt})
    data.update(changes)
    return data


def _world_audit(tmp_path, prompts: dict):
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump(prompts, allow_unicode=False), encoding="utf-8")
    out = tmp_path / "run"
    return invoke("audit", "--config", "demo", "--prompts", path, "--samples", 1, "--out", out), out


def _tiny_audit(tmp_path, config: dict, prompts: dict | None = None):
    config = json.loads(json.dumps(config))
    if prompts is not None:
        config["prompts"] = prompts
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=False), encoding="utf-8")
    out = tmp_path / "run"
    return invoke("audit", "--config", path, "--samples", 1, "--out", out), out


# ---------------------------------------------------------------------------------------------
# Words the shapes world cannot read (the `demo` config), refused once its tokenizer is loaded

# (id, prompt set, words the error must contain)
WORLD_CASES = [
    ("a-person-wearing-a-hat", _shapes_with("a person wearing a hat"),
     ["attribute 'hat'", "'person', 'wearing' and 'hat'", "generator's tokenizer", "spell them in letters",
      WORLD_WORDS]),
    ("domain-wearing-a-hat", _shapes_with(DOMAIN + " wearing a hat"),
     ["attribute 'hat'", "'wearing' and 'hat'", "generator's tokenizer"]),
    ("only-punctuation", _shapes_with("!!! ???"),
     ["attribute 'hat'", "'!!!' and '???'", "unknown token"]),
    ("zero-width-spaces", _shapes_with("\u200b\u200b"),
     ["the prompt of attribute 'hat'", "empty once invisible characters are removed", "\\u200b\\u200b"]),
    ("zero-width-inside-a-word", _shapes_with(DOMAIN.replace("green", "red\u200b")),
     ["attribute 'hat'", "'\\u200b'", "unknown token"]),
    ("unreadable-domain", _shapes_with(domain="a photo of a person's face"),
     ["the domain", "'person'", "\"'s\"", "'face'"]),
    ("unreadable-null", _shapes_with(null=["a picture of " + DOMAIN, "a snapshot of " + DOMAIN]),
     ["null paraphrase 2", "'snapshot'"]),
]


@pytest.mark.parametrize("case", WORLD_CASES, ids=[c[0] for c in WORLD_CASES])
def test_words_the_world_cannot_read_are_refused_before_any_image(case, tmp_path, workdir):
    name, prompts, words = case
    result, out = _world_audit(tmp_path, prompts)
    assert_one_line_exit_2(result, *words)
    assert not out.exists() and list(workdir.iterdir()) == []


def test_a_prompt_the_world_reads_like_the_domain_gets_its_true_token_count(tmp_path, workdir):
    """Upper case reads as the domain's 11 tokens (start and end included), far below the limit of 16:
    the message must not blame the token limit."""
    result, out = _world_audit(tmp_path, _shapes_with(DOMAIN.upper()))
    assert_one_line_exit_2(result, "attribute 'hat'", "encodes exactly like the domain", "same 11 tokens")
    assert "first 16" not in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Empty prompts on the tiny models (a real CLIP BPE tokenizer): refused when the prompt file is read

TINY_DOMAIN = TINY["prompts"]["domain"]
TINY_ATTRIBUTES = TINY["prompts"]["attributes"]

# (id, prompt set, words)
EMPTY_CASES = [
    ("zero-width-attribute", {"domain": TINY_DOMAIN, "attributes": [*TINY_ATTRIBUTES, {"name": "hat2", "prompt": "\u200b\u200b"}]},
     ["the prompt of attribute 'hat2'", "empty once invisible"]),
    ("control-attribute", {"domain": TINY_DOMAIN, "attributes": [{"name": "ctl", "prompt": "\x01\x02\x7f\x1b[0m"}]},
     ["the prompt of attribute 'ctl'", "empty once invisible"]),
    ("joiners-bom-filler", {"domain": TINY_DOMAIN, "attributes": [{"name": "blank", "prompt": "\ufeff\u2060\u200d \u3164\u00ad"}]},
     ["the prompt of attribute 'blank'", "empty once invisible"]),
    ("zero-width-domain", {"domain": "\u200b \u200c", "attributes": TINY_ATTRIBUTES},
     ["the domain is empty once invisible"]),
    ("control-domain", {"domain": "\x01\x02", "attributes": TINY_ATTRIBUTES},
     ["the domain is empty once invisible"]),
    ("zero-width-null", {"domain": TINY_DOMAIN, "attributes": TINY_ATTRIBUTES, "null": "\u200b"},
     ["the null paraphrase is empty once invisible"]),
    ("zero-width-null-in-a-list", {"domain": TINY_DOMAIN, "attributes": TINY_ATTRIBUTES,
                                   "null": ["a picture of a person's face", "\u2060\u200b"]},
     ["null paraphrase 2 is empty once invisible"]),
]


@pytest.mark.parametrize("case", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_prompts_with_nothing_visible_are_refused_for_every_tokenizer(case, tmp_path, workdir):
    name, prompts, words = case
    result, out = _tiny_audit(tmp_path, TINY, prompts)
    assert_one_line_exit_2(result, *words)
    assert not out.exists() and list(workdir.iterdir()) == []


def test_a_14_token_prompt_that_reads_like_the_domain_is_not_blamed_on_the_77_token_limit(tmp_path, workdir):
    domain = "a photo of a person's face with short hair and hat"  # 12 tokens + start + end = 14
    prompts = {"domain": domain, "attributes": [{"name": "shouting", "prompt": domain.upper()}]}
    result, out = _tiny_audit(tmp_path, TINY, prompts)
    assert_one_line_exit_2(result, "attribute 'shouting'", "encodes exactly like the domain", "same 14 tokens")
    assert "first 77" not in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Every text encoder that reads a prompt: the guide and the judge CLIPs too


def test_the_guide_clip_tokenizer_is_checked(tmp_path, workdir):
    """The tiny generator reads the face prompts (BPE); a guide with the world's tokenizer cannot."""
    config = _set(json.loads(json.dumps(TINY)), "guide.model", "local-dir:${ZOOM_WORLD}/guide")
    result, out = _tiny_audit(tmp_path, config)
    assert_one_line_exit_2(result, "the domain", "'person'", "guide CLIP's tokenizer (guide.model)")
    assert not out.exists()


def test_the_judge_clip_tokenizer_is_checked(tmp_path, workdir):
    config = _set(json.loads(json.dumps(TINY)), "judge.model", "local-dir:${ZOOM_WORLD}/judge")
    result, out = _tiny_audit(tmp_path, config)
    assert_one_line_exit_2(result, "the domain", "'face'", "judge CLIP's tokenizer (judge.model)")
    assert not out.exists()


def test_what_each_tokenizer_reads(tiny):
    """Unit level: a BPE tokenizer reads any word (pieces are its normal way); the world's word-level one
    reads only its words; the judge is not asked about null paraphrases, which it never reads."""
    import open_clip
    from transformers import CLIPTokenizer

    from zoom.errors import ZoomError
    from zoom.prompts import load_prompts
    from zoom.words import check_readable, unreadable_words
    from zoom.world import models_dir

    bpe = CLIPTokenizer.from_pretrained(tiny["sd"] / "tokenizer")
    world = open_clip.get_tokenizer(f"local-dir:{models_dir() / 'judge'}")
    for prompt in ("a person wearing a hat", "!!! ???", "a photo of a person's face"):
        assert unreadable_words(bpe, prompt) == ([], [], False)
    assert unreadable_words(world, "a person wearing a hat") == (["person", "wearing", "hat"], [], True)
    assert unreadable_words(world, "!!! ???") == ([], ["!!!", "???"], True)
    assert unreadable_words(world, DOMAIN) == ([], [], True)
    for name in ("shapes",):
        check_readable(load_prompts(name), world, "world")  # the bundled world prompts pass
    check_readable(load_prompts(TINY["prompts"]), bpe, "tiny")  # and the tiny config's on its BPE tokenizer
    odd_null = load_prompts(_shapes_with(null="a snapshot of " + DOMAIN))
    check_readable(odd_null, world, "judge", nulls=False)
    with pytest.raises(ZoomError, match="the null paraphrase.*'snapshot'"):
        check_readable(odd_null, world, "guide")


# ---------------------------------------------------------------------------------------------
# Pickled weights files: named as pickles, never unpickled, never blamed on the hub


def _pickle(path: Path, obj=None) -> Path:
    """A real PyTorch checkpoint that weights-only loading refuses: a state dict plus training options."""
    state = {"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}
    torch.save(obj if obj is not None else {"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)
    return path


def _assert_pickle_named(result, *words):
    assert_one_line_exit_2(result, "is a pickle", "safetensors or weights-only", *words)
    assert "HF_HUB_OFFLINE" not in result.stderr


def test_torchvision_weights_file_that_is_a_pickle(tmp_path, workdir):
    weights = _pickle(tmp_path / "resnet18-finetuned.pth")
    config = _set(json.loads(json.dumps(TINY)), "target.spec", f"torchvision:resnet18:{weights}")
    result, out = _tiny_audit(tmp_path, config)
    _assert_pickle_named(result, "target weights", "resnet18-finetuned.pth", "argparse.Namespace")
    assert not out.exists()


def test_timm_weights_file_that_is_a_pickle(tmp_path, workdir):
    weights = _pickle(tmp_path / "whole-model.pt", torch.nn.Linear(4, 10))  # a whole nn.Module, pickled
    config = _set(json.loads(json.dumps(TINY)), "target.spec", f"timm:resnet18:{weights}")
    result, out = _tiny_audit(tmp_path, config)
    _assert_pickle_named(result, "target weights", "whole-model.pt", "torch.nn.modules.linear.Linear")
    assert not out.exists()


def test_clip_pretrained_file_that_is_a_pickle(tmp_path, workdir):
    weights = _pickle(tmp_path / "clip.pt")
    config = _set(json.loads(json.dumps(TINY)), "guide", {"model": "RN50", "pretrained": str(weights)})
    result, out = _tiny_audit(tmp_path, config)
    _assert_pickle_named(result, "CLIP model", "RN50", "clip.pt")
    assert not out.exists()


def test_clip_local_dir_whose_weights_are_a_pickle(tmp_path, workdir, tiny):
    folder = tmp_path / "judge"
    folder.mkdir()
    shutil.copy(tiny["judge"] / "open_clip_config.json", folder)
    _pickle(folder / "open_clip_pytorch_model.bin")
    config = _set(json.loads(json.dumps(TINY)), "judge.model", f"local-dir:{folder}")
    result, out = _tiny_audit(tmp_path, config)
    _assert_pickle_named(result, "CLIP model", "open_clip_pytorch_model.bin")
    assert not out.exists()


def test_a_state_dict_that_does_not_fit_is_not_blamed_on_the_hub(tmp_path, workdir):
    """A weights-only file is read; when its tensors do not fit the model, the error says that, not
    "HF_HUB_OFFLINE is set and it is not in the local cache"."""
    weights = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(2, 2)}, weights)
    config = _set(json.loads(json.dumps(TINY)), "target.spec", f"torchvision:resnet18:{weights}")
    result, out = _tiny_audit(tmp_path, config)
    assert_one_line_exit_2(result, "target.spec", "torchvision:resnet18:", "loading state_dict")
    assert "HF_HUB_OFFLINE" not in result.stderr
    assert not out.exists()


def _zoom_subprocess(*args, cwd):
    """zoom in its own process: diffusers logs through handlers bound to the real stderr, which only a
    subprocess captures."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "zoom", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_generator_whose_unet_weights_are_a_pickle_gets_zoom_line_only(legacy, tmp_path, workdir, tiny):
    """unet/diffusion_pytorch_model.bin is a pickle. The zip format is refused before diffusers is asked;
    the legacy format (which cannot be checked without reading it all) fails inside diffusers, whose own
    error lines are silenced: either way zoom's line is the only one."""
    folder = tmp_path / "sd"
    shutil.copytree(tiny["sd"], folder)
    from safetensors.torch import load_file

    unet = folder / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, unet / "diffusion_pytorch_model.bin",
               _use_new_zipfile_serialization=not legacy)
    config = _set(json.loads(json.dumps(TINY)), "generator.model", str(folder))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    out = tmp_path / "run"
    done = _zoom_subprocess("audit", "--config", path, "--samples", 1, "--out", out, cwd=workdir)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("zoom: error: generator.model"), done.stderr
    for word in ("diffusion_pytorch_model.bin", "is a pickle", "argparse.Namespace", "safetensors"):
        assert word in lines[0], (word, lines[0])
    assert "HF_HUB_OFFLINE" not in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and list(workdir.iterdir()) == []
