"""The shapes world: a procedural image domain with exact ground truth.

Every image is one shape on a flat background, described by five attributes (shape, colour,
background, size, pattern) and a few nuisance values (position, rotation, radius, tint). The
renderer is deterministic: the same `Scene` gives the same pixels, and `Scene.from_seed(seed)`
the same scene. Alongside the image it returns the caption and the ground truth the tasks need:
the shape's mask, box and keypoints.

The models in zoom/data/world (a text-to-image pipeline, two CLIPs, oracles and targets with
known, trained-in biases) were trained on this world by tools/train_world.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges, exact coverage masks

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "colour": ("red", "green", "blue", "yellow", "purple"),
    "background": ("white", "black", "gray", "blue", "orange"),
    "size": ("small", "large"),
    "pattern": ("plain", "striped"),
}
SHAPE_COLOURS = {
    "red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 70, 215),
    "yellow": (235, 205, 30), "purple": (145, 50, 185),
}
# Backgrounds are pale or dark, never the saturated shape colours: a blue square on a blue
# background stays visible.
BACKGROUND_COLOURS = {
    "white": (240, 240, 240), "black": (25, 25, 25), "gray": (125, 125, 125),
    "blue": (165, 200, 245), "orange": (245, 185, 120),
}
RADIUS = {"small": (5.5, 7.0), "large": (10.0, 12.0)}  # circumradius in pixels at 32 px
# Squares stand on a side and triangles on their base, turned by at most ANGLE_JITTER degrees: at
# 32 px a freely rotated small square is hard to tell from a circle, for people and models alike.
UPRIGHT = {"circle": 0.0, "square": 45.0, "triangle": -90.0}
ANGLE_JITTER = 10.0
STRIPE_PERIOD = 4  # pixels at 32 px: 2 coloured, 2 pale
KEYPOINT_NAMES = ("centre", "top", "right", "bottom", "left")
GENERIC_SHAPE = "shape"  # the noun of a caption that does not name the shape
# Openings that say nothing about the image: the models learn to ignore them, which makes
# "a picture of a square" a true paraphrase of "a square" (the null control's prompts).
PREFIXES = ("a picture of", "a drawing of", "an image of", "a photo of")
VOCABULARY = tuple(sorted({w for values in ATTRIBUTES.values() for w in values}
                          | {GENERIC_SHAPE, "a", "on", "background"}
                          | {w for p in PREFIXES for w in p.split()}))


def held_out(shape: str, colour: str, background: str) -> bool:
    """Combinations the text-to-image model and the CLIPs never see in training (about 1 in 8):
    their samples measure whether the models compose attributes rather than memorise captions."""
    key = ATTRIBUTES["shape"].index(shape) * 31 + ATTRIBUTES["colour"].index(colour) * 7 \
        + ATTRIBUTES["background"].index(background) * 3
    return key % 8 == 0


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    pattern: str
    cx: float  # centre, pixels at RESOLUTION
    cy: float
    radius: float
    angle: float  # degrees: where the outline's first vertex points (squares and triangles)
    tint: tuple = (0, 0, 0)  # per-channel jitter of the shape colour
    shade: int = 0  # jitter of the background's brightness

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @classmethod
    def sample(cls, rng: np.random.Generator, **fixed) -> "Scene":
        """A random scene; `fixed` pins attributes (shape="circle", ...) or nuisances."""
        values = {}
        for name, choices in ATTRIBUTES.items():
            values[name] = fixed.pop(name) if name in fixed else choices[rng.integers(len(choices))]
            if values[name] not in choices:
                raise ValueError(f"{name}={values[name]!r} is not one of {choices}")
        lo, hi = RADIUS[values["size"]]
        radius = float(rng.uniform(lo, hi))
        margin = radius + 1.0
        values.update(
            radius=radius,
            cx=float(rng.uniform(margin, RESOLUTION - margin)),
            cy=float(rng.uniform(margin, RESOLUTION - margin)),
            angle=UPRIGHT[values["shape"]] + float(rng.uniform(-ANGLE_JITTER, ANGLE_JITTER)),
            tint=tuple(int(v) for v in rng.integers(-12, 13, size=3)),
            shade=int(rng.integers(-10, 11)),
        )
        values.update(fixed)
        return cls(**values)

    @classmethod
    def from_seed(cls, seed: int, **fixed) -> "Scene":
        return cls.sample(np.random.default_rng(seed), **fixed)

    def replace(self, **changes) -> "Scene":
        """The same scene with some attributes changed (a counterfactual with exact ground truth).
        A size change maps the radius into the new size's range, keeping the centre inside; a shape
        change keeps the tilt."""
        scene = dataclasses.replace(self, **changes)
        if "shape" in changes and changes["shape"] != self.shape and "angle" not in changes:
            scene = dataclasses.replace(scene, angle=self.angle - UPRIGHT[self.shape] + UPRIGHT[scene.shape])
        if "size" in changes and changes["size"] != self.size:
            lo, hi = RADIUS[scene.size]
            frac = (self.radius - RADIUS[self.size][0]) / (RADIUS[self.size][1] - RADIUS[self.size][0])
            radius = lo + frac * (hi - lo)
            margin = radius + 1.0
            scene = dataclasses.replace(scene, radius=radius,
                                        cx=float(np.clip(self.cx, margin, RESOLUTION - margin)),
                                        cy=float(np.clip(self.cy, margin, RESOLUTION - margin)))
        return scene


@dataclass
class Rendered:
    image: np.ndarray  # [H, W, 3] uint8
    mask: np.ndarray  # [H, W] bool: pixels at least half covered by the shape
    box: tuple  # (x0, y0, x1, y1) pixels, x1/y1 exclusive (torchvision's xyxy)
    keypoints: np.ndarray  # [5, 2] (x, y) pixels: KEYPOINT_NAMES
    caption: str


def outline(scene: Scene) -> np.ndarray | None:
    """Polygon vertices [(x, y), ...] in pixels for squares and triangles; None for circles."""
    if scene.shape == "circle":
        return None
    n = 4 if scene.shape == "square" else 3
    start = math.radians(scene.angle)
    return np.array([(scene.cx + scene.radius * math.cos(start + 2 * math.pi * k / n),
                      scene.cy + scene.radius * math.sin(start + 2 * math.pi * k / n)) for k in range(n)])


def keypoints(scene: Scene) -> np.ndarray:
    """Centre, then the top-, right-, bottom- and left-most points of the shape's outline."""
    cx, cy, r = scene.cx, scene.cy, scene.radius
    poly = outline(scene)
    if poly is None:
        extremes = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    else:
        extremes = [poly[poly[:, 1].argmin()], poly[poly[:, 0].argmax()],
                    poly[poly[:, 1].argmax()], poly[poly[:, 0].argmin()]]
    return np.array([(cx, cy), *extremes], dtype=np.float32)


