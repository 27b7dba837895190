"""Proposal recall (AR@k, recall@0.5; all / base / novel): hand-computed cases, and every value against pycocotools'
class-agnostic ``COCOeval`` (``useCats=0``) on the same boxes."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovd.data.catalog import DatasetSpec
from ovd.data.datasets import DetectionDataset, ImageRecord, load_coco_json
from ovd.evaluation import format_recall_table, proposal_recall
from ovd.evaluation.proposal_recall import IOU_THRESHOLDS

SPLIT_KEYS = ("AR@10", "AR@20", "AR@50", "AR@100", "recall@0.5")


def _dataset(images: dict[int, list[tuple[list[float], int]]], *, categories=(1, 2), novel=()) -> DetectionDataset:
    """``{image_id: [(xyxy, category_id), ...]}`` as a dataset of 100x100 images."""
    records = [
        ImageRecord(image_id=i, file_name=Path(f"{i}.png"), height=100, width=100,
                    boxes=np.array([b for b, _ in anns], np.float32).reshape(-1, 4),
                    category_ids=np.array([c for _, c in anns], np.int64))
        for i, anns in images.items()
    ]
    cats = [{"id": c, "name": f"c{c}"} for c in categories]
    return DetectionDataset("hand", Path("hand.json"), records, cats, tuple(novel))


def _props(*boxes_and_scores: tuple[list[float], float]) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.array([b for b, _ in boxes_and_scores], np.float32).reshape(-1, 4)
    return boxes, np.array([s for _, s in boxes_and_scores], np.float32)


def _ar(per_threshold_matched: list[float]) -> float:
    return float(np.mean(per_threshold_matched))


GT = [0.0, 0.0, 10.0, 10.0]


def test_one_box_at_known_ious():
    # IoU 0.72 passes the thresholds 0.50 .. 0.70 (5 of 10); IoU 0.92 passes 0.50 .. 0.90 (9 of 10).
    data = _dataset({1: [(GT, 1)]})
    m = proposal_recall(data, {1: _props(([0, 0, 10, 7.2], 0.9))}, ks=(1, 2))
    assert m["AR@1"] == m["AR@2"] == pytest.approx(0.5, abs=1e-15)
    assert m["recall@0.5"] == 1.0
    m = proposal_recall(data, {1: _props(([0, 0, 10, 7.2], 0.9), ([0, 0, 10, 9.2], 0.8))}, ks=(1, 2))
    assert m["AR@1"] == pytest.approx(0.5, abs=1e-15)
    assert m["AR@2"] == pytest.approx(0.9, abs=1e-15)
    # Below IoU 0.5: nothing, at any budget.
    m = proposal_recall(data, {1: _props(([0, 0, 10, 4.9], 0.9))}, ks=(1,))
    assert (m["AR@1"], m["recall@0.5"]) == (0.0, 0.0)


def test_duplicate_proposals_find_one_box_once():
    data = _dataset({1: [(GT, 1), ([50, 50, 60, 60], 1)]})
    m = proposal_recall(data, {1: _props(([0, 0, 10, 9.2], 0.9), ([0, 0, 10, 9.2], 0.8), ([0, 0, 10, 9.2], 0.7))},
                        ks=(3,))
    assert m["AR@3"] == pytest.approx(0.9 / 2, abs=1e-15)
    assert m["recall@0.5"] == 0.5
    assert m["num_gt"] == 2


def test_budget_counts_proposals_by_score_not_file_order():
    data = _dataset({1: [(GT, 1)]})
    junk = [([60 + i, 60, 70 + i, 70], 0.5) for i in range(3)]
    m = proposal_recall(data, {1: _props(*junk, (GT, 0.4))}, ks=(3, 4))
    assert (m["AR@3"], m["AR@4"]) == (0.0, 1.0)
    m = proposal_recall(data, {1: _props(*junk, (GT, 0.6))}, ks=(3, 4))
    assert (m["AR@3"], m["AR@4"]) == (1.0, 1.0)
    # Equal scores keep the given order: the true box, listed last, is the 4th.
    m = proposal_recall(data, {1: _props(*junk, (GT, 0.5))}, ks=(3, 4))
    assert (m["AR@3"], m["AR@4"]) == (0.0, 1.0)


def test_greedy_matching_and_tie_break_as_pycocotools():
    # p1 has IoU 90/110 with both true boxes and takes the later one (pycocotools' tie rule); p2 equals gt2, so
    # it is left with gt1 at IoU 80/120: 2 boxes found at 0.50..0.65, 1 at 0.70..0.95.
    gt1, gt2 = [0, 0, 10, 10], [2, 0, 12, 10]
    data = _dataset({1: [(gt1, 1), (gt2, 1)]})
    props = {1: _props(([1, 0, 11, 10], 0.9), (gt2, 0.8))}
    m = proposal_recall(data, props, ks=(2,))
    assert m["AR@2"] == pytest.approx(_ar([1] * 4 + [0.5] * 6), abs=1e-15)
    assert m == pytest.approx(_pycocotools(_coco_dict(data), props, ks=(2,)), abs=1e-15, nan_ok=True)


def test_empty_images_and_images_without_proposals():
    data = _dataset({1: [(GT, 1)], 2: [], 3: [([20, 20, 40, 40], 1)]})
    # Image 2 has no true box: its proposals change nothing. Image 3 has no proposal: its box counts, unfound.
    props = {1: _props((GT, 0.9)), 2: _props(([20, 20, 40, 40], 0.9))}
    m = proposal_recall(data, props, ks=(10,))
    assert (m["AR@10"], m["recall@0.5"], m["num_gt"]) == (0.5, 0.5, 2)
    assert proposal_recall(data, {}, ks=(10,))["AR@10"] == 0.0
    nothing = proposal_recall(_dataset({1: [], 2: []}), props, ks=(10,))
    assert math.isnan(nothing["AR@10"]) and nothing["num_gt"] == 0


def test_crowd_boxes_do_not_count(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "1.png", "height": 100, "width": 100}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 1},
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    # The proposal on the crowd region is neither a found box nor a miss; the crowd box is not in the count.
    props = {1: _props(([50, 50, 90, 90], 0.9), (GT, 0.8))}
    m = proposal_recall(path, props, ks=(1, 2))
    assert (m["AR@1"], m["AR@2"], m["num_gt"]) == (0.0, 1.0, 1)
    assert m == pytest.approx(_pycocotools(coco, props, ks=(1, 2)), abs=1e-15, nan_ok=True)


def test_base_and_novel_splits():
    data = _dataset({1: [(GT, 1), ([50, 50, 60, 60], 2)], 2: [([0, 0, 20, 20], 2)]}, novel=(2,))
    props = {1: _props(([50, 50, 60, 60], 0.9)), 2: _props(([0, 0, 20, 20], 0.9))}
    m = proposal_recall(data, props, ks=(10,))
    assert (m["AR@10_base"], m["AR@10_novel"], m["AR@10"]) == (0.0, 1.0, pytest.approx(2 / 3))
    assert (m["num_gt_base"], m["num_gt_novel"], m["num_gt"]) == (1, 2, 3)
    # The split can be given; with no novel class the novel keys are absent and base is everything.
    m = proposal_recall(data, props, novel_category_ids=(), ks=(10,))
    assert not any(k.endswith("_novel") for k in m) and m["AR@10_base"] == m["AR@10"]
    table = format_recall_table(m, title="proposals")
    assert table.splitlines()[0] == "proposals" and "AR@10" in table and "recall@0.5" in table


def test_bad_arguments_are_named():
    data = _dataset({1: [(GT, 1)]})
    with pytest.raises(ValueError, match=r"image ids not in dataset hand \(first: \[7\]\)"):
        proposal_recall(data, {7: _props((GT, 1.0))})
    with pytest.raises(ValueError, match=r"novel_category_ids \[9\] are not categories"):
        proposal_recall(data, {}, novel_category_ids=(9,))
    with pytest.raises(ValueError, match=r"ks must be"):
        proposal_recall(data, {}, ks=(0, 10))
    with pytest.raises(ValueError, match=r"1 proposal boxes but 2 scores"):
        proposal_recall(data, {1: (np.zeros((1, 4)), np.zeros(2))})


# ---- against pycocotools -----------------------------------------------------------------------------------------

def _coco_dict(data: DetectionDataset) -> dict:
    anns = []
    for r in data.records:
        for b, c in zip(r.boxes.astype(np.float64), r.category_ids.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": r.image_id, "category_id": c, "iscrowd": 0,
                         "bbox": [b[0], b[1], w, h], "area": w * h})
    images = [{"id": r.image_id, "file_name": str(r.file_name), "height": r.height, "width": r.width}
              for r in data.records]
    return {"images": images, "annotations": anns, "categories": data.categories}


def _pycocotools(coco: dict, proposals, *, ks=(10, 20, 50, 100), novel=()) -> dict[str, float]:
    """The reference: COCOeval(useCats=0) once on all true boxes and once per split on the split's boxes only."""
    ks = sorted(ks)
    first_cat = min(c["id"] for c in coco["categories"])
    results = [
        # one category for all proposals: with useCats=0 the category is ignored, but it must be one of the file's
        {"image_id": i, "category_id": first_cat, "score": float(s),
         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
        for i, (boxes, scores) in proposals.items() for b, s in zip(boxes.astype(np.float64), scores)
    ]
    splits = {"": lambda c: True, "_base": lambda c: c not in novel}
    if novel:
        splits["_novel"] = lambda c: c in novel
    out: dict[str, float] = {}
    for suffix, keep in splits.items():
        kept = [a for a in coco["annotations"] if keep(a["category_id"])]
        gt = COCO()
        gt.dataset = {**coco, "annotations": kept}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="bbox")
            ev.params.useCats = 0
            ev.params.maxDets = list(ks)
            ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e5**2]], ["all"]
            ev.evaluate()
            ev.accumulate()
        recall = ev.eval["recall"][:, 0, 0, :]  # [T, M]
        for m, k in enumerate(ks):
            r = recall[:, m]
            out[f"AR@{k}{suffix}"] = float(np.mean(r[r > -1])) if (r > -1).any() else math.nan
        out[f"recall@0.5{suffix}"] = float(recall[0, -1]) if recall[0, -1] > -1 else math.nan
        out[f"num_gt{suffix}"] = sum(not a["iscrowd"] for a in kept)
    return out


