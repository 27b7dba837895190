"""LVIS v1 metrics: AP, AP50, AP75, APs/APm/APl and AP per frequency group, APr being the open-vocabulary novel
metric (DESIGN §1 job 2, §2 "Splits": the rare classes are the novel ones).

The rules are those of the official LVIS API (``lvis.LVISEval`` with ``LVISResults``):

* each image keeps its 300 highest-scoring detections over all classes (``max_dets``);
* federated negatives: on an image, only the categories with a ground-truth box there or listed in its
  ``neg_category_ids`` are evaluated; detections of any other category are dropped, neither right nor wrong;
* an unmatched detection of a category in the image's ``not_exhaustive_category_ids`` is ignored (the image may
  hold unannotated instances of it); a matched one counts;
* AP is the COCO 101-point interpolated precision over IoU 0.50:0.95, averaged over the categories with ground
  truth; APr / APc / APf average the categories whose ``frequency`` is ``r`` / ``c`` / ``f``.

The engine is faster-coco-eval's LVIS mode (``lvis_style=True``), which matches, applies the federated and the
not-exhaustive rules and accumulates. This module prepares its input: it caps the detections per image (that mode
caps per image *and category*) and leaves out those of categories not evaluated on their image (which that mode
would drop anyway; see :func:`_evaluated_detections`); then it reads the metrics out of ``eval["precision"]``. For ``segm`` the detections' boxes are left out, so that the small / medium / large ranges
use the mask area, as detectron2's LVIS evaluation does (with a box, the LVIS API would take the box's area).

All AP values are fractions in [0, 1]; :func:`format_lvis_table` shows them ×100.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import faster_coco_eval
import numpy as np

from ovd.data.ov_splits import LVIS_FREQUENCIES, lvis_rare_category_ids
from ovd.evaluation.coco_eval import (
    DetectionEvaluator,
    check_detections,
    faster_coco_index,
    mean_precision,
    percent_cell,
    run_faster_cocoeval,
)
from ovd.utils.io import read_json

LVIS_RESULTS_FILENAME = "lvis_instances_results.json"
LVIS_MAX_DETS = 300
_AREAS = {"APs": "small", "APm": "medium", "APl": "large"}
_IMAGE_KEYS = ("id", "height", "width", "neg_category_ids", "not_exhaustive_category_ids")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "area")
_TABLE_KEYS = ("APr", "APc", "APf", "AP", "AP50", "AP75", "APs", "APm", "APl")


def evaluate_lvis(
    gt: str | Path | faster_coco_eval.COCO,
    detections: list[dict],
    *,
    iou_type: str = "bbox",
    max_dets: int = LVIS_MAX_DETS,
) -> dict[str, float]:
    """Score COCO-results-format detections against an LVIS v1 ground truth under the LVIS rules (module docstring).

    Args:
        gt: an ``lvis_v1_val.json``-format file, or what :func:`load_lvis_gt` returned for one.
        detections: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, with ``"segmentation"`` (RLE)
            for ``iou_type="segm"``. Not modified.
        iou_type: ``"bbox"`` or ``"segm"``.
        max_dets: detections kept per image, the highest-scoring over all classes (LVIS: 300).

    Returns:
        ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``APr``, ``APc``, ``APf``: fractions in [0, 1]. NaN
        where no category of the group (or no object of the area range) has ground truth.

    Raises:
        ValueError: the file is not in LVIS v1 format, or a detection lacks a field or refers to an image or
            category absent from it.
    """
    if isinstance(gt, faster_coco_eval.COCO):
        gt_name = "the given LVIS ground truth"
        check_lvis_format(gt.dataset, gt_name)
    else:
        gt, gt_name = load_lvis_gt(gt), str(gt)
    return _evaluate_lvis(gt, gt_name, detections, iou_type=iou_type, max_dets=max_dets)


def format_lvis_table(results: dict[str, Any], *, title: str = "") -> str:
    """Render the LVIS metrics as a fixed-width table, ×100 with one decimal; "-" where missing or NaN."""
    lines = [title] if title else []
    lines.append("".join(f"{key:>7}" for key in _TABLE_KEYS))
    lines.append("".join(f"{percent_cell(results.get(key)):>7}" for key in _TABLE_KEYS))
    return "\n".join(lines)


def load_lvis_gt(path: str | Path) -> faster_coco_eval.COCO:
    """Load an LVIS v1 ground-truth JSON, checked to be in LVIS format, with errors that name the file."""
    data = read_json(path, what="LVIS ground-truth file")
    check_lvis_format(data, str(path))
    return faster_coco_index(data)


def check_lvis_format(data: Any, name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``data`` has what LVIS evaluation reads.

    That is: ``images`` with ``id``, ``height``, ``width``, ``neg_category_ids``, ``not_exhaustive_category_ids``;
    ``annotations`` with ``id`` (> 0: 0 means "unmatched" to the matcher), ``image_id``, ``category_id``, ``bbox``,
    ``area``; ``categories`` with an ``r`` / ``c`` / ``f`` ``frequency``.
    """
    where = f"LVIS ground-truth file {name}"
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"{where} needs an object with 'images', 'annotations' and 'categories' lists")
    lvis_rare_category_ids(data, source=where)
    for what, keys in (("image", _IMAGE_KEYS), ("annotation", _ANNOTATION_KEYS)):
        for entry in data[f"{what}s"]:
            missing = [k for k in keys if k not in entry] if isinstance(entry, dict) else list(keys)
            if missing:
                label = f"{what} {entry.get('id')}" if isinstance(entry, dict) else f"{what} {entry!r:.60}"
                raise ValueError(f"{where} is not in LVIS v1 format: {label} lacks {missing}; expected {list(keys)}")
    zero = next((a for a in data["annotations"] if a["id"] == 0), None)
    if zero is not None:
        raise ValueError(
            f"{where}: annotation ids must be positive (0 means 'unmatched'), found id 0 on image {zero['image_id']}"
        )


