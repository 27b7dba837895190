"""The evaluation loop picks the evaluator the ground truth calls for: LVIS rules (APr/APc/APf) for a file whose
categories carry a frequency, COCO's novel/base split otherwise; with a mask head, mask metrics as ``segm/…``."""

import json
import math

import pytest
import torch

from ovd.config import load_config
from ovd.data.catalog import register_dataset
from ovd.data.build import load_dataset
from ovd.engine.evaluate import evaluate_dataset
from ovd.evaluation import evaluate_detections, evaluate_lvis
from ovd.modeling.build import build_model


def _lvis_copy(src, dst, novel_ids):
    """The shapes val file as LVIS v1 would write it: frequencies (novel = rare), federated image fields, polygons."""
    data = json.loads(src.read_text())
    for c in data["categories"]:
        c.update(frequency="r" if c["id"] in novel_ids else "f", synset=f"shape{c['id']}.n.01", image_count=1,
                 instance_count=1)
    for im in data["images"]:
        im.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        a.update(segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]], area=w * h)
    dst.write_text(json.dumps(data))


@pytest.mark.parametrize("style", ["lvis", "coco"])
def test_evaluation_uses_the_right_rules_with_masks(tiny_world, tmp_path, style):
    root, overrides = tiny_world
    meta = json.loads((root / "shapes" / "meta.json").read_text())
    novel = meta["novel_category_ids"]
    gt = tmp_path / "val.json"
    _lvis_copy(root / "shapes" / "annotations" / "val.json", gt, novel)
    if style == "coco":  # the same file without the LVIS fields: COCO rules, split from the catalogue
        data = json.loads(gt.read_text())
        for c in data["categories"]:
            del c["frequency"]
        gt.write_text(json.dumps(data))
    name = f"shapes_val_{style}_masks"
    register_dataset(name, gt, root / "shapes" / "images" / "val", tuple(novel))
    cfg = load_config("configs/shapes/base.yaml", overrides + [
        "MODEL.MASK_ON", "true", "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    dataset = load_dataset(name)
    out = tmp_path / "inference"
    results = evaluate_dataset(cfg, model, dataset, out)

    written = json.loads((out / f"{style}_instances_results.json").read_text())
    assert written and all("segmentation" in d and "bbox" in d for d in written)
    if style == "lvis":
        assert {"APr", "APc", "APf", "segm/APr", "segm/APf"} <= results.keys() and "AP50_novel" not in results
        expected = evaluate_lvis(gt, written, iou_type="segm")
        assert results["segm/APr"] == pytest.approx(expected["APr"], abs=1e-12) or math.isnan(expected["APr"])
        assert results["APf"] == pytest.approx(evaluate_lvis(gt, written)["APf"], abs=1e-12)
    else:
        assert {"AP50_novel", "AP50_base", "segm/AP50_novel"} <= results.keys() and "APr" not in results
        expected = evaluate_detections(gt, written, novel_category_ids=novel, iou_type="segm")
        assert results["segm/AP50"] == pytest.approx(expected["AP50"], abs=1e-12)
    assert all(0.0 <= v <= 1.0 for k, v in results.items() if isinstance(v, float) and not math.isnan(v))
