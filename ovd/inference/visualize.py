"""Images in and out of the inference API: any accepted image → RGB array, and detections drawn onto an image."""

from __future__ import annotations

import colorsys
import os
from typing import Sequence, Union

import cv2
import numpy as np
from PIL import Image

from ovd.data.mapper import read_image

__all__ = ["ImageInput", "as_rgb_array", "class_color", "draw_detections"]

ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]
_MASK_ALPHA = 0.45


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


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    class_ids: np.ndarray,
    *,
    masks: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``image`` (uint8 RGB [H, W, 3]) with each detection drawn: mask tint, box, label.

    boxes: float [N, 4] xyxy in the image's pixels; labels: N strings; class_ids: int [N] (picks the colour);
    masks: bool [N, H, W] or None. Returns uint8 RGB [H, W, 3].
    """
    out = image.copy()
    h, w = out.shape[:2]
    if masks is not None:
        for mask, c in zip(masks, class_ids):
            tint = np.array(class_color(int(c)), dtype=np.float32)
            out[mask] = (out[mask] * (1 - _MASK_ALPHA) + tint * _MASK_ALPHA).astype(np.uint8)
    thickness = max(1, round(min(h, w) / 300))
    font_scale = max(0.35, min(h, w) / 1000)
    # lowest score first, so the most confident boxes and labels end up on top
    for i in reversed(range(len(boxes))):
        color = class_color(int(class_ids[i]))
        x0, y0, x1, y1 = (int(round(float(v))) for v in boxes[i])
        cv2.rectangle(out, (x0, y0), (x1, y1), color, thickness, lineType=cv2.LINE_AA)
        (tw, th), base = cv2.getTextSize(labels[i], cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        # label above the box, or inside it when the box touches the top edge
        ty = y0 - base - 2 if y0 - th - base - 2 >= 0 else y0 + th + 2
        cv2.rectangle(out, (x0, ty - th - 1), (min(x0 + tw + 2, w - 1), ty + base), color, -1)
        cv2.putText(out, labels[i], (x0 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out