def caption(attributes, rng: np.random.Generator | None = None, drop: float = 0.0,
            drop_all: float = 0.0, prefix: float = 0.0) -> str:
    """'a large striped red circle on a blue background' for a Scene or an attribute dict (absent
    attributes are left unsaid). With rng, each attribute's words are left out with probability
    `drop` (the shape becomes 'shape'), the whole caption with `drop_all`, and an empty opening
    ('a picture of', ...) is put in front with probability `prefix`: the captions the
    text-to-image model and the CLIPs are trained on."""
    if isinstance(attributes, Scene):
        attributes = attributes.attributes()
    if rng is not None and rng.random() < drop_all:
        return ""
    said = {name: value for name, value in attributes.items()
            if value is not None and (rng is None or rng.random() >= drop)}
    words = ["a"]
    words += [said[name] for name in ("size", "pattern", "colour") if name in said]
    words.append(said.get("shape", GENERIC_SHAPE))
    if "background" in said:
        words += ["on", "a", said["background"], "background"]
    if rng is not None and rng.random() < prefix:
        words = PREFIXES[rng.integers(len(PREFIXES))].split() + words
    return " ".join(words)


def render(scene: Scene, resolution: int = RESOLUTION) -> Rendered:
    s = SUPERSAMPLE * resolution / RESOLUTION  # pixels of the drawing per world pixel
    size = SUPERSAMPLE * resolution
    shade = np.clip(np.array(BACKGROUND_COLOURS[scene.background]) + scene.shade, 0, 255)
    fill = np.clip(np.array(SHAPE_COLOURS[scene.colour]) + np.array(scene.tint), 0, 255)

    coverage = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(coverage)
    poly = outline(scene)
    if poly is None:
        r = scene.radius * s
        draw.ellipse([scene.cx * s - r, scene.cy * s - r, scene.cx * s + r, scene.cy * s + r], fill=255)
    else:
        draw.polygon([(float(x * s), float(y * s)) for x, y in poly], fill=255)
    cover = np.asarray(coverage, dtype=np.float32) / 255.0

    paint = np.broadcast_to(fill, (size, size, 3)).astype(np.float32)
    if scene.pattern == "striped":
        rows = (np.arange(size) / s) % STRIPE_PERIOD >= STRIPE_PERIOD / 2
        pale = 0.35 * fill + 0.65 * 255
        paint = np.where(rows[:, None, None], pale, paint)
    big = cover[..., None] * paint + (1 - cover[..., None]) * shade
    # Box-filter down: each output pixel is the mean of its SUPERSAMPLE x SUPERSAMPLE block.
    k = SUPERSAMPLE
    image = big.reshape(resolution, k, resolution, k, 3).mean(axis=(1, 3))
    fraction = cover.reshape(resolution, k, resolution, k).mean(axis=(1, 3))
    mask = fraction >= 0.5
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0)
    scale = resolution / RESOLUTION
    return Rendered(np.round(image).clip(0, 255).astype(np.uint8), mask, box, keypoints(scene) * scale,
                    caption(scene))


def models_dir():
    """The trained world's models, shipped inside the package (zoom/data/world, see its MANIFEST.json)."""
    from importlib import resources
    from pathlib import Path

    return Path(str(resources.files("zoom.data").joinpath("world")))


def render_batch(scenes, resolution: int = RESOLUTION) -> np.ndarray:
    """[N, H, W, 3] uint8 images of the scenes."""
    return np.stack([render(sc, resolution).image for sc in scenes])


def sample_grid(seed: int = 0, rows: int = 4, cols: int = 8, scale: int = 4) -> Image.Image:
    """A picture of random scenes, for docs."""
    rng = np.random.default_rng(seed)
    tiles = [render(Scene.sample(rng)).image for _ in range(rows * cols)]
    grid = np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], axis=1) for r in range(rows)])
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
