"""The trained shapes world (zoom/data/world, made by tools/train_world.py; CI loads it, never trains).

- its files are the ones its manifest names, and small enough to ship;
- its models load through the same code as hub models, and zoom's generator reproduces the diffusers
  pipeline's own images from them;
- the quality bars hold on fresh samples and fresh rendered images, scored by the world's oracles;
- ZOOM's imbalanced-data protocol: an audit finds the bias trained into a target (tests/world_audits.py
  runs the audits once per session).
"""

import hashlib
import json

import numpy as np
import pytest
import torch

from zoom import world
from zoom.world import ATTRIBUTES, Scene, caption, render

WORLD = world.models_dir()
MANIFEST = json.loads((WORLD / "MANIFEST.json").read_text())
QUALITY = json.loads((WORLD / "quality.json").read_text())
NAMES = list(ATTRIBUTES)


def test_manifest_names_every_file_with_its_hash_and_the_world_is_small():
    files = sorted(str(p.relative_to(WORLD)) for p in WORLD.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    assert files == sorted(MANIFEST["files"])
    for name, digest in MANIFEST["files"].items():
        assert hashlib.sha256((WORLD / name).read_bytes()).hexdigest() == digest, name
    assert MANIFEST["bytes"] <= 20_000_000 and "train_world.py" in MANIFEST["command"]


def test_every_caption_word_is_one_token_for_both_libraries():
    import open_clip
    from transformers import CLIPTokenizer

    sd = CLIPTokenizer.from_pretrained(WORLD / "sd" / "tokenizer")
    clip = open_clip.get_tokenizer(f"local-dir:{WORLD / 'guide'}")
    for word in world.VOCABULARY:
        assert len(sd.tokenize(word)) == 1, word
    text = "a large striped red circle on a blue background"
    ids, expected = clip([text])[0], sd(text).input_ids  # start, nine words, end
    assert len(expected) == 11 and ids[:11].tolist() == expected
    assert int(ids[:11].argmax()) == 10  # open_clip pools at the end token, the highest id


def test_zoom_generator_reproduces_the_diffusers_pipeline_on_the_world():
    from diffusers import StableDiffusionPipeline

    from zoom.generator import Generator

    pipe = StableDiffusionPipeline.from_pretrained(WORLD / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ours = Generator.from_pretrained(str(WORLD / "sd"), steps=8, guidance_scale=3.0)
    seeds = [3, 4]
    prompt = "a striped square"
    theirs = pipe([prompt] * 2, num_inference_steps=8, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images
    with torch.no_grad():
        mine = ours.images(seeds, ours.embed(prompt).expand(2, -1, -1))
    assert (mine - theirs).abs().max() < 1e-4


def _oracle(name, images):
    from zoom.targets import load_target

    with torch.no_grad():
        return load_target(f"hf:{WORLD / 'oracles' / name}")(images).argmax(1).numpy()


def test_quality_bars_as_measured_and_on_fresh_samples():
    """README's bars, as tools/train_world.py measured them (quality.json), and again here on 48 fresh
    samples of held-out combinations (a looser bound: 48 samples are noisy)."""
    for group in ("generated_seen", "generated_held_out"):
        assert all(QUALITY[group][n] >= 0.9 for n in NAMES), QUALITY[group]
        assert QUALITY[group]["all"] >= 0.8, QUALITY[group]
    # The judge meets the 95 % zero-shot bar; the guide misses it on one attribute (shape, 93.5 %:
    # small squares read as circles), as README says. The guide only steers, the judge scores.
    assert min(QUALITY["clip_judge_zero_shot"].values()) >= 0.95, QUALITY["clip_judge_zero_shot"]
    assert min(QUALITY["clip_guide_zero_shot"].values()) >= 0.93, QUALITY["clip_guide_zero_shot"]
    assert all(v["turned_on"] >= 0.9 for v in QUALITY["interpolation"].values()), QUALITY["interpolation"]

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(WORLD / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(2026)
    items = []
    while len(items) < 48:
        a = {n: ATTRIBUTES[n][rng.integers(len(ATTRIBUTES[n]))] for n in NAMES}
        if world.held_out(a["shape"], a["colour"], a["background"]):
            items.append(a)
    images = pipe([caption(a) for a in items], num_inference_steps=8, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(5000 + i) for i in range(len(items))],
                  output_type="pt").images
    right = np.stack([_oracle(n, images) == np.array([ATTRIBUTES[n].index(a[n]) for a in items]) for n in NAMES], 1)
    print(f"\nfresh held-out samples: {dict(zip(NAMES, right.mean(0).round(3)))}, all {right.all(1).mean():.3f}")
    assert right.mean(0).min() >= 0.8 and right.all(1).mean() >= 0.6


def test_clips_and_oracles_on_fresh_rendered_images():
    import open_clip

    from zoom.guide import Clip

    scenes = [Scene.from_seed(10_000 + i) for i in range(400)]
    x = torch.from_numpy(np.stack([render(s).image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    truth = {n: np.array([ATTRIBUTES[n].index(getattr(s, n)) for s in scenes]) for n in NAMES}
    for n in NAMES:
        assert (_oracle(n, x) == truth[n]).mean() >= 0.98, n
    for which in ("guide", "judge"):
        clip = Clip.load(f"local-dir:{WORLD / which}")
        with torch.no_grad():
            img = clip.embed_images(x)
            for n in NAMES:
                texts = clip.embed_texts([caption({n: v}) for v in ATTRIBUTES[n]])
                accuracy = ((img @ texts.T).argmax(1).numpy() == truth[n]).mean()
                assert accuracy >= (0.93 if which == "judge" else 0.9), (which, n, accuracy)
    del open_clip


def test_the_targets_learned_what_their_data_taught():
    """Balanced: right on every group. Biased (red circles at p = 0.95): right on the common groups, worse
    on the groups that break the correlation (red squares and triangles, circles of other colours)."""
    from zoom.targets import load_target

    scenes = [Scene.from_seed(20_000 + i) for i in range(600)]
    x = torch.from_numpy(np.stack([render(s).image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    shape = np.array([ATTRIBUTES["shape"].index(s.shape) for s in scenes])
    red = np.array([s.colour == "red" for s in scenes])
    circle = shape == 0
    breaking = (red & ~circle) | (~red & circle)
    accuracy = {}
    for name in ("shape-balanced", "shape-red-circles-p95"):
        with torch.no_grad():
            pred = load_target(f"hf:{WORLD / 'targets' / name}")(x).argmax(1).numpy()
        accuracy[name] = ((pred == shape).mean(), (pred == shape)[breaking & red].mean())
    print(f"\naccuracy (all, red squares and triangles): {accuracy}")
    assert accuracy["shape-balanced"][0] >= 0.97 and accuracy["shape-balanced"][1] >= 0.95
    assert accuracy["shape-red-circles-p95"][1] < accuracy["shape-balanced"][1]
