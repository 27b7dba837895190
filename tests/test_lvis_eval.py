"""LVIS v1 evaluation: each official rule on a made-up file with AP computed by hand, parity with the rules applied
around pycocotools' matcher on random data, the evaluator's I/O, and the errors on bad input.

Hand-computed AP: detections of a category sorted by score over all images give recall r_i and precision p_i; the
precision is made non-increasing from the right, and read at the 101 recall thresholds 0, 0.01, ..., 1 (the first
detection with r_i >= threshold; 0 past the last recall). AP is their mean. With boxes that equal the ground truth or
miss it entirely, every IoU threshold gives the same numbers, so AP = AP50 = AP75.
"""

import contextlib
import copy
import io
import math

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovd.evaluation import LVIS_RESULTS_FILENAME, LVISEvaluator, evaluate_lvis, format_lvis_table, load_lvis_gt
from ovd.utils.io import read_json, write_json

# Categories as lvis_v1_val.json writes them (ids, names and counts made up); 20 has no ground truth anywhere.
CATEGORIES = [
    {"id": 1, "name": "aerosol_can", "synset": "aerosol.n.02", "frequency": "c"},
    {"id": 3, "name": "airplane", "synset": "airplane.n.01", "frequency": "f"},
    {"id": 9, "name": "bow_(weapon)", "synset": "bow.n.04", "frequency": "r"},
    {"id": 12, "name": "dog", "synset": "dog.n.01", "frequency": "f"},
    {"id": 20, "name": "poncho", "synset": "poncho.n.01", "frequency": "r"},
]
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
# One false positive between two true positives of a 2-object category: recall 1/2, 1/2, 1 and precision 1, 1/2,
# 2/3, made non-increasing: 1, 2/3, 2/3. The 51 thresholds up to 0.5 read 1, the other 50 read 2/3.
TP_FP_TP = (51 * 1 + 50 * 2 / 3) / 101


def _polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def lvis_gt(images, *, categories=CATEGORIES, size=100):
    """An LVIS v1 ground truth. ``images``: {image_id: {"objects": [(category_id, [x, y, w, h]) or
    (category_id, polygon, area)], "neg": [...], "not_exhaustive": [...]}}."""
    image_entries, annotations = [], []
    for image_id, spec in images.items():
        image_entries.append({
            "id": image_id, "height": size, "width": size, "license": 4,
            "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
            "flickr_url": f"http://farm1.staticflickr.com/1/{image_id}_x.jpg", "date_captured": "2013-11-14 11:18:45",
            "neg_category_ids": spec.get("neg", []), "not_exhaustive_category_ids": spec.get("not_exhaustive", []),
        })
        for category_id, shape, *area in spec["objects"]:
            if area:  # a polygon and its area
                xs, ys = shape[0::2], shape[1::2]
                bbox, segmentation = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], [shape]
                area = area[0]
            else:
                bbox, segmentation, area = list(shape), _polygon(*shape), shape[2] * shape[3]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": bbox, "area": area, "segmentation": segmentation})
    cats = []
    for c in categories:
        mine = [a for a in annotations if a["category_id"] == c["id"]]
        cats.append({**c, "synonyms": [c["name"]], "def": f"a made-up definition of {c['name']}",
                     "image_count": len({a["image_id"] for a in mine}), "instance_count": len(mine)})
    return {"info": {"description": "made-up LVIS v1 file"}, "licenses": [], "images": image_entries,
            "annotations": annotations, "categories": cats}


def _write(tmp_path, data, name="lvis_v1_val.json"):
    write_json(tmp_path / name, data)
    return tmp_path / name


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == b[key], key


def _det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


