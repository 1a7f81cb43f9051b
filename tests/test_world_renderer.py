"""The shapes world's renderer (zoom/world.py): deterministic, with exact ground truth."""

import numpy as np
import pytest

from zoom import world
from zoom.world import ATTRIBUTES, Scene, caption, render


def test_the_same_seed_gives_the_same_pixels_and_different_seeds_differ():
    a, b = render(Scene.from_seed(7)), render(Scene.from_seed(7))
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.box == b.box
    assert not np.array_equal(a.image, render(Scene.from_seed(8)).image)
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8


@pytest.mark.parametrize("seed", range(40))
def test_ground_truth_is_consistent_with_the_pixels(seed):
    scene = Scene.from_seed(seed)
    r = render(scene)
    ys, xs = np.nonzero(r.mask)
    assert r.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # the mask holds the shape's colour, the rest the background's (up to the tint and anti-aliasing)
    inside = r.image[r.mask].astype(float).mean(0)
    outside = r.image[~r.mask].astype(float).mean(0)
    background = np.array(world.BACKGROUND_COLOURS[scene.background]) + scene.shade
    assert np.abs(outside - background).max() < 25
    fill = np.array(world.SHAPE_COLOURS[scene.colour])
    if scene.pattern == "plain":
        assert np.abs(inside - fill).max() < 45
    # the mask's area is the shape's: circle pi r^2, square 2 r^2, triangle 3 sqrt(3)/4 r^2
    area = {"circle": np.pi, "square": 2.0, "triangle": 3 * np.sqrt(3) / 4}[scene.shape] * scene.radius ** 2
    assert abs(r.mask.sum() - area) < 0.12 * area + 6
    # keypoints: the centre, then the outline's extreme points, inside the image and on the shape's box
    k = r.keypoints
    assert k.shape == (5, 2) and np.allclose(k[0], (scene.cx, scene.cy))
    assert k[1, 1] <= k[0, 1] <= k[3, 1] and k[4, 0] <= k[0, 0] <= k[2, 0]
    x0, y0, x1, y1 = r.box
    # (a sharp vertex can be thinner than half a pixel for up to ~2.5 pixels: outside the coverage mask)
    assert x0 - 2.5 <= k[4, 0] and k[2, 0] <= x1 + 2.5 and y0 - 2.5 <= k[1, 1] and k[3, 1] <= y1 + 2.5
    assert r.caption == caption(scene) and all(getattr(scene, n) in r.caption for n in ATTRIBUTES)


def test_size_and_pattern_are_visible():
    small, large = render(Scene.from_seed(3, size="small")), render(Scene.from_seed(3, size="large"))
    assert large.mask.sum() > 2.5 * small.mask.sum()
    plain = render(Scene.from_seed(4, pattern="plain", size="large", shape="square"))
    striped = render(Scene.from_seed(4, pattern="striped", size="large", shape="square"))
    rows = striped.image[striped.mask].astype(float).std(0).max()
    assert rows > 3 * plain.image[plain.mask].astype(float).std(0).max()  # stripes add contrast inside


def test_a_counterfactual_changes_only_what_it_names():
    scene = Scene.from_seed(11, colour="blue", shape="square", size="small")
    red = scene.replace(colour="red")
    assert red.attributes() == {**scene.attributes(), "colour": "red"}
    assert (red.cx, red.cy, red.angle, red.radius) == (scene.cx, scene.cy, scene.angle, scene.radius)
    a, b = render(scene), render(red)
    assert np.array_equal(a.mask, b.mask) and not np.array_equal(a.image, b.image)
    big = scene.replace(size="large")
    lo, hi = world.RADIUS["large"]
    assert lo <= big.radius <= hi and render(big).mask.sum() > render(scene).mask.sum()


def test_captions_partial_and_paraphrased():
    rng = np.random.default_rng(0)
    scene = Scene.from_seed(1)
    seen = {caption(scene, rng, drop=0.5, drop_all=0.1, prefix=0.5) for _ in range(300)}
    assert "" in seen and any(c.startswith(tuple(world.PREFIXES)) for c in seen)
    assert any(world.GENERIC_SHAPE in c.split() for c in seen)
    words = {w for c in seen for w in c.split()}
    assert words <= set(world.VOCABULARY)
    assert caption({"colour": "red"}) == "a red shape" and caption({"shape": "square"}) == "a square"
    assert caption({"shape": "circle", "background": "blue"}) == "a circle on a blue background"


def test_fixed_attributes_are_checked():
    with pytest.raises(ValueError, match="colour"):
        Scene.from_seed(0, colour="teal")
