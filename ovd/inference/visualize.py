"""Images in and out of the inference API: any accepted image → RGB array, and detections drawn onto an image."""

from __future__ import annotations

import colorsys
import os
from typing import Sequence, Union

import cv2
import numpy as np
from PIL import Image

from ovd.data import read_image

__all__ = ["ImageInput", "as_rgb_array", "class_color", "draw_detections", "label_style", "place_labels"]

ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]
_MASK_ALPHA = 0.45
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def as_rgb_array(image: ImageInput, input_format: str = "RGB") -> np.ndarray:
    """uint8 RGB array [H, W, 3] from a file path, a PIL image, or a uint8 array.

    Arrays are [H, W] (grey), [H, W, 3] or [H, W, 4] (alpha dropped), in ``input_format`` channel order ("RGB", or
    "BGR" as OpenCV reads them); other dtypes are refused rather than guessed at (is 1.0 white or almost black?).
    """
    if input_format not in ("RGB", "BGR"):
        raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"an image is a file path, a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0-255), got {image.dtype}; "
                         "convert with (x * 255).astype(np.uint8)")
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) == 0:
        raise ValueError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4] with H, W > 0, got {list(image.shape)}")
    image = image[:, :, :3]
    return np.ascontiguousarray(image[:, :, ::-1] if input_format == "BGR" else image)


def class_color(class_id: int) -> tuple[int, int, int]:
    """A saturated RGB colour per class, the same in every image and run (golden-ratio hue steps keep neighbouring
    ids apart)."""
    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def label_style(image_size: tuple[int, int]) -> tuple[float, int, int]:
    """(font scale, text thickness, box thickness) for an image of ``image_size`` (H, W).

    Scaled by the geometric mean of the sides, so a label keeps about the same share of the picture from 160 px
    thumbnails to 4000 px photos, and a long thin image does not get a font sized by its long side alone."""
    size = (image_size[0] * image_size[1]) ** 0.5
    font_scale = max(0.4, size / 1000)
    return font_scale, max(1, int(font_scale * 1.5)), max(1, round(size / 400))


def place_labels(
    boxes: np.ndarray, label_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Where each box's label goes: rectangles (x0, y0, x1, y1), integer pixels, one per box.

    boxes: float [N, 4] xyxy, most important first (they get the free places first); label_sizes: N (width, height).
    Each label tries, in order: above the box's top-left corner, inside it, below the box, inside its bottom, then
    the same at the right edge; the first place inside the image that overlaps no label placed before wins, else
    the place overlapping least. Labels are shifted sideways to stay inside the image.
    """
    h, w = image_size
    placed: list[tuple[int, int, int, int]] = []
    for (bx0, by0, bx1, by1), (lw, lh) in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), label_sizes):
        x0, y0, x1, y1 = (int(round(v)) for v in (bx0, by0, bx1, by1))
        candidates = []
        for left in (x0, x1 - lw):
            left = min(max(left, 0), max(w - lw, 0))
            for top in (y0 - lh, y0, y1, y1 - lh):
                if 0 <= top and top + lh <= h:
                    candidates.append((left, top, left + lw, top + lh))
        if not candidates:  # the image is lower than a label: pin it to the top
            left = min(max(x0, 0), max(w - lw, 0))
            candidates.append((left, 0, left + lw, lh))
        best = min(range(len(candidates)), key=lambda k: (sum(_overlap(candidates[k], p) for p in placed), k))
        placed.append(candidates[best])
    return placed


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    class_ids: np.ndarray,
    *,
    masks: np.ndarray | None = None,
    colors: Sequence[tuple[int, int, int]] | None = None,
    marked: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``image`` (uint8 RGB [H, W, 3]) with each detection drawn: mask tint, box, label.

    boxes: float [N, 4] xyxy in the image's pixels, best first; labels: N strings; class_ids: int [N] (picks the
    colour); masks: bool [N, H, W] or None; colors: N RGB colours instead of one per class; marked: bool [N],
    boxes drawn three times as thick (e.g. those the other vocabulary did not find). Font and line widths follow
    the image size (`label_style`); labels are placed by `place_labels`. Returns uint8 RGB [H, W, 3].
    """
    out = image.copy()
    h, w = out.shape[:2]
    n = len(boxes)
    colors = [class_color(int(c)) for c in class_ids] if colors is None else list(colors)
    marked = np.zeros(n, dtype=bool) if marked is None else np.asarray(marked, dtype=bool)
    if masks is not None:
        for mask, color in zip(masks, colors):
            tint = np.array(color, dtype=np.float32)
            out[mask] = (out[mask] * (1 - _MASK_ALPHA) + tint * _MASK_ALPHA).astype(np.uint8)
    font_scale, text_thickness, thickness = label_style((h, w))
    pad = max(1, text_thickness)
    metrics = [cv2.getTextSize(t, _FONT, font_scale, text_thickness) for t in labels]
    sizes = [(tw + 2 * pad, th + base + 2 * pad) for (tw, th), base in metrics]
    places = place_labels(boxes, sizes, (h, w))
    # boxes first, then labels, each lowest score first: the most confident end up on top and no box crosses a label
    for i in reversed(range(n)):
        x0, y0, x1, y1 = (int(round(float(v))) for v in boxes[i])
        # axis-aligned edges need no anti-aliasing; without it a box keeps its exact colour
        cv2.rectangle(out, (x0, y0), (x1, y1), colors[i], thickness * (3 if marked[i] else 1))
    for i in reversed(range(n)):
        lx0, ly0, lx1, ly1 = places[i]
        (_, th), base = metrics[i]
        cv2.rectangle(out, (lx0, ly0), (lx1 - 1, ly1 - 1), colors[i], -1)
        cv2.putText(out, labels[i], (lx0 + pad, ly1 - pad - base), _FONT, font_scale, _text_color(colors[i]),
                    text_thickness, cv2.LINE_AA)
    return out


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    # black on light label backgrounds, white on dark ones (ITU-R BT.601 luma)
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 128 else (255, 255, 255)