@pytest.mark.parametrize("listed_negative", [False, True])
def test_false_positive_counts_only_for_a_negative_category(tmp_path, listed_negative):
    gt = _write(tmp_path, lvis_gt({
        1: {"objects": [(12, [0, 0, 20, 20])], "neg": [1] if listed_negative else []},
        2: {"objects": [(1, [10, 10, 20, 20]), (1, [50, 50, 20, 20])]},
    }))
    detections = [
        _det(1, 12, [0, 0, 20, 20], 0.9),  # dog: TP
        _det(2, 1, [10, 10, 20, 20], 0.8),  # aerosol_can: TP
        _det(1, 1, [60, 60, 20, 20], 0.7),  # aerosol_can on image 1, where it is neither present nor (maybe) negative
        _det(2, 1, [50, 50, 20, 20], 0.5),  # aerosol_can: TP
    ]
    results = evaluate_lvis(gt, detections)
    # Unlisted: image 1's aerosol_can box is not evaluated, so aerosol_can reads TP, TP: AP 1.
    # Listed negative: it is a false positive: TP, FP, TP -> TP_FP_TP.
    aerosol = TP_FP_TP if listed_negative else 1.0
    assert results["APc"] == pytest.approx(aerosol, abs=1e-9)
    assert results["APf"] == pytest.approx(1.0)  # dog
    for key in ("AP", "AP50", "AP75"):
        assert results[key] == pytest.approx((aerosol + 1.0) / 2, abs=1e-9), key


def test_not_exhaustive_category_ignores_only_unmatched_detections(tmp_path):
    gt = _write(tmp_path, lvis_gt({
        3: {"objects": [(3, [0, 0, 30, 30])], "not_exhaustive": [3]},
        4: {"objects": [(3, [5, 5, 30, 30])]},
    }))
    detections = [
        _det(3, 3, [0, 0, 30, 30], 0.8),  # TP on the not-exhaustive image: it counts
        _det(3, 3, [60, 60, 20, 20], 0.7),  # unmatched on the not-exhaustive image: ignored
        _det(4, 3, [70, 70, 20, 20], 0.6),  # unmatched on an exhaustive image: FP
        _det(4, 3, [5, 5, 30, 30], 0.4),  # TP
    ]
    # Read as TP, FP, TP -> TP_FP_TP. Counting the 0.7 box too (TP, FP, FP, TP: precision 1, 1/2, 1/3, 1/2 -> 1,
    # 1/2, 1/2, 1/2) would give (51 + 50/2) / 101; ignoring the matched 0.8 box too would leave FP, TP: (51/2) / 101.
    results = evaluate_lvis(gt, detections)
    assert results["AP"] == pytest.approx(TP_FP_TP, abs=1e-9)
    assert results["APf"] == pytest.approx(TP_FP_TP, abs=1e-9)
    assert math.isnan(results["APr"]) and math.isnan(results["APc"])  # no category of theirs has ground truth


@pytest.mark.parametrize(("num_fillers", "max_dets", "expected"), [(298, 300, 1.0), (299, 300, 0.5), (299, 301, 1.0)])
def test_cap_keeps_the_top_detections_per_image_over_all_classes(tmp_path, num_fillers, max_dets, expected):
    gt = _write(tmp_path, lvis_gt({1: {"objects": [(12, [0, 0, 20, 20]), (3, [40, 40, 20, 20])]}}))
    rng = np.random.default_rng(0)
    # Poncho is neither present nor negative on the image, so its boxes are never evaluated; they only take places
    # under the cap, which is applied first (as LVISResults does), over all classes of the image.
    fillers = [_det(1, 20, [*rng.uniform(0, 80, 2), 10, 10], float(s)) for s in rng.uniform(0.2, 0.8, num_fillers)]
    detections = [_det(1, 12, [0, 0, 20, 20], 0.9), *fillers, _det(1, 3, [40, 40, 20, 20], 0.1)]
    results = evaluate_lvis(gt, detections, max_dets=max_dets)
    # 300 detections fit; with 301 the airplane (lowest score) goes: its AP is 0, the dog's 1.
    assert results["AP"] == pytest.approx(expected)
    assert results["APf"] == pytest.approx(expected)
    assert math.isnan(results["APr"])  # poncho, the only rare category, has no ground truth


