"""Stable-Diffusion-family components -> a differentiable few-step sampler.

Read top to bottom like a diffusers pipeline: encode prompt, timesteps, prepare latents,
denoising loop, decode. The difference is that nothing here runs under `no_grad`: gradients
flow from the decoded image back to the edit parameters (text-conditioning weights and a
latent residual). The scheduler is used only through `set_timesteps` / `scale_model_input` /
`step`, and `set_timesteps` is called before every pass because schedulers keep a step counter.

At alpha = 0 the image equals `StableDiffusionPipeline(...)(prompt, num_inference_steps=k,
guidance_scale=g, generator=torch.Generator().manual_seed(seed), output_type="pt")` for every
seed, whatever the batch size (tests/test_equivalence.py).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import ZoomError, load_failure, looks_like_path, shown, shown_path


class Generator:
    def __init__(self, pipe, *, steps: int, guidance_scale: float, resolution: int, device="cpu",
                 loop_decoder=None, gradient_checkpointing: bool = False):
        self.pipe = pipe
        self.unet, self.vae, self.scheduler = pipe.unet, pipe.vae, pipe.scheduler
        # A fast decoder (diffusers' AutoencoderTiny, TAESD) for images inside the search loop;
        # saved images and the final flip check always use the full VAE.
        self.loop_decoder = loop_decoder
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self.device = torch.device(device)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % self.vae_scale_factor:
            raise ZoomError(
                f"generator.resolution={resolution} must be a multiple of the VAE's scale factor "
                f"{self.vae_scale_factor}"
            )
        self._embeds: dict[str, torch.Tensor] = {}
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, loop_decoder):
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)
        if gradient_checkpointing:  # recompute activations in backward: less memory, ~30% more time
            for module in (self.unet, self.vae, loop_decoder):
                if module is not None:
                    module.enable_gradient_checkpointing()

    @classmethod
    def from_pretrained(cls, model: str, *, revision: str | None = None, steps: int = 1,
                        guidance_scale: float = 0.0, resolution: int | None = None, device="cpu",
                        loop_decoder: str | None = None, gradient_checkpointing: bool = False):
        """Load a Stable-Diffusion-family pipeline (hub id or local folder) with diffusers."""
        from diffusers import StableDiffusionPipeline

        if looks_like_path(model) and not os.path.isdir(os.path.expanduser(model)):
            raise ZoomError(f"generator.model: folder {shown_path(model)} does not exist; give a diffusers folder or hub id")
        try:
            index = StableDiffusionPipeline.load_config(os.path.expanduser(model), revision=revision)
        except Exception as e:
            raise load_failure("generator.model", model, e) from e
        if index.get("text_encoder_2") or "XL" in str(index.get("_class_name", "")):
            raise ZoomError(f"generator.model: {shown(model)} is an SDXL-class pipeline ({index.get('_class_name')}); "
                            "zoom supports the Stable Diffusion 1.x/2.x family (e.g. stabilityai/sd-turbo) for now")
        from .weights import refuse_pickled_files, refuse_pickled_folder

        refuse_pickled_folder(model, "generator.model", model)  # before diffusers speaks or loads anything
        try:
            with _library_logs_silenced():  # zoom's one line says what failed, not diffusers' lines before it
                pipe = StableDiffusionPipeline.from_pretrained(
                    os.path.expanduser(model), revision=revision,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                )
        except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variously
            raise load_failure("generator.model", model, e) from e
        pipe.set_progress_bar_config(disable=True)
        if resolution is None:
            resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        tiny_decoder = None
        if loop_decoder:
            from diffusers import AutoencoderTiny

            if looks_like_path(loop_decoder) and not os.path.isdir(os.path.expanduser(loop_decoder)):
                raise ZoomError(f"generator.loop_decoder: folder {shown_path(loop_decoder)} does not exist")
            refuse_pickled_files(loop_decoder, "generator.loop_decoder", loop_decoder)
            try:
                with _library_logs_silenced():
                    tiny_decoder = AutoencoderTiny.from_pretrained(os.path.expanduser(loop_decoder))
            except Exception as e:
                raise load_failure("generator.loop_decoder", loop_decoder, e) from e
        return cls(pipe, steps=steps, guidance_scale=guidance_scale, resolution=resolution, device=device,
                   loop_decoder=tiny_decoder, gradient_checkpointing=gradient_checkpointing)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    # 1. Encode prompt (cached: every prompt is encoded once per run).
    def embed(self, prompt: str) -> torch.Tensor:
        """`prompt_embeds` [1, tokens, dim] for one prompt, as the pipeline computes them."""
        if prompt not in self._embeds:
            with torch.no_grad():  # the text encoder is frozen and edits act on its output
                embeds, _ = self.pipe.encode_prompt(prompt, self.device, 1, False)
            self._embeds[prompt] = embeds
        return self._embeds[prompt]

    # 2./3. Timesteps and initial latents, one generator per seed as the pipeline with batch size 1.
    def _seed_generators(self, seeds) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    def initial_noise(self, seeds, generators=None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        generators = generators if generators is not None else self._seed_generators(seeds)
        side = self.resolution // self.vae_scale_factor
        shape = (len(generators), self.unet.config.in_channels, side, side)
        return randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)

    # 4. Denoising loop, differentiable.
    def sample_latents(self, seeds, cond: torch.Tensor, latent_delta: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise from each seed's noise (+ latent_delta) under per-sample conditioning cond [B, T, D]."""
        generators = self._seed_generators(seeds)
        self.scheduler.set_timesteps(self.steps, device=self.device)
        noise = self.initial_noise(seeds, generators)
        if latent_delta is not None:
            noise = noise + latent_delta
        latents = noise * self.scheduler.init_noise_sigma
        if self.do_classifier_free_guidance:
            uncond = self.embed("").expand(len(cond), -1, -1)
            cond = torch.cat([uncond, cond])
        step_kwargs = {"generator": generators} if _accepts(self.scheduler.step, "generator") else {}
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=cond, return_dict=False)[0]
            if self.do_classifier_free_guidance:
                uncond_pred, text_pred = noise_pred.chunk(2)
                noise_pred = uncond_pred + self.guidance_scale * (text_pred - uncond_pred)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    # 5. Decode to RGB in [0, 1], as the pipeline's image processor does for output_type="pt".
    def decode(self, latents: torch.Tensor, in_loop: bool = False) -> torch.Tensor:
        """Full VAE (or, in_loop with a loop decoder, TAESD). The SD VAE overflows to NaN/black in
        fp16, so under fp16 autocast it decodes in fp32."""
        decoder = self.loop_decoder if in_loop and self.loop_decoder is not None else self.vae
        fp16 = torch.is_autocast_enabled(self.device.type) and \
            torch.get_autocast_dtype(self.device.type) == torch.float16
        with torch.autocast(self.device.type, enabled=False) if fp16 else contextlib.nullcontext():
            image = decoder.decode(latents.float() / decoder.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def images(self, seeds, cond: torch.Tensor, latent_delta: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.sample_latents(seeds, cond, latent_delta))

    @property
    def unet_calls_per_image(self) -> int:
        return len(self.scheduler.timesteps) if self.scheduler.timesteps is not None else self.steps


@contextlib.contextmanager
def _library_logs_silenced():
    """diffusers and transformers log errors of their own while loading (e.g. "An error occurred while
    trying to fetch ...: no file named diffusion_pytorch_model.safetensors", even for a folder that then
    loads from .bin files); zoom reports a failed load itself, in one line."""
    import logging

    import diffusers
    import transformers

    libraries = (diffusers.utils.logging, transformers.utils.logging)
    levels = [lib.get_verbosity() for lib in libraries]
    for lib in libraries:
        lib.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lib, level in zip(libraries, levels):
            lib.set_verbosity(level)


def _accepts(fn, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters
