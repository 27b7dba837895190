"""Seconds of our COCO-OV and LVIS evaluation against calling the reference toolkits directly, and the largest
difference between the AP numbers the two give.

Made-up data of realistic size (``--images`` shrinks it), box AP:

* COCO-OV: the 65 categories of the open-vocabulary split (17 novel), ~7 objects per 640x480 image, 100 detections
  per image (jittered true boxes of the right or a wrong class, then random boxes). Ours: ``evaluate_detections``
  with each backend; reference: pycocotools' ``COCOeval`` evaluate + accumulate + summarize.
* LVIS v1: 1203 categories (337 r / 461 c / 405 f), ~12 objects of ~3.5 categories per image, 6-8
  ``neg_category_ids`` and some ``not_exhaustive_category_ids`` per image, 300 detections per image (jittered true
  boxes with their class, a negative class or any class, then random boxes of any class). Ours: ``evaluate_lvis``;
  reference: faster-coco-eval's ``COCOeval_faster(lvis_style=True)`` with ``maxDets=[300]``. Exactly 300 per image,
  so the per-image cap that only ours applies drops nothing.

The ground truth is loaded once, outside the timing; both sides start from the same in-memory detection list and get
their own copies of it (the toolkits write fields into the dicts they load). After one untimed call of each, runs
alternate ours / reference; median over ``--runs``.

    python benchmarks/bench_eval.py [--images 5000] [--runs 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import time
from collections import Counter
from typing import Callable

import faster_coco_eval
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovd.data.ov_splits import COCO_CATEGORIES, coco_split_ids
from ovd.evaluation import evaluate_detections, evaluate_lvis
from ovd.evaluation.coco_eval import faster_coco_index
from ovd.evaluation.lvis_eval import check_lvis_format

LVIS_GROUPS = {"r": 337, "c": 461, "f": 405}
COCO_KEYS = ("AP", "AP50", "AP75", "AP_novel", "AP50_novel", "AP_base", "AP50_base")
# faster-coco-eval's summary names -> ours
LVIS_KEYS = {"AP_all": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "APs", "AP_medium": "APm",
             "AP_large": "APl", "APr": "APr", "APc": "APc", "APf": "APf"}
W, H = 640, 480


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="images of each data set")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)

    coco_data, novel = make_coco_ov(rng, args.images)
    coco_dets = make_detections(rng, coco_data, per_image=100, vocab=[c["id"] for c in coco_data["categories"]])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = coco_data
        coco_gt.createIndex()
    lvis_data = make_lvis(rng, args.images)
    check_lvis_format(lvis_data, "the generated LVIS file")
    lvis_gt = faster_coco_index(lvis_data)
    lvis_dets = make_detections(rng, lvis_data, per_image=300, vocab=[c["id"] for c in lvis_data["categories"]])

    rows = []
    for backend in ("pycocotools", "faster_coco_eval"):
        rows.append((f"COCO-OV, ours on {backend}", "pycocotools") + compare(
            lambda: evaluate_detections(coco_gt, coco_dets, novel_category_ids=novel, backend=backend),
            lambda: pycocotools_direct(coco_gt, coco_dets, novel), COCO_KEYS, args.runs))
    rows.append(("LVIS, ours", "faster-coco-eval LVIS") + compare(
        lambda: evaluate_lvis(lvis_gt, lvis_dets), lambda: faster_lvis_direct(lvis_gt, lvis_dets), LVIS_KEYS.values(),
        args.runs))

    print(f"CPU, box AP, median of {args.runs} runs. COCO-OV: {args.images} images, {len(coco_dets)} detections, "
          f"{len(coco_data['annotations'])} objects, 65 categories (17 novel). LVIS v1: {args.images} images, "
          f"{len(lvis_dets)} detections, {len(lvis_data['annotations'])} objects, 1203 categories.")
    print(f"{'evaluation':<34}{'ours s':>8}  {'reference':<22}{'ref s':>8}{'ratio':>7}{'max |dAP|':>11}")
    for name, reference, ours_s, ref_s, diff in rows:
        print(f"{name:<34}{ours_s:>8.2f}  {reference:<22}{ref_s:>8.2f}{ours_s / ref_s:>7.2f}{diff:>11.1e}")


def compare(ours: Callable[[], dict], reference: Callable[[], dict], keys, runs: int) -> tuple[float, float, float]:
    """Median seconds of each (alternating, after one untimed call of each) and the largest |difference| over
    ``keys`` (NaN on both sides: 0)."""
    ours(), reference()  # the first call of a process pays for memory the later ones reuse
    t_ours, t_ref = [], []
    for _ in range(runs):
        a, seconds = timed(ours)
        t_ours.append(seconds)
        b, seconds = timed(reference)
        t_ref.append(seconds)
    diffs = [0.0 if math.isnan(a[k]) and math.isnan(b[k]) else abs(a[k] - b[k]) for k in keys]
    return statistics.median(t_ours), statistics.median(t_ref), max(diffs)


def timed(fn: Callable[[], dict]) -> tuple[dict, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def pycocotools_direct(gt: COCO, detections: list[dict], novel: list[int]) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    precision = coco_eval.eval["precision"][:, :, :, 0, 2]  # area "all", 100 detections
    cat_ids = coco_eval.params.catIds

    def split_mean(t, ids):
        s = precision[t][:, :, [cat_ids.index(c) for c in ids]]
        return float(s[s > -1].mean()) if (s > -1).any() else math.nan

    base = [c for c in cat_ids if c not in novel]
    return {"AP": coco_eval.stats[0], "AP50": coco_eval.stats[1], "AP75": coco_eval.stats[2],
            "AP_novel": split_mean(slice(None), novel), "AP50_novel": split_mean([0], novel),
            "AP_base": split_mean(slice(None), base), "AP50_base": split_mean([0], base)}


def faster_lvis_direct(gt: faster_coco_eval.COCO, detections: list[dict]) -> dict[str, float]:
    coco_eval = faster_coco_eval.COCOeval_faster(gt, gt.loadRes([dict(d) for d in detections]), "bbox",
                                                 lvis_style=True, print_function=lambda *a, **k: None)
    coco_eval.params.maxDets = [300]
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    stats = coco_eval.stats_as_dict
    return {ours: math.nan if stats[theirs] == -1 else stats[theirs] for theirs, ours in LVIS_KEYS.items()}


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 4]`` xywh inside a W x H image, sides log-uniform in 8..300 px."""
    wh = np.exp(rng.uniform(np.log(8), np.log(300), (n, 2)))
    wh = np.minimum(wh, [W - 1, H - 1])
    xy = rng.uniform(0, 1, (n, 2)) * ([W, H] - wh)
    return np.concatenate([xy, wh], axis=1).round(2)