def _random_world(seed: int, *, num_images: int = 40) -> tuple[dict, dict]:
    """A COCO dict (5 categories; crowd boxes, duplicated boxes, images without boxes) and proposals around its
    boxes and at random, on a 1/4 px grid so that IoUs at exactly a threshold happen and float32 holds every value."""
    rng = np.random.default_rng(seed)
    images, anns, proposals = [], [], {}

    def grid(x):
        return np.round(np.asarray(x) * 4) / 4

    for i in range(1, num_images + 1):
        size = 64
        images.append({"id": i, "file_name": f"{i}.png", "height": size, "width": size})
        boxes = []
        for _ in range(rng.integers(0, 9)):
            w, h = grid(rng.uniform(4, 30, 2))
            x, y = grid(rng.uniform(0, size - w)), grid(rng.uniform(0, size - h))
            boxes.append([x, y, x + w, y + h])
        if boxes and rng.random() < 0.3:
            boxes.append(list(boxes[0]))
        for b in boxes:
            crowd = int(rng.random() < 0.1)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 6)), "iscrowd": crowd,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        if rng.random() < 0.1:
            continue
        props = []
        for b in boxes:
            for _ in range(rng.integers(0, 6)):
                props.append(grid(np.array(b) + rng.normal(0, 2, 4)))
        for _ in range(rng.integers(0, 110)):
            w, h = rng.uniform(2, 40, 2)
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            props.append(grid([x, y, x + w, y + h]))
        if not props:
            continue
        props = np.array(props, np.float32)
        props = props[rng.permutation(len(props))]
        # coarse scores: many ties, which keep the given order
        scores = (np.round(rng.random(len(props)) * 20) / 20).astype(np.float32)
        proposals[i] = (props, scores)
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, 6)]
    return {"images": images, "annotations": anns, "categories": categories}, proposals


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ks", [(10, 20, 50, 100), (1, 3, 300)])
def test_equals_pycocotools_class_agnostic_recall(tmp_path, seed, ks):
    coco, proposals = _random_world(seed)
    novel = (2, 5)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    ours = proposal_recall(path, proposals, novel_category_ids=novel, ks=ks)
    ref = _pycocotools(coco, proposals, ks=ks, novel=novel)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12, nan_ok=True), key
    # The same from the loaded dataset, its novel classes taken from the dataset.
    dataset = load_coco_json(DatasetSpec("gt", path, tmp_path, novel))
    assert proposal_recall(dataset, proposals, ks=ks) == ours


def test_thresholds_are_pycocotools():
    from pycocotools.cocoeval import Params

    assert np.array_equal(IOU_THRESHOLDS, Params(iouType="bbox").iouThrs)


def test_speed_5000_images():
    rng = np.random.default_rng(0)
    records, proposals = [], {}
    for i in range(5000):
        g = rng.integers(1, 8)
        xy = rng.uniform(0, 400, (g, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (g, 2))], axis=1).astype(np.float32)
        records.append(ImageRecord(i, Path("x"), 640, 640, boxes, rng.integers(1, 3, g)))
        pxy = rng.uniform(0, 400, (100, 2))
        proposals[i] = (np.concatenate([pxy, pxy + rng.uniform(10, 200, (100, 2))], axis=1).astype(np.float32),
                        rng.random(100).astype(np.float32))
    dataset = DetectionDataset("big", Path("big.json"), records, [{"id": 1}, {"id": 2}], (2,))
    start = time.perf_counter()
    proposal_recall(dataset, proposals)
    assert time.perf_counter() - start < 10.0
