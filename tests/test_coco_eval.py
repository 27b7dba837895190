"""COCO open-vocabulary evaluation: split metrics against pycocotools and hand-computed AP, the evaluator's I/O."""

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools import mask as pycoco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovd.evaluation import RESULTS_FILENAME, COCOEvaluator, evaluate_detections, format_results_table, load_coco_gt
from ovd.evaluation.coco_eval import _merge_rank_detections
from ovd.utils.io import read_json, write_json

NOVEL = [3]


def _ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    x, y, w, h = bbox
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": list(bbox),
        "area": w * h,
        "iscrowd": iscrowd,
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
    }


def _write_gt(path, boxes_per_image, category_ids, *, size=100, crowd=()):
    """``boxes_per_image``: {image_id: [(category_id, [x, y, w, h]), ...]}; ``crowd``: annotation ids marked crowd."""
    annotations = []
    for image_id, objects in boxes_per_image.items():
        for category_id, bbox in objects:
            ann_id = len(annotations) + 1
            annotations.append(_ann(ann_id, image_id, category_id, bbox, iscrowd=int(ann_id in crowd)))
    gt = {
        "images": [{"id": i, "width": size, "height": size, "file_name": f"{i}.jpg"} for i in boxes_per_image],
        "categories": [{"id": c, "name": f"class{c}"} for c in category_ids],
        "annotations": annotations,
    }
    write_json(path, gt)
    return path


@pytest.fixture
def small_gt(tmp_path):
    """4 images, categories 1 and 2 base, 3 novel."""
    return _write_gt(
        tmp_path / "gt.json",
        {
            1: [(1, [10, 10, 30, 30]), (3, [50, 50, 40, 30])],
            2: [(2, [5, 5, 20, 40]), (1, [40, 40, 50, 50])],
            3: [(3, [20, 30, 30, 30])],
            4: [(2, [60, 10, 30, 30]), (1, [10, 60, 25, 25])],
        },
        [1, 2, 3],
    )


def _perfect_detections(gt_path, category_ids=None):
    anns = read_json(gt_path)["annotations"]
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in anns
        if category_ids is None or a["category_id"] in category_ids
    ]


