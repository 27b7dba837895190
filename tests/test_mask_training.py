"""Mask R-CNN training data: polygons from COCO/LVIS annotations, kept in step with the image's augmentation and
rasterised inside each proposal box for the mask loss (DESIGN §2 LVIS)."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from ovd.config import load_config
from ovd.data.build import build_train_loader, load_train_datasets
from ovd.data.catalog import DatasetSpec, register_dataset
from ovd.data.datasets import load_coco_json
from ovd.data.images import ResizeFlip
from ovd.modeling.build import build_model
from ovd.modeling.mask_head import mask_targets
from ovd.structures import PolygonMasks


def _diamond(box):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return [cx, y0, x1, cy, cx, y1, x0, cy]


def test_polygon_targets_match_the_bitmask_path():
    h, w = 60, 80
    polys = [[10.0, 12.0, 50.0, 15.0, 30.0, 55.0], [55.0, 5.0, 75.0, 5.0, 75.0, 25.0, 55.0, 25.0]]
    boxes = torch.tensor([[8.0, 10.0, 52.0, 57.0], [50.0, 2.0, 78.0, 30.0]])
    masks = PolygonMasks([[np.array(polys[0])], [np.array(polys[1])]])
    from_polygons = mask_targets(masks, boxes, 28)
    bitmaps = torch.from_numpy(np.stack([mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([p], h, w)))
                                         for p in polys]))
    from_bitmaps = mask_targets(bitmaps, boxes, 28)
    assert from_polygons.shape == (2, 28, 28) and from_polygons.dtype == torch.bool
    # the two rasterisations differ only along edges
    agree = (from_polygons == from_bitmaps).float().mean().item()
    assert agree > 0.95
    # a square polygon filling its box exactly gives an all-foreground target; an empty polygon list none
    square = PolygonMasks([[np.array([55.0, 5.0, 75.0, 5.0, 75.0, 25.0, 55.0, 25.0])], []])
    t = mask_targets(square, torch.tensor([[55.0, 5.0, 75.0, 25.0], [0.0, 0.0, 10.0, 10.0]]), 14)
    assert t[0].all() and not t[1].any()
    picked = masks[torch.tensor([1, 1, 0])]
    assert len(picked) == 3 and picked.polygons[2] is masks.polygons[0]


def test_polygons_follow_resize_and_flip_like_boxes():
    poly = np.array([10.0, 20.0, 40.0, 20.0, 40.0, 50.0, 10.0, 50.0])
    box = np.array([[10.0, 20.0, 40.0, 50.0]], dtype=np.float32)
    for flip in (False, True):
        tf = ResizeFlip((100, 200), (50, 100), flip)
        (q,) = tf.apply_polygons([poly])
        xs, ys = q[0::2], q[1::2]
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max(), ys.max()], tf.apply_boxes(box)[0], rtol=1e-6)
    assert poly[0] == 10.0  # the input is not modified


def _write(path, anns):
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}],
            "categories": [{"id": 3, "name": "cat"}], "annotations": anns}
    path.write_text(json.dumps(data))
    return DatasetSpec("m", path, path.parent)


def test_load_keeps_polygons_per_box_and_rejects_rle(tmp_path):
    spec = _write(tmp_path / "a.json", [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 8, 8], "segmentation": [[1, 1, 9, 1, 9, 9], [1, 2]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4], "segmentation": [[5, 5, 5, 9, 6, 9]]},
    ])
    (record,) = load_coco_json(spec, with_masks=True).records
    assert len(record.masks) == len(record.boxes) == 1  # the zero-area box is dropped with its polygon
    assert len(record.masks[0]) == 1  # a polygon of fewer than 3 points is dropped
    np.testing.assert_array_equal(record.masks[0][0], [1, 1, 9, 1, 9, 9])
    assert load_coco_json(spec).records[0].masks is None
    spec = _write(tmp_path / "b.json", [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 1, 8, 8],
                                         "segmentation": {"size": [20, 20], "counts": "abc"}}])
    with pytest.raises(ValueError, match=r"b\.json: annotation 7 has an RLE mask.*polygons"):
        load_coco_json(spec, with_masks=True)


def test_mask_head_trains_on_polygon_annotations(tiny_world, tmp_path):
    root, overrides = tiny_world
    data = json.loads((root / "shapes" / "annotations" / "train_base.json").read_text())
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [_diamond([x, y, x + w, y + h])]
    (tmp_path / "masked.json").write_text(json.dumps(data))
    register_dataset("shapes_train_base_masked", tmp_path / "masked.json", root / "shapes" / "images" / "train")
    cfg = load_config("configs/shapes/base.yaml", overrides + [
        "MODEL.MASK_ON", "true", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_MASK_HEAD.NUM_CONV", "2",
        "DATASETS.TRAIN", "[shapes_train_base_masked]", "INPUT.RANDOM_FLIP", "horizontal"])
    torch.manual_seed(0)
    model = build_model(cfg)
    (dataset,) = load_train_datasets(cfg)
    assert all(len(r.masks) == len(r.boxes) for r in dataset.records)
    batch = next(iter(build_train_loader(cfg, [dataset])))
    assert isinstance(batch[0].gt.gt_masks, PolygonMasks) and len(batch[0].gt.gt_masks) == len(batch[0].gt.gt_boxes)
    optimizer = torch.optim.SGD(model.roi_heads.mask_head.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(20):
        losses = model.forward_train(batch)
        loss = losses["loss_mask"]
        assert torch.isfinite(loss)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
    # a diamond is half of its box: predicting it beats the initial all-0.5 output (BCE log 2 = 0.693)
    assert first == pytest.approx(0.693, abs=0.01)
    assert losses["loss_mask"].item() < 0.55