def test_frequency_groups_average_only_their_categories(tmp_path):
    gt = _write(tmp_path, lvis_gt({
        1: {"objects": [(12, [0, 0, 20, 20]), (9, [50, 0, 20, 20])], "neg": [1]},
        2: {"objects": [(3, [0, 0, 20, 20]), (3, [50, 50, 20, 20]), (1, [0, 50, 20, 20])], "neg": [20]},
    }))
    detections = [
        _det(1, 12, [0, 0, 20, 20], 0.9),  # dog: AP 1
        _det(2, 3, [0, 0, 20, 20], 0.9), _det(2, 3, [25, 25, 10, 10], 0.8), _det(2, 3, [50, 50, 20, 20], 0.7),
        _det(1, 1, [80, 80, 10, 10], 0.95), _det(2, 1, [0, 50, 20, 20], 0.3),  # aerosol_can: FP (negative), TP
        _det(2, 20, [80, 80, 10, 10], 0.9),  # poncho: negative on image 2, but no ground truth: no AP
    ]
    results = evaluate_lvis(gt, detections)
    # airplane: TP, FP, TP -> TP_FP_TP. aerosol_can: FP, TP: recall 0, 1, precision 0, 1/2 -> 1/2 everywhere.
    # bow_(weapon): not detected, 0. poncho has no ground truth, so APr is bow's alone.
    assert results["APr"] == 0.0
    assert results["APc"] == pytest.approx(0.5)
    assert results["APf"] == pytest.approx((1 + TP_FP_TP) / 2, abs=1e-9)
    assert results["AP"] == pytest.approx((0 + 0.5 + 1 + TP_FP_TP) / 4, abs=1e-9)


def test_segm_with_masks_uses_mask_iou_and_mask_area(tmp_path):
    # dog: an L of area 800 + 400 = 1200 (medium) in the box [0, 0, 40, 40]; aerosol_can: a 10x10 square (small).
    gt_path = _write(tmp_path, lvis_gt({1: {"objects": [(12, [0, 0, 40, 0, 40, 20, 20, 20, 20, 40, 0, 40], 1200),
                                                        (1, [60, 60, 10, 10])]}}))
    masks = torch.zeros(3, 100, 100, dtype=torch.uint8)
    masks[0, 0:31, 0:40] = 1  # dog: 1020 px inside the L, union 1420: mask IoU 0.718 (the boxes' IoU is 0.775)
    masks[1, 45:50, 45:50] = 1  # aerosol_can FP: 50 px (small) whose box, 50x50, would be medium
    masks[1, 90:95, 90:95] = 1
    masks[2, 60:70, 60:70] = 1  # aerosol_can: exact
    boxes = torch.tensor([[0.0, 0, 40, 31], [45, 45, 95, 95], [60, 60, 70, 70]])
    evaluator = LVISEvaluator(gt_path, iou_type="segm", output_dir=tmp_path / "out")
    evaluator.add(1, boxes, torch.tensor([0.9, 0.95, 0.5]), torch.tensor([12, 1, 1]), masks=masks)
    results = evaluator.evaluate()
    # dog: matched at IoU 0.50..0.70 (5 of 10 thresholds): AP 0.5, AP50 1, AP75 0. aerosol_can: FP, TP -> 1/2 at
    # every threshold. Small: only aerosol_can has a small object, and the FP counts there because its mask area
    # (50) is small; with its box area (2500) it would be ignored and APs would be 1. Medium: the dog's 0.5.
    expected = {"AP": 0.5, "AP50": 0.75, "AP75": 0.25, "APs": 0.5, "APm": 0.5, "APc": 0.5, "APf": 0.5}
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-9), key
    assert math.isnan(results["APl"]) and math.isnan(results["APr"])
    written = read_json(tmp_path / "out" / LVIS_RESULTS_FILENAME)
    assert len(written) == 3 and set(written[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    _assert_same(evaluate_lvis(gt_path, written, iou_type="segm"), results)
    # By box IoU (0.775) the dog matches at 6 of the 10 thresholds: AP (0.6 + 0.5) / 2.
    assert evaluate_lvis(gt_path, written)["AP"] == pytest.approx(0.55, abs=1e-9)


def test_bool_and_uint8_masks_agree(tmp_path):
    gt_path = _write(tmp_path, lvis_gt({1: {"objects": [(12, [10, 10, 30, 30])]}}))
    mask = torch.zeros(1, 100, 100, dtype=torch.bool)
    mask[0, 12:40, 10:40] = True
    scores = []
    for m in (mask, mask.to(torch.uint8), mask.numpy()):
        evaluator = LVISEvaluator(gt_path, iou_type="segm")
        evaluator.add(1, torch.tensor([[10.0, 12, 40, 40]]), torch.tensor([0.5]), torch.tensor([12]), masks=m)
        scores.append(evaluator.evaluate()["AP"])
    assert scores[0] == scores[1] == scores[2] == pytest.approx(0.9)  # IoU 840 / 900 = 0.933: 9 of 10 thresholds


def test_no_detections_and_reset(tmp_path):
    gt_path = _write(tmp_path, lvis_gt({1: {"objects": [(12, [0, 0, 20, 20]), (9, [50, 50, 40, 40])]}}))
    results = evaluate_lvis(gt_path, [])
    assert results["AP"] == 0.0 and results["APr"] == 0.0 and results["APf"] == 0.0
    assert math.isnan(results["APc"]) and math.isnan(results["APl"])
    evaluator = LVISEvaluator(gt_path)
    evaluator.add(1, torch.tensor([[0.0, 0, 20, 20]]), torch.tensor([0.9]), torch.tensor([12]))
    assert evaluator.evaluate()["APf"] == pytest.approx(1.0)
    evaluator.reset()
    _assert_same(evaluator.evaluate(), results)


def _distributed_worker(rank, init_file, gt_path, per_rank_detections, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = LVISEvaluator(gt_path, output_dir=out_dir)
        for image_id in sorted({d["image_id"] for d in per_rank_detections[rank]}):
            mine = [d for d in per_rank_detections[rank] if d["image_id"] == image_id]
            xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)])
            scores = torch.tensor([d["score"] for d in mine])
            evaluator.add(image_id, xyxy, scores, torch.tensor([d["category_id"] for d in mine]))
        write_json(Path(out_dir) / f"metrics_{rank}.json", evaluator.evaluate())
    finally:
        dist.destroy_process_group()