def _image(image_id: int) -> dict:
    return {"id": image_id, "width": W, "height": H, "file_name": f"{image_id:012d}.jpg"}


def _annotations(rng: np.random.Generator, image_id: int, category_ids: np.ndarray, first_id: int) -> list[dict]:
    boxes = random_boxes(rng, len(category_ids))
    return [{"id": first_id + k, "image_id": image_id, "category_id": int(c), "bbox": b, "area": b[2] * b[3],
             "iscrowd": 0} for k, (c, b) in enumerate(zip(category_ids, boxes.tolist()))]


def make_coco_ov(rng: np.random.Generator, num_images: int) -> tuple[dict, list[int]]:
    split = coco_split_ids()
    ids = sorted(split["base"] + split["novel"])
    names = dict(COCO_CATEGORIES)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append(_image(image_id))
        n = max(1, rng.poisson(7))
        annotations += _annotations(rng, image_id, rng.choice(ids, n), len(annotations) + 1)
    categories = [{"id": c, "name": names[c], "supercategory": "thing"} for c in ids]
    return {"images": images, "annotations": annotations, "categories": categories}, split["novel"]


def make_lvis(rng: np.random.Generator, num_images: int) -> dict:
    frequency = np.repeat(list(LVIS_GROUPS), list(LVIS_GROUPS.values()))
    weight = np.select([frequency == "r", frequency == "c"], [1.0, 10.0], 100.0)
    weight /= weight.sum()
    ids = np.arange(1, len(frequency) + 1)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        present = rng.choice(ids, max(1, rng.poisson(3.5)), replace=False, p=weight)
        objects = rng.choice(present, max(1, rng.poisson(12)))
        absent = np.setdiff1d(rng.choice(ids, 8, replace=False), present)
        not_exhaustive = [int(c) for c in present if rng.random() < 0.15]
        images.append({**_image(image_id), "neg_category_ids": absent.tolist(),
                       "not_exhaustive_category_ids": not_exhaustive})
        annotations += _annotations(rng, image_id, objects, len(annotations) + 1)
    instance_count = Counter(a["category_id"] for a in annotations)
    image_count = Counter(c for c, _ in {(a["category_id"], a["image_id"]) for a in annotations})
    categories = [{"id": int(i), "name": f"category_{i}", "synset": f"category_{i}.n.01", "frequency": str(f),
                   "image_count": image_count[i], "instance_count": instance_count[i]} for i, f in zip(ids, frequency)]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_detections(rng: np.random.Generator, data: dict, *, per_image: int, vocab: list[int]) -> list[dict]:
    """``per_image`` detections of each image: up to 3 jittered copies of each true box (70% of its class, else a
    negative class where the image lists some, else any), then random boxes of any class; scores favour the copies."""
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    detections = []
    for image in data["images"]:
        anns = by_image.get(image["id"], [])[: per_image // 3]
        true_boxes = np.array([a["bbox"] for a in anns]).reshape(-1, 4)
        copies = np.repeat(true_boxes, 3, axis=0)
        copies = copies + rng.normal(0, 0.08, copies.shape) * np.tile(copies[:, 2:], 2)
        copies[:, 2:] = np.maximum(copies[:, 2:], 1.0)
        negatives = image.get("neg_category_ids") or vocab
        right = np.repeat([a["category_id"] for a in anns], 3)
        wrong = rng.choice(negatives, len(right)) if rng.random() < 0.5 else rng.choice(vocab, len(right))
        classes = np.where(rng.random(len(right)) < 0.7, right, wrong)
        boxes = np.concatenate([copies, random_boxes(rng, per_image - len(copies))]).round(2)
        classes = np.concatenate([classes, rng.choice(vocab, per_image - len(copies))]).astype(int)
        scores = np.concatenate([rng.uniform(0.2, 1.0, len(copies)), rng.uniform(0.0, 0.6, per_image - len(copies))])
        detections += [{"image_id": image["id"], "category_id": c, "bbox": b, "score": s}
                       for c, b, s in zip(classes.tolist(), boxes.tolist(), scores.round(4).tolist())]
    return detections


if __name__ == "__main__":
    main()
