"""From an image record to the model's `ImageSample`: read, resize (detectron2's ResizeShortestEdge), flip.

Geometric transforms are applied to the image and, with the same parameters, to every box that belongs to it
(ground truth now; distillation regions and pseudo boxes later), so they stay in step.
"""

from __future__ import annotations

import numpy as np
import torch

from ovd.data.datasets import ImageRecord
from ovd.data.images import ResizeFlip, read_image, shortest_edge_size, test_transform
from ovd.data.region_store import RegionStore
from ovd.structures import ImageSample, Instances, PolygonMasks


class DatasetMapper:
    """Turns an `ImageRecord` into an `ImageSample`; randomness comes from the ``rng`` given per call, so a
    sample depends only on (record, rng seed) — not on the worker that makes it (exact resume)."""

    def __init__(
        self,
        *,
        is_train: bool,
        min_sizes: list[int],
        max_size: int,
        size_sampling: str = "choice",
        random_flip: bool = False,
        input_format: str = "BGR",
        category_ids: list[int],
        region_store: RegionStore | None = None,
        num_regions: int = 5,
        image_labelled: bool = False,
    ) -> None:
        if size_sampling not in ("choice", "range"):
            raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING must be 'choice' or 'range', got {size_sampling!r}")
        if size_sampling == "range" and len(min_sizes) != 2:
            raise ValueError(f"INPUT.MIN_SIZE_TRAIN with sampling 'range' needs [min, max], got {min_sizes}")
        self.is_train, self.min_sizes, self.max_size = is_train, list(min_sizes), max_size
        self.size_sampling, self.random_flip, self.input_format = size_sampling, random_flip, input_format
        self.class_index = {cid: i for i, cid in enumerate(category_ids)}
        self.region_store, self.num_regions = region_store, num_regions
        self.image_labelled = image_labelled

    def transform_for(self, h: int, w: int, rng: np.random.Generator | None) -> ResizeFlip:
        if not self.is_train or rng is None:
            return test_transform(h, w, min_size=self.min_sizes[0], max_size=self.max_size)
        if self.size_sampling == "range":
            short = int(rng.integers(self.min_sizes[0], self.min_sizes[1] + 1))
        else:
            short = int(self.min_sizes[int(rng.integers(len(self.min_sizes)))])
        flip = bool(self.random_flip and rng.random() < 0.5)
        return ResizeFlip((h, w), shortest_edge_size(h, w, short, self.max_size), flip)

    def __call__(self, record: ImageRecord, rng: np.random.Generator | None = None) -> ImageSample:
        image = read_image(record.file_name, what=f"image {record.image_id}")
        h, w = image.shape[:2]
        if (h, w) != (record.height, record.width):
            raise ValueError(
                f"image {record.file_name} is {h}x{w} but its annotation says {record.height}x{record.width}"
            )
        tf = self.transform_for(h, w, rng)
        image = tf.apply_image(image)
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        gt = image_labels = None
        if self.is_train:
            boxes = torch.from_numpy(tf.apply_boxes(record.boxes))
            classes = torch.tensor([self.class_index[c] for c in record.category_ids.tolist()], dtype=torch.int64)
            if self.image_labelled:
                image_labels = Instances(tf.out_size, boxes=boxes, classes=classes)
            else:
                gt = Instances(tf.out_size, gt_boxes=boxes, gt_classes=classes)
                if record.masks is not None:
                    gt.gt_masks = PolygonMasks([tf.apply_polygons(m) for m in record.masks])
        regions = None
        if self.region_store is not None:
            boxes, embeds = self.region_store.get(record.image_id)
            boxes, embeds = boxes[: self.num_regions], embeds[: self.num_regions]
            regions = Instances(tf.out_size, boxes=torch.from_numpy(tf.apply_boxes(boxes)), embeds=torch.from_numpy(embeds))
        return ImageSample(image=tensor, image_id=record.image_id, orig_size=(h, w), gt=gt, regions=regions,
                           image_labels=image_labels, file_name=str(record.file_name))