def test_evaluate_across_two_processes(tmp_path):
    gt, detections = _random_lvis(np.random.default_rng(5))
    for d in detections:
        d["bbox"] = [round(v, 2) for v in d["bbox"]]  # as add() stores them
    gt_path = _write(tmp_path, gt)
    first = [d for d in detections if d["image_id"] <= 6]
    # The sampler padded rank 1 with image 1 again: its detections must count once.
    second = [d for d in detections if d["image_id"] > 6 or d["image_id"] == 1]
    torch.multiprocessing.spawn(_distributed_worker, args=(tmp_path / "init", str(gt_path), [first, second],
                                                           str(tmp_path)), nprocs=2)
    expected = evaluate_lvis(gt_path, first + [d for d in second if d["image_id"] > 6])
    assert evaluate_lvis(gt_path, first + second)["AP"] != pytest.approx(expected["AP"])
    for rank in (0, 1):
        _assert_same(read_json(tmp_path / f"metrics_{rank}.json"), expected)
    assert len(read_json(tmp_path / LVIS_RESULTS_FILENAME)) == len(detections)


def _random_lvis(rng, num_images=12):
    images = {}
    for image_id in range(1, num_images + 1):
        objects = [(int(rng.choice([1, 3, 9, 12])), [*rng.uniform(0, 150, 2).tolist(), *rng.uniform(8, 60, 2).tolist()])
                   for _ in range(rng.integers(0, 6))]
        present = {c for c, _ in objects}
        absent = [c for c in (1, 3, 9, 12, 20) if c not in present]
        neg = [int(c) for c in rng.choice(absent, size=rng.integers(0, len(absent) + 1), replace=False)]
        not_exhaustive = [c for c in present if rng.random() < 0.4]
        images[image_id] = {"objects": objects, "neg": neg, "not_exhaustive": not_exhaustive}
    gt = lvis_gt(images, size=200)
    detections = []
    for ann in gt["annotations"]:
        for _ in range(rng.integers(0, 4)):
            x, y, w, h = np.asarray(ann["bbox"]) + rng.normal(0, 5, 4)
            category = ann["category_id"] if rng.random() < 0.7 else int(rng.choice([1, 3, 9, 12, 20]))
            detections.append(_det(ann["image_id"], category, [x, y, max(w, 2.0), max(h, 2.0)], float(rng.random())))
    for image_id in images:
        for _ in range(rng.integers(0, 25)):
            bbox = [*rng.uniform(0, 150, 2).tolist(), *rng.uniform(4, 80, 2).tolist()]
            detections.append(_det(image_id, int(rng.choice([1, 3, 9, 12, 20])), bbox, float(rng.random())))
    return gt, detections


