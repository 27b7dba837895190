"""Containers passed between the data pipeline and the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor


class Instances:
    """Per-image fields of equal length (boxes, classes, scores, embeddings) that index and slice as one.

    ``image_size`` is (height, width) of the image the boxes live in.
    """

    def __init__(self, image_size: tuple[int, int], **fields: Any) -> None:
        if not torch.jit.is_tracing():  # a trace keeps the sizes as the tensors it follows (dynamic ONNX sizes)
            image_size = (int(image_size[0]), int(image_size[1]))
        object.__setattr__(self, "image_size", (image_size[0], image_size[1]))
        object.__setattr__(self, "_fields", {})
        for k, v in fields.items():
            self.set(k, v)

    def set(self, name: str, value: Any) -> None:
        n = len(value)
        if self._fields and n != len(self):
            raise ValueError(f"Instances field {name!r} has length {n}, expected {len(self)}")
        self._fields[name] = value

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name not in fields:
            raise AttributeError(f"Instances has no field {name!r} (fields: {sorted(fields)})")
        return fields[name]

    def has(self, name: str) -> bool:
        return name in self._fields

    def fields(self) -> dict[str, Any]:
        return dict(self._fields)

    def __len__(self) -> int:
        for v in self._fields.values():
            return len(v)
        return 0

    def __getitem__(self, item: int | slice | Tensor) -> "Instances":
        if isinstance(item, int):
            item = slice(item, item + 1 if item != -1 else None)
        return Instances(self.image_size, **{k: v[item] for k, v in self._fields.items()})

    def __iter__(self) -> Iterator:
        raise TypeError("Instances is not iterable; index it or read its fields")

    def to(self, device: torch.device | str) -> "Instances":
        return Instances(
            self.image_size, **{k: v.to(device) if hasattr(v, "to") else v for k, v in self._fields.items()}
        )

    @staticmethod
    def cat(items: list["Instances"]) -> "Instances":
        if not items:
            raise ValueError("Instances.cat needs at least one item")
        names = items[0]._fields.keys()
        return Instances(items[0].image_size, **{k: torch.cat([i._fields[k] for i in items]) for k in names})

    def __repr__(self) -> str:
        return f"Instances(num={len(self)}, image_size={self.image_size}, fields={list(self._fields)})"


class PolygonMasks:
    """Instance masks as polygons (COCO/LVIS ``segmentation``): per instance a list of float64 arrays
    ``[x0, y0, x1, y1, ...]`` in image pixels. Kept as polygons until the mask loss rasterises each one inside its
    proposal box (detectron2's approach), so an image with hundreds of objects never holds full-size bitmaps."""

    def __init__(self, polygons: list[list[np.ndarray]]) -> None:
        self.polygons = polygons

    def __len__(self) -> int:
        return len(self.polygons)

    def __getitem__(self, item: int | slice | Tensor | list[int]) -> "PolygonMasks":
        if isinstance(item, int):
            return PolygonMasks([self.polygons[item]])
        if isinstance(item, slice):
            return PolygonMasks(self.polygons[item])
        index = torch.as_tensor(item)
        if index.dtype == torch.bool:
            index = index.nonzero()[:, 0]
        return PolygonMasks([self.polygons[i] for i in index.tolist()])

    def __repr__(self) -> str:
        return f"PolygonMasks(num={len(self)})"


@dataclass
class ImageSample:
    """One image as the model takes it.

    image: uint8 Tensor[3, H, W] in the channel order of INPUT.FORMAT, already resized (and flipped in training).
    orig_size: (height, width) of the image on disk; predictions are mapped back to it.
    gt: ground truth in resized-image pixels, fields ``gt_boxes`` (Tensor[N, 4] xyxy) and ``gt_classes``
        (Tensor[N] contiguous class indices into the training vocabulary), and ``gt_masks`` (`PolygonMasks`) when
        the model has a mask head; None at test time.
    regions: distillation regions in resized-image pixels, fields ``boxes`` (Tensor[K, 4] xyxy) and ``embeds``
        (Tensor[K, D], the teacher's CLIP image embeddings); None without RKD.
    image_labels: for image-labelled data, the pseudo box of each kept label in resized-image pixels, fields
        ``boxes`` (Tensor[L, 4] xyxy) and ``classes`` (Tensor[L] contiguous indices); ``gt`` is then None.
    """

    image: Tensor
    image_id: int
    orig_size: tuple[int, int]
    gt: Instances | None = None
    regions: Instances | None = None
    image_labels: Instances | None = None
    file_name: str = ""

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])