def _pycocotools_stats(gt_path, detections, *, cat_ids=None):
    """The 12 numbers of COCOeval.summarize, on ``cat_ids`` only where given."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        coco_eval = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), "bbox")
        if cat_ids is not None:
            coco_eval.params.catIds = sorted(cat_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def test_perfect_detections_score_one(small_gt):
    results = evaluate_detections(small_gt, _perfect_detections(small_gt), novel_category_ids=NOVEL)
    for key in ("AP", "AP50", "AP75", "AP_novel", "AP50_novel", "AP_base", "AP50_base"):
        assert results[key] == pytest.approx(1.0), key
    assert results["per_category_AP50"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0), 3: pytest.approx(1.0)}


def test_base_only_detections(small_gt):
    results = evaluate_detections(small_gt, _perfect_detections(small_gt, [1, 2]), novel_category_ids=NOVEL)
    assert results["AP50_base"] == pytest.approx(1.0)
    assert results["AP50_novel"] == 0.0
    assert results["AP_novel"] == 0.0
    assert results["AP50"] == pytest.approx(2 / 3)  # mean over the three categories
    assert results["per_category_AP50"][3] == 0.0


def test_hand_computed_ap50(tmp_path):
    gt_path = _write_gt(tmp_path / "gt.json", {1: [(1, [0, 0, 20, 20]), (1, [50, 50, 20, 20])]}, [1])
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.9},  # TP
        {"image_id": 1, "category_id": 1, "bbox": [25, 0, 20, 20], "score": 0.8},  # FP: touches neither
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.7},  # TP
    ]
    # recall 1/2, 1/2, 1; precision 1, 1/2, 2/3 -> made non-increasing from the right: 1, 2/3, 2/3.
    # Of the 101 recall thresholds 0, 0.01, ..., 1, the 51 up to 0.5 read precision 1, the other 50 read 2/3.
    expected = (51 * 1 + 50 * 2 / 3) / 101
    results = evaluate_detections(gt_path, detections)
    assert results["AP50"] == pytest.approx(expected, abs=1e-6)
    assert results["AP"] == pytest.approx(expected, abs=1e-6)  # exact boxes: the same at every IoU threshold


def test_split_metrics_match_pycocotools_on_each_split(tmp_path):
    rng = np.random.default_rng(0)
    categories = [1, 2, 3, 4, 5, 9]  # 9 has no ground truth: it must not count in the base average
    novel = [2, 5]
    boxes_per_image = {}
    for image_id in range(1, 11):
        objects = []
        for _ in range(rng.integers(1, 6)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(10, 50, 2)
            objects.append((int(rng.choice(categories[:5])), [float(x), float(y), float(w), float(h)]))
        boxes_per_image[image_id] = objects
    gt_path = _write_gt(tmp_path / "gt.json", boxes_per_image, categories, size=200, crowd={3, 17})

    detections = []
    for ann in read_json(gt_path)["annotations"]:
        for _ in range(rng.integers(0, 3)):
            jitter = rng.normal(0, 4, 4)
            category = ann["category_id"] if rng.random() < 0.7 else int(rng.choice(categories))
            bbox = [ann["bbox"][0] + jitter[0], ann["bbox"][1] + jitter[1]] + [
                max(1.0, ann["bbox"][2] + jitter[2]),
                max(1.0, ann["bbox"][3] + jitter[3]),
            ]
            image_id = ann["image_id"]
            detections.append({"image_id": image_id, "category_id": category, "bbox": bbox, "score": rng.random()})
    for image_id in boxes_per_image:
        for _ in range(3):
            bbox = [*rng.uniform(0, 150, 2), *rng.uniform(5, 50, 2)]
            category = int(rng.choice(categories))
            detections.append({"image_id": image_id, "category_id": category, "bbox": bbox, "score": rng.random()})
    before = copy.deepcopy(detections)

    results = evaluate_detections(gt_path, detections, novel_category_ids=novel)
    assert detections == before
    assert 0.1 < results["AP50_novel"] < 0.9 and 0.1 < results["AP50_base"] < 0.9

    everything = _pycocotools_stats(gt_path, detections)
    assert results["AP"] == pytest.approx(everything[0], abs=1e-9)
    assert results["AP50"] == pytest.approx(everything[1], abs=1e-9)
    assert results["AP75"] == pytest.approx(everything[2], abs=1e-9)
    for split, cat_ids in (("novel", novel), ("base", [c for c in categories if c not in novel])):
        stats = _pycocotools_stats(gt_path, detections, cat_ids=cat_ids)
        assert results[f"AP_{split}"] == pytest.approx(stats[0], abs=1e-9)
        assert results[f"AP50_{split}"] == pytest.approx(stats[1], abs=1e-9)
    for category, ap50 in results["per_category_AP50"].items():
        stats = _pycocotools_stats(gt_path, detections, cat_ids=[category])
        assert ap50 == pytest.approx(stats[1], abs=1e-9) if stats[1] > -1 else math.isnan(ap50)


def test_empty_detections_give_what_pycocotools_gives_without_detections(tmp_path):
    # Category 4 has only a crowd box and 5 none at all: nothing to find, so NaN like pycocotools' -1.
    gt_path = _write_gt(
        tmp_path / "gt.json",
        {1: [(1, [10, 10, 30, 30]), (4, [0, 0, 50, 50])], 2: [(3, [20, 20, 30, 30])]},
        [1, 3, 4, 5],
        crowd={2},
    )
    results = evaluate_detections(gt_path, [], novel_category_ids=[3, 5])
    for key in ("AP", "AP50", "AP75", "AP_novel", "AP50_novel", "AP_base", "AP50_base"):
        assert results[key] == 0.0, key
    assert results["per_category_AP50"][1] == 0.0 and results["per_category_AP50"][3] == 0.0
    assert math.isnan(results["per_category_AP50"][4]) and math.isnan(results["per_category_AP50"][5])

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        no_results = COCO()
        no_results.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
        no_results.createIndex()
        coco_eval = COCOeval(gt, no_results, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    reference = coco_eval.eval["precision"][0, :, :, 0, 2].max(axis=0)  # [K]: 0 with ground truth, -1 without
    assert reference.tolist() == [0.0, 0.0, -1.0, -1.0]


def test_no_novel_split_gives_nan(small_gt):
    results = evaluate_detections(small_gt, _perfect_detections(small_gt))
    assert math.isnan(results["AP_novel"]) and math.isnan(results["AP50_novel"])
    assert results["AP_base"] == pytest.approx(1.0)
    novel_column = format_results_table(results).splitlines()[1].split()[1]
    assert novel_column == "-"


@pytest.mark.parametrize(
    ("change", "message"),
    [({"image_id": 77}, "image_id 77"), ({"category_id": 42}, "category_id 42")],
)
def test_unknown_ids_are_named(small_gt, change, message):
    detections = _perfect_detections(small_gt)
    detections[2].update(change)
    with pytest.raises(ValueError, match=message) as error:
        evaluate_detections(small_gt, detections)
    assert str(small_gt) in str(error.value)


def test_unknown_novel_ids_and_missing_fields(small_gt):
    with pytest.raises(ValueError, match=r"\[7, 8\]"):
        evaluate_detections(small_gt, [], novel_category_ids=[3, 7, 8])
    with pytest.raises(ValueError, match=r"\[7\]"):
        COCOEvaluator(small_gt, novel_category_ids=[7])
    detections = _perfect_detections(small_gt)
    del detections[0]["score"]
    with pytest.raises(ValueError, match="score"):
        evaluate_detections(small_gt, detections)


def test_format_results_table_shows_percent():
    results = {"AP50": 0.494, "AP": 0.3012, "AP50_novel": 0.366, "AP_novel": 0.2, "AP50_base": 0.54, "AP_base": 0.35}
    table = format_results_table(results, title="COCO bbox")
    lines = table.splitlines()
    assert lines[0] == "COCO bbox"
    assert lines[1].split() == ["novel", "base", "all"]
    assert lines[2].split() == ["AP50", "36.6", "54.0", "49.4"]
    assert lines[3].split() == ["AP", "20.0", "35.0", "30.1"]


def test_evaluator_writes_xywh_and_matches_evaluate_detections(small_gt, tmp_path):
    anns = read_json(small_gt)["annotations"]
    evaluator = COCOEvaluator(small_gt, novel_category_ids=NOVEL, output_dir=tmp_path / "out")
    rng = np.random.default_rng(1)
    for image_id in (1, 2, 3, 4):
        xywh = torch.tensor([a["bbox"] for a in anns if a["image_id"] == image_id], dtype=torch.float32)
        xywh = xywh + torch.from_numpy(rng.normal(0, 3, xywh.shape)).float()
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        scores = torch.from_numpy(rng.random(len(boxes))).float()
        category_ids = torch.tensor([a["category_id"] for a in anns if a["image_id"] == image_id])
        # A wrong-class duplicate of the first box, so that the metrics are not all 1.
        evaluator.add(
            image_id,
            torch.cat([boxes, boxes[:1]]),
            torch.cat([scores, scores[:1] + 0.01]),
            torch.cat([category_ids, torch.tensor([3])]),
        )
    metrics = evaluator.evaluate()

    written = read_json(tmp_path / "out" / RESULTS_FILENAME)
    assert len(written) == len(anns) + 4
    assert set(written[0]) == {"image_id", "category_id", "bbox", "score"}
    assert metrics == evaluate_detections(small_gt, written, novel_category_ids=NOVEL)
    assert 0 < metrics["AP"] < 1

    evaluator.reset()
    assert evaluator.evaluate()["AP"] == 0.0


def test_evaluator_converts_xyxy_to_xywh(small_gt, tmp_path):
    evaluator = COCOEvaluator(small_gt, output_dir=tmp_path)
    evaluator.add(1, np.array([[10.0, 20.0, 40.123, 70.0]]), np.array([0.25]), np.array([1]))
    evaluator.evaluate()
    [det] = read_json(tmp_path / RESULTS_FILENAME)
    assert det == {"image_id": 1, "category_id": 1, "bbox": [10.0, 20.0, 30.12, 50.0], "score": 0.25}


def test_evaluator_add_validates(small_gt):
    evaluator = COCOEvaluator(small_gt)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    with pytest.raises(ValueError, match=r"scores and category_ids need shape \(2,\)"):
        evaluator.add(1, boxes, torch.tensor([0.5]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        evaluator.add(1, boxes[:, :3], torch.tensor([0.5, 0.4]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="category_id 42"):
        evaluator.add(1, boxes, torch.tensor([0.5, 0.4]), torch.tensor([1, 42]))
    with pytest.raises(ValueError, match="image_id 99"):
        evaluator.add(99, boxes, torch.tensor([0.5, 0.4]), torch.tensor([1, 2]))
    evaluator.add(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert evaluator.evaluate()["AP"] == 0.0


def test_evaluator_segm_with_masks(small_gt):
    evaluator = COCOEvaluator(small_gt, novel_category_ids=NOVEL, iou_type="segm")
    with pytest.raises(ValueError, match="needs masks"):
        evaluator.add(1, torch.zeros(1, 4), torch.ones(1), torch.ones(1, dtype=torch.int64))
    anns = read_json(small_gt)["annotations"]
    for image_id in (1, 2, 3, 4):
        mine = [a for a in anns if a["image_id"] == image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in mine)], dtype=torch.float32)
        masks = torch.zeros(len(mine), 100, 100, dtype=torch.bool)
        for mask, (x, y, w, h) in zip(masks, (a["bbox"] for a in mine)):
            mask[y : y + h, x : x + w] = True
        category_ids = torch.tensor([a["category_id"] for a in mine])
        evaluator.add(image_id, boxes, torch.ones(len(mine)), category_ids, masks=masks)
    results = evaluator.evaluate()
    assert results["AP"] == pytest.approx(1.0) and results["AP50_novel"] == pytest.approx(1.0)


def test_merge_rank_detections_keeps_one_copy_per_image():
    rank0 = [{"image_id": 1, "score": 0.9}, {"image_id": 1, "score": 0.5}, {"image_id": 2, "score": 0.4}]
    rank1 = [{"image_id": 3, "score": 0.8}, {"image_id": 1, "score": 0.9}, {"image_id": 1, "score": 0.5}]
    merged = _merge_rank_detections([rank0, rank1])
    assert merged == rank0 + rank1[:1]


def _distributed_worker(rank, init_file, gt_path, per_rank_detections, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = COCOEvaluator(gt_path, novel_category_ids=NOVEL, output_dir=out_dir)
        for det in per_rank_detections[rank]:
            x, y, w, h = det["bbox"]
            boxes = torch.tensor([[x, y, x + w, y + h]])
            evaluator.add(det["image_id"], boxes, torch.tensor([det["score"]]), torch.tensor([det["category_id"]]))
        write_json(Path(out_dir) / f"metrics_{rank}.json", evaluator.evaluate())

        # Rank 0 cannot write its results under a file: rank 1 must hear of it rather than wait forever.
        failing = COCOEvaluator(gt_path, output_dir=Path(out_dir) / f"metrics_{rank}.json")
        try:
            failing.evaluate()
            outcome = "no error"
        except Exception as e:
            outcome = type(e).__name__
        write_json(Path(out_dir) / f"failure_{rank}.json", outcome)
    finally:
        dist.destroy_process_group()


def test_evaluate_across_two_processes(small_gt, tmp_path):
    rng = np.random.default_rng(2)
    detections = [dict(d, score=float(rng.random())) for d in _perfect_detections(small_gt)]
    detections += [{"image_id": i, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.95} for i in (1, 2, 3, 4)]
    rank0 = [d for d in detections if d["image_id"] in (1, 2, 3)]
    image4 = [d for d in detections if d["image_id"] == 4]
    # The sampler padded rank 1 with image 1 again.
    rank1 = image4 + [d for d in detections if d["image_id"] == 1]
    torch.multiprocessing.spawn(
        _distributed_worker, args=(tmp_path / "init", str(small_gt), [rank0, rank1], str(tmp_path)), nprocs=2
    )

    expected = evaluate_detections(small_gt, rank0 + image4, novel_category_ids=NOVEL)
    with_duplicates = evaluate_detections(small_gt, rank0 + rank1, novel_category_ids=NOVEL)
    assert with_duplicates["AP"] != pytest.approx(expected["AP"])
    for rank in (0, 1):
        metrics = read_json(tmp_path / f"metrics_{rank}.json")
        for key in ("AP", "AP50", "AP75", "AP_novel", "AP50_novel", "AP_base", "AP50_base"):
            assert metrics[key] == expected[key], (rank, key)
    assert len(read_json(tmp_path / RESULTS_FILENAME)) == len(detections)
    assert read_json(tmp_path / "failure_0.json") in ("FileExistsError", "NotADirectoryError")
    assert read_json(tmp_path / "failure_1.json") == "RuntimeError"


def test_load_coco_gt_names_the_file(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="gt.json"):
        load_coco_gt(path)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize(("seed", "iou_type"), [(0, "bbox"), (1, "bbox"), (2, "bbox"), (3, "segm"), (4, "segm")])
def test_backends_match_pycocotools_cocoeval(tmp_path, backend, seed, iou_type):
    """Random ground truth (with crowd boxes and a category without any) and random detections, per seed: every
    number equals what pycocotools' COCOeval gives when called directly."""
    rng = np.random.default_rng(seed)
    categories = [1, 2, 3, 4, 5, 9]
    boxes_per_image = {
        image_id: [(int(rng.choice(categories[:5])), [*rng.uniform(0, 150, 2), *rng.uniform(10, 60, 2)])
                   for _ in range(rng.integers(0, 7))]
        for image_id in range(1, 16)
    }
    gt_path = _write_gt(tmp_path / "gt.json", boxes_per_image, categories, size=200, crowd={2, 11})
    detections = []
    for ann in read_json(gt_path)["annotations"]:
        for _ in range(rng.integers(0, 4)):
            x, y, w, h = np.asarray(ann["bbox"]) + rng.normal(0, 3, 4)
            category = ann["category_id"] if rng.random() < 0.7 else int(rng.choice(categories))
            detections.append({"image_id": ann["image_id"], "category_id": category,
                               "bbox": [x, y, max(w, 1.0), max(h, 1.0)], "score": float(rng.uniform(0.2, 1))})
    for image_id in boxes_per_image:
        for _ in range(rng.integers(0, 110)):  # some images over the cap of 100
            bbox = [*rng.uniform(0, 150, 2), *rng.uniform(3, 60, 2)]
            detections.append({"image_id": image_id, "category_id": int(rng.choice(categories)), "bbox": bbox,
                               "score": float(rng.uniform(0, 0.5))})
    if iou_type == "segm":
        for d in detections:  # masks that are not their boxes: a corner cut off
            x, y, w, h = d["bbox"]
            rle = pycoco_mask.merge(pycoco_mask.frPyObjects(
                [[x, y, x + w, y, x + w, y + 0.7 * h, x + 0.7 * w, y + h, x, y + h]], 200, 200))
            d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    novel = [2, 5]
    results = evaluate_detections(gt_path, detections, novel_category_ids=novel, iou_type=iou_type, backend=backend)

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        coco_eval = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"][:, :, :, 0, 2]  # area "all", 100 detections: [T, R, K]

    def reference(t, cat_ids):
        s = precision[t][:, :, [coco_eval.params.catIds.index(c) for c in cat_ids]]
        return float(s[s > -1].mean()) if (s > -1).any() else math.nan

    base = [c for c in categories if c not in novel]
    expected = {"AP": reference(slice(None), categories), "AP50": reference([0], categories),
                "AP75": reference([5], categories), "AP_novel": reference(slice(None), novel),
                "AP50_novel": reference([0], novel), "AP_base": reference(slice(None), base),
                "AP50_base": reference([0], base)}
    assert 0.05 < expected["AP"] < 0.95
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-4), key
    for c in categories:
        value = reference([0], [c])
        assert math.isnan(results["per_category_AP50"][c]) if math.isnan(value) else (
            results["per_category_AP50"][c] == pytest.approx(value, abs=1e-4)), c


def test_unknown_backend_is_named(small_gt):
    with pytest.raises(ValueError, match="backend must be one of .* got 'lvis'"):
        evaluate_detections(small_gt, [], backend="lvis")
    with pytest.raises(ValueError, match="backend must be one of"):
        COCOEvaluator(small_gt, backend="fast")
