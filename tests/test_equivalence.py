"""zoom's components against code no one here wrote: the diffusers pipeline, open_clip, torchvision,
timm and transformers, on the same inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

SEEDS = [0, 7, 1234]
DOMAIN = "a photo of a person's face"
# Base images across batch sizes: one generator per seed makes the initial noise identical, bit for bit;
# the UNet's and the VAE's batched kernels then round differently from unbatched ones, so the images agree
# to float rounding only (measured: at most 9.8e-6 on the tiny models, 2.7e-6 on the world, 1 thread).
BATCH_TOLERANCE = 2e-5


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("guidance_scale", [0.0, 4.5])
def test_generator_at_alpha_zero_equals_the_diffusers_pipeline(tiny, steps, guidance_scale):
    from diffusers import StableDiffusionPipeline

    from zoom.generator import Generator

    gen = Generator.from_pretrained(str(tiny["sd"]), steps=steps, guidance_scale=guidance_scale)
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd"], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ours = gen.images(SEEDS, gen.embed(DOMAIN).expand(len(SEEDS), -1, -1))  # one batch of three seeds
    for i, seed in enumerate(SEEDS):
        reference = pipe(DOMAIN, num_inference_steps=steps, guidance_scale=guidance_scale,
                         generator=torch.Generator().manual_seed(seed), output_type="pt").images[0]
        error = (ours[i] - reference).abs().max().item()
        print(f"steps={steps} guidance={guidance_scale} seed={seed} max|ours - pipeline| = {error:.2e}")
        assert error <= BATCH_TOLERANCE  # one batch of three against the pipeline's batches of one
    assert ours.std(0).mean() > 0.01, "different seeds must give different images"


@pytest.mark.parametrize("model", ["tiny-1-step", "tiny-2-steps-cfg", "world"])
def test_base_images_across_batch_sizes_agree_to_float_rounding(tiny, model):
    from zoom import world
    from zoom.generator import Generator

    folder, steps, guidance, prompt = {
        "tiny-1-step": (tiny["sd"], 1, 0.0, DOMAIN), "tiny-2-steps-cfg": (tiny["sd"], 2, 4.5, DOMAIN),
        "world": (world.models_dir() / "sd", 8, 3.0, "a small plain green square on a white background")}[model]
    gen = Generator.from_pretrained(str(folder), steps=steps, guidance_scale=guidance)
    cond = gen.embed(prompt)
    seeds = list(range(8))
    with torch.no_grad():
        noise = gen.initial_noise(seeds)
        assert all(torch.equal(noise[i], gen.initial_noise([s])[0]) for i, s in enumerate(seeds))  # exact
        together = gen.images(seeds, cond.expand(8, -1, -1))
        alone = torch.cat([gen.images([s], cond) for s in seeds])
        pairs = torch.cat([gen.images(seeds[i:i + 2], cond.expand(2, -1, -1)) for i in range(0, 8, 2)])
    errors = [(together - alone).abs().max().item(), (together - pairs).abs().max().item()]
    print(f"{model}: max |batch 8 - batch 1| = {errors[0]:.2e}, |batch 8 - batch 2| = {errors[1]:.2e}")
    assert max(errors) <= BATCH_TOLERANCE
    assert together.std(0).mean() > 0.01, "different seeds must give different images"


def test_text_embeddings_are_the_pipelines_own_and_cached(tiny):
    from diffusers import StableDiffusionPipeline

    from zoom.generator import Generator

    gen = Generator.from_pretrained(str(tiny["sd"]))
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd"], safety_checker=None, requires_safety_checker=False)
    reference, _ = pipe.encode_prompt(DOMAIN, "cpu", 1, False)
    assert torch.equal(gen.embed(DOMAIN), reference)
    assert gen.embed(DOMAIN) is gen.embed(DOMAIN)


@pytest.mark.parametrize("which", ["guide", "judge"])
def test_clip_embeddings_equal_open_clips_own(tiny, which):
    import open_clip

    from zoom.guide import Clip

    name = f"local-dir:{tiny[which]}"
    ours = Clip.load(name)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    side = ours.image_size[0]
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (side * 2, side * 2, 3), dtype=np.uint8)) for _ in range(2)]
    tensors = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pil])
    texts = [DOMAIN, "a photo of a smiling person's face!", "rain & fog"]
    with torch.no_grad():
        image_ref = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        text_ref = model.encode_text(tokenizer(texts), normalize=True)
        image_ours = ours.embed_images(tensors)
    # open_clip resizes PIL images, we resize tensors in the graph: equal up to resampling differences.
    cos = (image_ours * image_ref).sum(-1)
    print(f"{which}: image embedding cosine to open_clip's = {cos.tolist()}")
    assert cos.min() > 0.999
    # At the model's own resolution no resampling happens: the embeddings are open_clip's exactly.
    exact = tensors[:, :, :side, :side]
    with torch.no_grad():
        exact_ref = model.encode_image(preprocess.transforms[-1](exact), normalize=True)
        assert (ours.embed_images(exact) - exact_ref).abs().max() < 1e-5
    assert (ours.embed_texts(texts) - text_ref).abs().max() < 1e-5


def test_torchvision_target_equals_torchvision_and_its_transforms(mobilenet_v2_weights):
    import skimage.data
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    from zoom.targets import load_target

    target = load_target(f"torchvision:mobilenet_v2:{mobilenet_v2_weights}")
    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    reference = mobilenet_v2()
    reference.load_state_dict(torch.load(mobilenet_v2_weights, weights_only=True))
    reference.eval()
    x = torch.rand(2, 3, 300, 260, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (target(x) - reference(weights.transforms()(x))).abs().max() < 1e-4
    expected = {"coffee": "espresso", "chelsea": "Egyptian cat"}
    for name, label in expected.items():
        pil = Image.fromarray(getattr(skimage.data, name)())
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()[None] / 255
        with torch.no_grad():
            ours = target(x).topk(5).indices[0].tolist()
            theirs = reference(weights.transforms()(pil)[None]).topk(5).indices[0].tolist()
        print(name, [target.label(i) for i in ours])
        assert ours == theirs
        assert target.label(ours[0]) == label


def test_timm_target_equals_timm_with_its_own_transform(tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.data import create_transform, resolve_data_config

    from zoom.targets import load_target

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=7).eval()
    path = tmp_path / "resnet10t.safetensors"
    save_file(model.state_dict(), str(path))
    target = load_target(f"timm:resnet10t:{path}")
    cfg = resolve_data_config(model=model)
    transform = create_transform(**cfg)
    scale = int(cfg["input_size"][1] / cfg["crop_pct"])
    rng = np.random.default_rng(1)
    pil = Image.fromarray(rng.integers(0, 256, (scale, scale, 3), dtype=np.uint8))
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        ours, theirs = target(x), model(transform(pil)[None])
    assert ours.shape == theirs.shape == (1, 7)
    assert (ours - theirs).abs().max() < 1e-4


def test_hf_target_equals_transformers_with_its_image_processor(tiny):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from zoom.targets import load_target

    target = load_target(f"hf:{tiny['target']}")
    model = AutoModelForImageClassification.from_pretrained(tiny["target"]).eval()
    processor = AutoImageProcessor.from_pretrained(tiny["target"])
    rng = np.random.default_rng(2)
    pil = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    x = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pil])
    with torch.no_grad():
        theirs = model(**processor(images=pil, return_tensors="pt")).logits
        ours = target(x)
    assert (ours - theirs).abs().max() < 1e-4
    assert target.labels[:2] == ["class_0", "class_1"]


def test_tiny_tokenizer_ids_equal_open_clips(tiny):
    import open_clip
    from transformers import CLIPTokenizer

    from zoom.prompts import clean_prompt

    tokenizer = CLIPTokenizer.from_pretrained(tiny["sd"] / "tokenizer")
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert len(tokenizer) == 49408
    for text in ["a photo of a person's face", "Hello   WORLD!! it's 3.5 x", "rain &amp; fog; snow?",
                 "caf\u00e9 na\u00efve \u201cquoted\u201d", "!!! wow !!!"]:
        ours = tokenizer(clean_prompt(text), padding="max_length", max_length=77, truncation=True).input_ids
        theirs = open_clip.tokenize([text])[0].tolist()
        end = theirs.index(49407) + 1
        assert ours[:end] == theirs[:end], text
        assert set(ours[end:]) <= {49407}  # padded with <|endoftext|>, never with "!" (id 0)
