"""Tiny random models of the real architectures, written in their libraries' own formats.

Tests and `zoom demo` load these through exactly the code that loads real hub models:
a Stable-Diffusion-style pipeline (`save_pretrained`), two open_clip models (`local-dir:` folders
with open_clip_config.json + safetensors) and a transformers image classifier. Shapes live in
zoom/data/*.json; weights come from fixed seeds, so every build is bit-identical. The CLIP
tokenizer is a real one, written from the BPE vocabulary that ships inside open_clip.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

# Bump when any tiny model changes, so stale caches are not reused.
TINY_VERSION = 3
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"


def default_cache_dir() -> Path:
    root = os.environ.get("ZOOM_CACHE") or os.path.join(Path.home(), ".cache", "zoom")
    return Path(root) / f"tiny-v{TINY_VERSION}"


def _shape(name: str) -> dict:
    return json.loads(resources.files("zoom.data").joinpath(name).read_text())


def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, rebuilt from open_clip's bpe_simple_vocab_16e6.txt.gz.

    Same construction as open_clip's SimpleTokenizer: the 256 byte characters, the same with
    `</w>`, one token per merge (48,894 merges), then the two special tokens (49406, 49407).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path) -> None:
    """A transformers CLIPTokenizer whose ids equal open_clip's tokenizer on cleaned text."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    raw = Path(folder) / "raw"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # Pad with <|endoftext|>: a "!" pad token (as some SD repos use) corrupts prompts containing "!".
    tokenizer = CLIPTokenizer.from_pretrained(
        raw, model_max_length=77, pad_token=END_OF_TEXT, unk_token=END_OF_TEXT,
        bos_token=START_OF_TEXT, eos_token=END_OF_TEXT,
    )
    tokenizer.save_pretrained(folder)
    shutil.rmtree(raw)


def _build_sd(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    shape = _shape("tiny_sd.json")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shape["unet"])
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):  # cross-attention output projections
                module.weight.mul_(shape["cross_attention_out_scale"])
    torch.manual_seed(1)
    vae = AutoencoderKL(**shape["vae"])
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**shape["text_encoder"]))
    write_clip_tokenizer(folder / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tokenizer")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(**shape["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd", safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer")
    torch.manual_seed(6)
    AutoencoderTiny(**shape["taesd"]).save_pretrained(folder / "taesd", safe_serialization=True)


def _build_open_clip(folder: Path, shape_file: str, seed: int) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    config = _shape(shape_file)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config["model_cfg"])
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")


def _build_target(folder: Path) -> None:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    shape = _shape("tiny_target.json")
    labels = [f"class_{i}" for i in range(shape["model"]["num_labels"])]
    config = ResNetConfig(**shape["model"], id2label=dict(enumerate(labels)),
                          label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(3)
    model = ResNetForImageClassification(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(**shape["processor"]).save_pretrained(folder)


def is_tiny_model(path) -> bool:
    """Whether a model folder belongs to a build of these tiny random models."""
    marker = Path(os.path.expanduser(str(path))).parent / "COMPLETE"
    try:
        return marker.read_text().startswith("zoom tiny models")
    except OSError:
        return False


def build_tiny_models(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Build (once) and return the folders of the tiny models: sd, taesd, guide, judge, target."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    paths = {"sd": root / "sd", "taesd": root / "taesd", "guide": root / "guide", "judge": root / "judge",
             "target": root / "target"}
    if (root / "COMPLETE").exists():
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and rename, so a killed build never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        _build_sd(tmp)
        _build_open_clip(tmp / "guide", "tiny_clip_guide.json", seed=4)
        _build_open_clip(tmp / "judge", "tiny_clip_judge.json", seed=5)
        _build_target(tmp / "target")
        (tmp / "COMPLETE").write_text(f"zoom tiny models v{TINY_VERSION}\n")
        try:
            tmp.rename(root)
        except OSError:  # another process finished first; its build is identical
            if not (root / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