class LVISEvaluator(DetectionEvaluator):
    """:class:`~ovd.evaluation.coco_eval.DetectionEvaluator` scoring with :func:`evaluate_lvis` (same ``add`` /
    ``evaluate`` / ``reset`` and distributed gathering as ``COCOEvaluator``).

    Writes ``output_dir/lvis_instances_results.json`` where ``output_dir`` is given (all detections, before the
    per-image cap, as the LVIS API reads them).
    """

    results_filename = LVIS_RESULTS_FILENAME

    def __init__(
        self,
        gt_json: str | Path,
        *,
        output_dir: str | Path | None = None,
        iou_type: str = "bbox",
        max_dets: int = LVIS_MAX_DETS,
    ) -> None:
        super().__init__(gt_json, load_lvis_gt(gt_json), output_dir=output_dir, iou_type=iou_type)
        _check_max_dets(max_dets)
        self.max_dets = max_dets

    def _score(self, detections: list[dict]) -> dict[str, float]:
        return _evaluate_lvis(self.gt, str(self.gt_json), detections, iou_type=self.iou_type, max_dets=self.max_dets)


def _evaluate_lvis(
    gt: faster_coco_eval.COCO, gt_name: str, detections: list[dict], *, iou_type: str, max_dets: int
) -> dict[str, float]:
    _check_max_dets(max_dets)
    check_detections(gt, gt_name, detections, iou_type)
    if iou_type == "segm":
        without = next((a for a in gt.dataset["annotations"] if "segmentation" not in a), None)
        if without is not None:
            raise ValueError(
                f"LVIS ground truth {gt_name}: annotation {without['id']} has no 'segmentation', "
                "needed for iou_type 'segm'"
            )

    kept = _evaluated_detections(gt, detections, max_dets)
    if iou_type == "segm":
        for det in kept:
            det.pop("bbox", None)
    coco_eval = run_faster_cocoeval(gt, kept, iou_type, lvis_style=True, max_dets=max_dets)
    p = coco_eval.params
    precision = coco_eval.eval["precision"][..., 0]  # [T, R, K, A]: the only detection cap is max_dets
    k_frequency = defaultdict(list)
    for k, category_id in enumerate(p.catIds):
        k_frequency[gt.cats[int(category_id)]["frequency"]].append(k)

    all_t = np.arange(len(p.iouThrs))
    t50 = np.flatnonzero(np.isclose(p.iouThrs, 0.5))
    t75 = np.flatnonzero(np.isclose(p.iouThrs, 0.75))
    k_all = np.arange(len(p.catIds))
    at_all = precision[..., p.areaRngLbl.index("all")]
    results = {
        "AP": mean_precision(at_all, all_t, k_all),
        "AP50": mean_precision(at_all, t50, k_all),
        "AP75": mean_precision(at_all, t75, k_all),
    }
    for key, area in _AREAS.items():
        results[key] = mean_precision(precision[..., p.areaRngLbl.index(area)], all_t, k_all)
    for frequency in LVIS_FREQUENCIES:
        results[f"AP{frequency}"] = mean_precision(at_all, all_t, np.array(k_frequency[frequency], dtype=np.int64))
    return results


def _evaluated_detections(gt: faster_coco_eval.COCO, detections: list[dict], max_dets: int) -> list[dict]:
    """Copies of the detections that LVIS evaluates: of each image's ``max_dets`` highest-scoring ones over all
    classes (ties: the earlier first), those of a category present or negative on the image.

    faster-coco-eval's LVIS mode drops the others itself, but for ``segm`` it still asks for the size of their image
    and fails on an image none of whose detections it keeps (faster-coco-eval 1.8.0); dropping them first also
    spares it loading them (most of a detector's 300 are of unverified categories).
    """
    per_image: dict[int, list[dict]] = defaultdict(list)
    for det in detections:
        per_image[det["image_id"]].append(det)
    kept = []
    for image_id, dets in per_image.items():
        if len(dets) > max_dets:
            dets = sorted(dets, key=lambda d: d["score"], reverse=True)[:max_dets]
        present = {a["category_id"] for a in gt.imgToAnns.get(image_id, ())}
        evaluated = present.union(gt.imgs[image_id]["neg_category_ids"])
        kept.extend(dict(d) for d in dets if d["category_id"] in evaluated)
    return kept


def _check_max_dets(max_dets: int) -> None:
    if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
        raise ValueError(f"max_dets must be a positive int (LVIS uses {LVIS_MAX_DETS}), got {max_dets!r}")