def _lvis_rules_around_pycocotools(gt, detections, iou_type, max_dets):
    """The LVIS rules written out independently of faster-coco-eval, around pycocotools' per-image matcher."""
    kept = []
    for image_id in {d["image_id"] for d in detections}:
        mine = [d for d in detections if d["image_id"] == image_id]
        kept += sorted(mine, key=lambda d: -d["score"])[:max_dets]
    present = {(a["image_id"], a["category_id"]) for a in gt["annotations"]}
    negative = {(i["id"], c) for i in gt["images"] for c in i["neg_category_ids"]}
    not_exhaustive = {(i["id"], c) for i in gt["images"] for c in i["not_exhaustive_category_ids"]}
    kept = [dict(d) for d in kept if (d["image_id"], d["category_id"]) in present | negative]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        for a in coco_gt.dataset["annotations"]:
            a["iscrowd"] = 0  # pycocotools needs the field; LVIS has no crowd boxes
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(kept), iou_type)
        coco_eval.params.maxDets = [max_dets]
        match = coco_eval.evaluateImg

        def evaluate_img(image_id, category_id, area_range, max_det):
            result = match(image_id, category_id, area_range, max_det)
            if result is not None and (image_id, category_id) in not_exhaustive:
                result["dtIgnore"] = result["dtIgnore"] | (result["dtMatches"] == 0)
            return result

        coco_eval.evaluateImg = evaluate_img
        coco_eval.evaluate()
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"][..., 0]  # [T, R, K, A]
    frequency = [coco_gt.cats[c]["frequency"] for c in coco_eval.params.catIds]

    def mean(t=slice(None), area=0, group=None):
        k = [i for i, f in enumerate(frequency) if group in (None, f)]
        s = precision[t][:, :, k, area]
        return float(s[s > -1].mean()) if (s > -1).any() else math.nan

    return {"AP": mean(), "AP50": mean(t=[0]), "AP75": mean(t=[5]), "APs": mean(area=1), "APm": mean(area=2),
            "APl": mean(area=3), "APr": mean(group="r"), "APc": mean(group="c"), "APf": mean(group="f")}


@pytest.mark.parametrize(("seed", "iou_type"), [(0, "bbox"), (1, "bbox"), (2, "bbox"), (3, "segm")])
def test_matches_the_rules_applied_around_pycocotools(tmp_path, seed, iou_type):
    gt, detections = _random_lvis(np.random.default_rng(seed))
    if iou_type == "segm":
        for d in detections:
            x, y, w, h = d.pop("bbox")
            corner_cut = [x, y, x + w, y, x + w, y + 0.8 * h, x + 0.8 * w, y + h, x, y + h]
            rle = mask_utils.merge(mask_utils.frPyObjects([corner_cut], 200, 200))
            d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    before = copy.deepcopy(detections)
    results = evaluate_lvis(_write(tmp_path, gt), detections, iou_type=iou_type, max_dets=15)
    assert detections == before
    assert 0.1 < results["AP50"] < 0.9
    reference = _lvis_rules_around_pycocotools(gt, detections, iou_type, 15)
    for key in KEYS:
        if math.isnan(reference[key]):
            assert math.isnan(results[key]), key
        else:
            assert results[key] == pytest.approx(reference[key], abs=1e-4), key


