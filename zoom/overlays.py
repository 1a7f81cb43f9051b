"""Gallery overlays for keypoint, segmentation and detection runs: the target's marks drawn on a base or
edited image (keypoints as dots, the audited class's mask in translucent colour, boxes with their label
and score), saved as PNG next to the plain image.

Images are small (32 px in the shapes world), so each is upscaled first by a whole factor with NEAREST
(pixels stay pixels) until its longer side reaches DISPLAY; marks are drawn at that scale to be readable.
Marks come from the criterion's `details` (zoom.tasks), in the image's own pixel coordinates.
"""

from __future__ import annotations

import math

DISPLAY = 256  # the overlay's longer side, at least
MASK_RGBA = (255, 140, 0, 120)  # the audited class's mask: translucent orange
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (255, 225, 25), (170, 110, 40)]


def draw_marks(image, marks: dict):
    """image [3, H, W] in [0, 1] and its marks -> the overlay (a PIL image)."""
    from PIL import Image, ImageDraw

    from .rundir import image_array

    array = image_array(image)
    h, w = array.shape[:2]
    k = max(1, math.ceil(DISPLAY / max(h, w)))
    canvas = Image.fromarray(array).resize((w * k, h * k), Image.NEAREST).convert("RGBA")
    if marks.get("mask") is not None:
        _mask(canvas, marks["mask"])
    draw = ImageDraw.Draw(canvas)
    if marks.get("points") is not None:
        _points(draw, marks["points"], marks.get("from"), k)
    if marks.get("boxes"):
        _boxes(draw, marks["boxes"], k)
    return canvas.convert("RGB")


def _mask(canvas, mask) -> None:
    """Tint the mask's pixels; a mask at another resolution (a segmenter that resizes) is stretched to fit."""
    from PIL import Image

    alpha = Image.fromarray(mask.detach().cpu().numpy().astype("uint8") * MASK_RGBA[3])
    layer = Image.new("RGBA", canvas.size, MASK_RGBA[:3] + (0,))
    layer.putalpha(alpha.resize(canvas.size, Image.NEAREST))
    canvas.alpha_composite(layer)


def _drawable(point) -> bool:
    from .tasks import NO_KEYPOINTS

    x, y = (float(v) for v in point)
    return math.isfinite(x) and math.isfinite(y) and not (x == NO_KEYPOINTS and y == NO_KEYPOINTS)


def _points(draw, points, origins, k: int) -> None:
    """Dots, one colour per keypoint; on an edited image a line from where the base image had it."""
    radius = max(3, k // 2)

    def at(p):  # pixel centre in the upscaled image
        return (float(p[0]) + 0.5) * k, (float(p[1]) + 0.5) * k

    for j, p in enumerate(points.tolist()):
        if not _drawable(p):
            continue
        x, y = at(p)
        if origins is not None and j < len(origins) and _drawable(origins[j].tolist()):
            draw.line([at(origins[j].tolist()), (x, y)], fill=(255, 255, 255), width=max(1, k // 4))
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=PALETTE[j % len(PALETTE)],
                     outline=(0, 0, 0))


def _boxes(draw, boxes: list[dict], k: int) -> None:
    """Boxes from the record's list (box, label, score), each with its label on a filled tag."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=max(10, 3 * k // 2))
    for b in boxes:
        box = b["box"]
        if box is None or any(v is None for v in box):
            continue
        colour = PALETTE[sum(map(ord, b["label"])) % len(PALETTE)]  # a label keeps its colour across images
        x0, y0, x1, y1 = (v * k for v in box)
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=max(2, k // 3))
        text = b["label"] if b["score"] is None else f"{b['label']} {b['score']:.2f}"
        tag = draw.textbbox((x0, y0), text, font=font)
        draw.rectangle(tag, fill=colour)
        draw.text((x0, y0), text, fill=(0, 0, 0), font=font)
