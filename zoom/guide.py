"""open_clip models as differentiable judges of images: the guide that steers the search, and a
second, different CLIP that scores validity (does the counterfactual show the attribute?).

Preprocessing runs in torch inside the graph (resize the shortest side, centre-crop, normalise,
with the model's own preprocess config), so gradients reach the image. Embeddings equal
open_clip's own `encode_image` / `encode_text` (tests/test_equivalence.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from .errors import ZoomError, load_failure, shown, shown_path

LOCAL_DIR = "local-dir:"


class Clip:
    def __init__(self, model, tokenizer, device="cpu", name: str = ""):
        self.model = model.requires_grad_(False).eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.name = name
        cfg = model.visual.preprocess_cfg
        size = cfg["size"]
        self.image_size = size if isinstance(size, int) else tuple(size)
        self.mean, self.std = list(cfg["mean"]), list(cfg["std"])
        self.interpolation = (InterpolationMode.BILINEAR if cfg.get("interpolation") == "bilinear"
                              else InterpolationMode.BICUBIC)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, model: str, pretrained: str | None = None, device="cpu"):
        """Through open_clip's one factory: a built-in name with a tag or weights file, or local-dir:PATH."""
        import open_clip

        if model.startswith(LOCAL_DIR):
            folder = os.path.expanduser(model[len(LOCAL_DIR):])
            if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
                raise ZoomError(f"CLIP model {shown(model)}: no open_clip_config.json in {shown_path(folder)}")
            model, pretrained = LOCAL_DIR + folder, None
        elif pretrained and os.sep in pretrained and not os.path.isfile(os.path.expanduser(pretrained)):
            raise ZoomError(f"CLIP pretrained weights file {shown_path(pretrained)} does not exist")
        from .weights import refuse_pickle, refuse_pickled_files

        if model.startswith(LOCAL_DIR):  # a pickle is refused before the model is built
            refuse_pickled_files(model[len(LOCAL_DIR):], "CLIP model", model)
        elif pretrained and os.path.isfile(os.path.expanduser(pretrained)):
            refuse_pickle(pretrained, "CLIP model", f"{model} ({pretrained})")
        try:
            # require_pretrained: a built-in name without weights would silently be a random CLIP
            clip, _, _ = open_clip.create_model_and_transforms(model, pretrained=pretrained or None,
                                                               device=device, require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(model)
        except Exception as e:
            raise load_failure("CLIP model", f"{model} ({pretrained})" if pretrained else model, e) from e
        return cls(clip, tokenizer, device, name=model)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB [B, 3, H, W] in [0, 1] -> the model's normalised input, differentiably."""
        size = self.image_size if isinstance(self.image_size, int) else min(self.image_size)
        x = TF.resize(images, size, interpolation=self.interpolation, antialias=True)
        x = TF.center_crop(x, self.image_size if isinstance(self.image_size, int) else list(self.image_size))
        return TF.normalize(x, self.mean, self.std)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        for text in texts:
            if text not in self._text_cache:
                # One text per call: an embedding must not depend on which texts were cached before.
                with torch.no_grad():  # texts are fixed: their embeddings are constants of the search
                    tokens = self.tokenizer([text]).to(self.device)
                    self._text_cache[text] = F.normalize(self.model.encode_text(tokens).float(), dim=-1)[0]
        return torch.stack([self._text_cache[t] for t in texts])

    def text_direction(self, source: str, target: str) -> torch.Tensor:
        """Unit vector from one prompt's embedding to another's (the attribute's direction)."""
        a, b = self.embed_texts([source, target])
        return F.normalize(b - a, dim=-1)

    def attribute_score(self, images: torch.Tensor, domain: str, attribute: str) -> torch.Tensor:
        """How much more the images match the attribute prompt than the domain prompt (cosine units)."""
        img = self.embed_images(images)
        text = self.embed_texts([domain, attribute])
        return img @ text[1] - img @ text[0]


def directional_loss(image_emb: torch.Tensor, base_emb: torch.Tensor, text_dir: torch.Tensor,
                     eps: float = 1e-4) -> torch.Tensor:
    """1 - cos(image change, text change), per sample; text_dir is [E] or per-sample [B, E] unit vectors.

    The norm of the image change is guarded: at zero edit the change is exactly zero and an
    unguarded normalisation has exploding gradients (edits also start away from zero).
    """
    change = image_emb - base_emb
    change = change / change.norm(dim=-1, keepdim=True).clamp_min(eps)
    return 1 - (change * text_dir).sum(-1)
