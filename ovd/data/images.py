"""Images in and out of the model's size: the reader every part uses and detectron2's ResizeShortestEdge (at train
and test time), public for inference and tools."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ResizeFlip", "read_image", "shortest_edge_size", "test_transform"]


def read_image(path, *, what: str = "image") -> np.ndarray:
    """uint8 RGB array [H, W, 3]; a missing or undecodable file raises an error naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise OSError(f"cannot read {what} {path}: {e}") from None


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge output size: short side to ``short``, long side capped at ``max_size``."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        s = max_size / max(newh, neww)
        newh, neww = newh * s, neww * s
    # under the long-side cap an extreme aspect ratio rounds the short side to 0 (where detectron2 fails): every
    # side keeps at least one pixel, which leaves every other size as detectron2 computes it
    return max(int(newh + 0.5), 1), max(int(neww + 0.5), 1)


@dataclass
class ResizeFlip:
    """The geometric transform of one image: resize from ``in_size`` to ``out_size``, then optional h-flip."""

    in_size: tuple[int, int]
    out_size: tuple[int, int]
    flip: bool = False

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        if self.out_size != self.in_size:
            image = np.asarray(Image.fromarray(image).resize(self.out_size[::-1], Image.BILINEAR))
        return image[:, ::-1] if self.flip else image

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """boxes: float [N, 4] xyxy in ``in_size`` pixels → ``out_size`` pixels."""
        (h, w), (nh, nw) = self.in_size, self.out_size
        out = boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
        if self.flip:
            out = out[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], dtype=np.float32) + np.array([nw, 0, nw, 0], dtype=np.float32)
        return out

    def apply_polygons(self, polygons: list[np.ndarray]) -> list[np.ndarray]:
        """Flat float64 ``[x0, y0, x1, y1, ...]`` polygons in ``in_size`` pixels → ``out_size`` pixels."""
        (h, w), (nh, nw) = self.in_size, self.out_size
        out = []
        for p in polygons:
            q = p.copy()
            q[0::2] *= nw / w
            q[1::2] *= nh / h
            if self.flip:
                q[0::2] = nw - q[0::2]
            out.append(q)
        return out


def test_transform(h: int, w: int, *, min_size: int, max_size: int) -> ResizeFlip:
    """The test-time resize of an ``h``×``w`` image (INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)."""
    return ResizeFlip((h, w), shortest_edge_size(h, w, min_size, max_size))