def test_format_lvis_table():
    results = {"APr": 0.211, "APc": 0.25, "APf": 0.291, "AP": 0.259, "AP50": 0.4, "AP75": math.nan}
    lines = format_lvis_table(results, title="LVIS segm").splitlines()
    assert lines[0] == "LVIS segm"
    assert lines[1].split() == ["APr", "APc", "APf", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert lines[2].split() == ["21.1", "25.0", "29.1", "25.9", "40.0", "-", "-", "-", "-"]


@pytest.fixture
def small_gt(tmp_path):
    return _write(tmp_path, lvis_gt({1: {"objects": [(12, [0, 0, 20, 20])], "neg": [3]}, 2: {"objects": []}}))


@pytest.mark.parametrize(
    ("change", "message"), [({"image_id": 77}, "image_id 77"), ({"category_id": 42}, "category_id 42")]
)
def test_detections_of_unknown_images_or_categories_are_named(small_gt, change, message):
    detections = [_det(1, 12, [0, 0, 20, 20], 0.9), _det(2, 3, [0, 0, 5, 5], 0.5)]
    detections[1].update(change)
    with pytest.raises(ValueError, match=message) as error:
        evaluate_lvis(small_gt, detections)
    assert str(small_gt) in str(error.value)
    evaluator = LVISEvaluator(small_gt)
    image_id, category_id = detections[1]["image_id"], detections[1]["category_id"]
    with pytest.raises(ValueError, match=message) as error:
        evaluator.add(image_id, torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0.5]), torch.tensor([category_id]))
    assert str(small_gt) in str(error.value)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d["categories"][1].pop("frequency"), r"category 3 \('airplane'\) has no 'frequency', expected 'r'"),
        (lambda d: d["categories"][0].update(frequency="rare"), r"frequency 'rare', expected 'r', 'c' or 'f'"),
        (lambda d: d["images"][1].pop("neg_category_ids"), r"image 2 lacks \['neg_category_ids'\]"),
        (lambda d: d["images"][0].pop("not_exhaustive_category_ids"), r"image 1 lacks \['not_exhaustive_category_i"),
        (lambda d: d["annotations"][0].pop("area"), r"annotation 1 lacks \['area'\]"),
        (lambda d: d.pop("annotations"), "needs an object with 'images', 'annotations' and 'categories'"),
        (lambda d: d["annotations"][0].update(id=0), "annotation ids must be positive"),
    ],
)
def test_files_not_in_lvis_format_are_named(tmp_path, damage, message):
    data = lvis_gt({1: {"objects": [(12, [0, 0, 20, 20])]}, 2: {"objects": [(3, [5, 5, 10, 10])]}})
    damage(data)
    path = _write(tmp_path, data, "instances_val2017.json")
    for load in (load_lvis_gt, LVISEvaluator, lambda p: evaluate_lvis(p, [])):
        with pytest.raises(ValueError, match=message) as error:
            load(path)
        assert str(path) in str(error.value)


def test_other_bad_arguments(small_gt, tmp_path):
    with pytest.raises(ValueError, match="max_dets must be a positive int"):
        evaluate_lvis(small_gt, [], max_dets=0)
    with pytest.raises(ValueError, match="iou_type must be one of"):
        LVISEvaluator(small_gt, iou_type="boundary")
    with pytest.raises(ValueError, match="needs masks"):
        LVISEvaluator(small_gt, iou_type="segm").add(1, torch.zeros(1, 4), torch.ones(1), torch.tensor([12]))
    with pytest.raises(ValueError, match=r"lacks \['segmentation'\]"):
        evaluate_lvis(small_gt, [_det(1, 12, [0, 0, 20, 20], 0.9)], iou_type="segm")
    no_polygons = read_json(small_gt)
    del no_polygons["annotations"][0]["segmentation"]
    path = _write(tmp_path, no_polygons, "boxes_only.json")
    with pytest.raises(ValueError, match=r"annotation 1 has no 'segmentation', needed for iou_type 'segm'") as error:
        evaluate_lvis(path, [], iou_type="segm")
    assert str(path) in str(error.value)
