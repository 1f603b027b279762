"""Drawing detections on images (PIL only, no matplotlib)."""
from __future__ import annotations

import zlib
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# Saturated, mutually distinct colours (Tableau 20 without the greys); a class always gets the same
# one because the index comes from a hash of its name.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232),
    (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
    (247, 182, 210), (219, 219, 141), (158, 218, 229),
)


def class_color(name: str) -> tuple[int, int, int]:
    """Stable colour for a class name (crc32, not ``hash``, which changes between runs)."""
    return PALETTE[zlib.crc32(name.encode("utf-8")) % len(PALETTE)]


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio against ``background``."""

    def linear(c: int) -> float:  # sRGB -> linear light
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in background)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # Contrast with black is (L + 0.05) / 0.05, with white 1.05 / (L + 0.05); equal at L ~ 0.179.
    return (0, 0, 0) if (luminance + 0.05) ** 2 > 0.05 * 1.05 else (255, 255, 255)


def draw_detections(
    image: Image.Image,
    boxes: Tensor | Sequence[Sequence[float]],
    labels: Sequence[str],
    scores: Tensor | Sequence[float] | None = None,
) -> Image.Image:
    """Return a copy of ``image`` with boxes and ``"name 0.87"`` captions drawn on it.

    Args:
        image: any PIL image (converted to RGB).
        boxes: [N, 4] (x0, y0, x1, y1) in pixels of ``image``.
        labels: N class names; each name always gets the same colour.
        scores: N confidences in 0..1, or None to caption with the name only.
    Returns:
        A new RGB image of the same size; ``image`` is not modified.
    """
    boxes_list = boxes.tolist() if isinstance(boxes, Tensor) else [list(b) for b in boxes]
    scores_list = scores.tolist() if isinstance(scores, Tensor) else (list(scores) if scores is not None else None)
    if len(labels) != len(boxes_list) or (scores_list is not None and len(scores_list) != len(boxes_list)):
        raise ValueError(
            f"draw_detections: got {len(boxes_list)} boxes, {len(labels)} labels and "
            f"{'no' if scores_list is None else len(scores_list)} scores"
        )
    out = image.convert("RGB")  # convert always copies
    draw = ImageDraw.Draw(out)
    line_width = max(2, round(max(out.size) / 320))
    font = ImageFont.load_default(size=max(12, round(min(out.size) * 0.025)))
    order = range(len(boxes_list))
    if scores_list is not None:
        # Lowest score first, so the most confident captions end up on top where they overlap.
        order = sorted(order, key=lambda i: scores_list[i])
    for i in order:
        caption = labels[i] if scores_list is None else f"{labels[i]} {scores_list[i]:.2f}"
        _draw_one(draw, out.size, boxes_list[i], caption, class_color(labels[i]), line_width, font)
    return out


def draw_ground_truth(image: Image.Image, boxes: Tensor | Sequence[Sequence[float]]) -> Image.Image:
    """Return a copy of ``image`` with ground-truth boxes ([N, 4] x0, y0, x1, y1 pixels) as thin
    white outlines on a black one, visible on any background and distinct from the coloured
    detections that ``draw_detections`` draws on top."""
    boxes_list = boxes.tolist() if isinstance(boxes, Tensor) else [list(b) for b in boxes]
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 640))
    for x0, y0, x1, y1 in boxes_list:
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        draw.rectangle((x0 - width, y0 - width, x1 + width, y1 + width), outline=(0, 0, 0), width=width)
        draw.rectangle((x0, y0, x1, y1), outline=(255, 255, 255), width=width)
    return out


def _draw_one(
    draw: ImageDraw.ImageDraw,
    image_size: tuple[int, int],
    box: Sequence[float],
    caption: str,
    color: tuple[int, int, int],
    line_width: int,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    """One rectangle plus its caption on a filled box of the same colour."""
    x0, y0, x1, y1 = box
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    draw.rectangle((x0, y0, x1, y1), outline=color, width=line_width)
    left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
    pad = max(1, line_width // 2)
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    width, _ = image_size
    # Caption above the box when it fits, otherwise just inside its top edge; keep it on-image.
    tx = min(max(0.0, x0), max(0.0, width - tw))
    ty = y0 - th if y0 - th >= 0 else max(0.0, y0)
    draw.rectangle((tx, ty, tx + tw, ty + th), fill=color)
    draw.text((tx + pad - left, ty + pad - top), caption, fill=text_color(color), font=font)
