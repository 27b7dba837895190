"""COCO-style open-vocabulary metrics: AP over all, base and novel categories (DESIGN §1 job 2, §2 "Splits").

pycocotools is the reference: matching and the 101-point interpolated precision come from its ``COCOeval``; this
module only averages ``eval["precision"]`` over the categories of each split, the way ``COCOeval.summarize`` does.
The setting is "generalized": every category of the ground-truth file is evaluated and the detector is expected to
score all of them, so base and novel classes compete for the same boxes.

All AP values are fractions in [0, 1]. :func:`format_results_table` shows them ×100, the papers' convention.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from ovd.utils.io import read_json, write_json

RESULTS_FILENAME = "coco_instances_results.json"
IOU_TYPES = ("bbox", "segm")
_MAX_DETS = 100


def evaluate_detections(
    gt: str | Path | COCO,
    detections: list[dict],
    *,
    novel_category_ids: Collection[int] = (),
    iou_type: str = "bbox",
) -> dict[str, Any]:
    """Score COCO-format detections against a COCO ground truth, overall and per open-vocabulary split.

    Args:
        gt: the ground-truth JSON file, or a loaded ``COCO``. Its categories are the evaluated vocabulary.
        detections: COCO results dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, with
            ``"segmentation"`` (RLE) for ``iou_type="segm"``. Not modified.
        novel_category_ids: the novel split; every other evaluated category is base.
        iou_type: ``"bbox"`` or ``"segm"``.

    Returns:
        ``AP``, ``AP50``, ``AP75`` over all categories; ``AP_novel``, ``AP50_novel``, ``AP_base``, ``AP50_base``;
        ``per_category_AP50`` (category id -> AP50). Fractions in [0, 1], at area "all" and 100 detections per
        image. An average over no category with ground truth is NaN: the novel numbers when no novel ids are
        given, and the per-category AP50 of a category without (non-crowd) ground truth. With no detections every
        other value is 0.

    Raises:
        ValueError: a detection refers to an image or category absent from the ground truth, lacks a field, or a
            novel id is not a ground-truth category.
    """
    coco_gt, gt_name = (gt, "the given COCO object") if isinstance(gt, COCO) else (load_coco_gt(gt), str(gt))
    return _evaluate(coco_gt, gt_name, detections, novel_category_ids=novel_category_ids, iou_type=iou_type)


def format_results_table(results: dict[str, Any], *, title: str = "") -> str:
    """Render AP50 and AP for the novel / base / all categories as a fixed-width table, ×100 with one decimal.

    A value that is missing or NaN (no category of that split) shows as "-".
    """

    def cell(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"

    lines = [title] if title else []
    lines.append(f"{'':<6}{'novel':>8}{'base':>8}{'all':>8}")
    for metric in ("AP50", "AP"):
        values = (results.get(f"{metric}_novel"), results.get(f"{metric}_base"), results.get(metric))
        lines.append(f"{metric:<6}" + "".join(f"{cell(v):>8}" for v in values))
    return "\n".join(lines)


class COCOEvaluator:
    """Collects the detections of an evaluation loop, image by image, and scores them with :func:`evaluate_detections`.

    Under ``torch.distributed`` with world size > 1, each rank adds the images it ran; :meth:`evaluate` gathers
    every rank's detections on rank 0, which removes the images that the sampler's padding evaluated twice, writes
    the results file and computes the metrics, then broadcasts them so that every rank returns the same dict. Only
    rank 0 runs pycocotools because it is single-threaded CPU work that would otherwise run world-size times on the
    same cores. With NCCL, each rank must have called ``torch.cuda.set_device`` (the object collectives use it).
    """

    def __init__(
        self,
        gt_json: str | Path,
        *,
        novel_category_ids: Collection[int] = (),
        output_dir: str | Path | None = None,
        iou_type: str = "bbox",
    ) -> None:
        self.gt_json = Path(gt_json)
        self.gt = load_coco_gt(self.gt_json)
        # Checked now rather than after a whole evaluation loop.
        _check_iou_type(iou_type)
        _check_novel_ids(self.gt, str(self.gt_json), novel_category_ids)
        self.novel_category_ids = frozenset(int(c) for c in novel_category_ids)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.iou_type = iou_type
        self._detections: list[dict] = []

    def reset(self) -> None:
        """Forget the detections added so far."""
        self._detections = []

    def add(
        self,
        image_id: int,
        boxes: torch.Tensor | np.ndarray,
        scores: torch.Tensor | np.ndarray,
        category_ids: torch.Tensor | np.ndarray,
        *,
        masks: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Record the detections of one image.

        Args:
            image_id: the ground-truth image id.
            boxes (Tensor | ndarray [N, 4]): xyxy in original image pixels; stored as xywh rounded to 0.01 px.
            scores (Tensor | ndarray [N]).
            category_ids (Tensor | ndarray [N]): dataset category ids, not contiguous class indices.
            masks (Tensor | ndarray [N, H, W], optional): binary (bool or 0/1) masks at the original image size,
                stored as RLE; required for ``iou_type="segm"``.
        """
        image_id = int(image_id)
        boxes = _as_numpy(boxes, np.float64)
        scores = _as_numpy(scores, np.float64)
        category_ids = _as_numpy(category_ids, np.int64)
        where = f"COCOEvaluator.add(image_id={image_id})"
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{where}: boxes must have shape [N, 4] (xyxy), got {tuple(boxes.shape)}")
        n = len(boxes)
        if scores.shape != (n,) or category_ids.shape != (n,):
            raise ValueError(
                f"{where}: {n} boxes, so scores and category_ids need shape ({n},); "
                f"got {tuple(scores.shape)} and {tuple(category_ids.shape)}"
            )
        if masks is None and self.iou_type == "segm":
            raise ValueError(f"{where}: iou_type 'segm' needs masks")
        _check_ids(self.gt, str(self.gt_json), [image_id], category_ids.tolist())

        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
        detections = [
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for c, b, s in zip(category_ids.tolist(), xywh.tolist(), scores.tolist())
        ]
        if masks is not None:
            masks = _as_numpy(masks, np.bool_)
            if masks.ndim != 3 or len(masks) != n:
                raise ValueError(f"{where}: masks must have shape [{n}, H, W], got {tuple(masks.shape)}")
            if n:
                rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
                for det, rle in zip(detections, rles):
                    det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        self._detections.extend(detections)

    def evaluate(self) -> dict[str, Any]:
        """Metrics of everything added (on all ranks together); see :func:`evaluate_detections` for the keys.

        If ``output_dir`` was given, rank 0 also writes the detections to ``output_dir/coco_instances_results.json``.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._write_and_score(self._detections)
        rank = dist.get_rank()
        gathered: list[list[dict]] | None = [[] for _ in range(dist.get_world_size())] if rank == 0 else None
        dist.gather_object(self._detections, gathered, dst=0)
        outcome: list[Any] = [None]
        if rank == 0:
            try:
                outcome[0] = self._write_and_score(_merge_rank_detections(gathered))
            except Exception as e:
                # The other ranks are waiting in the broadcast: tell them, rather than leave them hanging.
                dist.broadcast_object_list([f"{type(e).__name__}: {e}"], src=0)
                raise
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], str):
            raise RuntimeError(f"COCO evaluation failed on rank 0: {outcome[0]}")
        return outcome[0]

    def _write_and_score(self, detections: list[dict]) -> dict[str, Any]:
        if self.output_dir is not None:
            write_json(self.output_dir / RESULTS_FILENAME, detections)
        return _evaluate(
            self.gt, str(self.gt_json), detections, novel_category_ids=self.novel_category_ids, iou_type=self.iou_type
        )


def load_coco_gt(path: str | Path) -> COCO:
    """Load a COCO ground-truth JSON without pycocotools' prints, with errors that name the file."""
    data = read_json(path, what="COCO ground-truth file")
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise ValueError(f"COCO ground-truth file {path} needs an object with 'images' and 'categories'")
    gt = COCO()
    gt.dataset = data
    with _quiet():
        gt.createIndex()
    return gt


def _merge_rank_detections(per_rank: Sequence[Sequence[dict]]) -> list[dict]:
    """Join the detection lists of all ranks, keeping each image's detections from the first rank that has it.

    A distributed sampler pads the dataset to a multiple of the world size, so a few images run on two ranks;
    keeping both copies would turn one copy of each of their true positives into false positives.
    """
    merged: list[dict] = []
    seen: set[int] = set()
    for detections in per_rank:
        merged.extend(d for d in detections if d["image_id"] not in seen)
        seen.update(d["image_id"] for d in detections)
    return merged


def _evaluate(
    coco_gt: COCO,
    gt_name: str,
    detections: list[dict],
    *,
    novel_category_ids: Collection[int],
    iou_type: str,
) -> dict[str, Any]:
    _check_iou_type(iou_type)
    _check_novel_ids(coco_gt, gt_name, novel_category_ids)
    required = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    for i, det in enumerate(detections):
        missing = [key for key in required if key not in det]
        if missing:
            raise ValueError(f"detection {i} lacks {missing}, needed for iou_type {iou_type!r}")
    _check_ids(coco_gt, gt_name, (d["image_id"] for d in detections), (d["category_id"] for d in detections))

    params = Params(iouType=iou_type)
    cat_ids = sorted(coco_gt.getCatIds())  # COCOeval's params.catIds: the K axis of eval["precision"]
    if detections:
        precision = _coco_precision(coco_gt, detections, iou_type)
    else:
        # loadRes cannot take an empty list; what COCOeval would give is 0 wherever there is ground truth to find.
        lo, hi = params.areaRng[params.areaRngLbl.index("all")]
        counted = {
            a["category_id"]
            for a in coco_gt.dataset.get("annotations", [])
            if not a.get("iscrowd", 0) and lo <= a["area"] <= hi
        }
        has_gt = np.array([c in counted for c in cat_ids])
        shape = (len(params.iouThrs), len(params.recThrs), len(cat_ids))
        precision = np.broadcast_to(np.where(has_gt, 0.0, -1.0), shape)

    all_t = np.arange(len(params.iouThrs))
    t50 = np.flatnonzero(np.isclose(params.iouThrs, 0.5))
    t75 = np.flatnonzero(np.isclose(params.iouThrs, 0.75))
    novel = {int(c) for c in novel_category_ids}
    k_all = np.arange(len(cat_ids))
    k_novel = np.array([k for k, c in enumerate(cat_ids) if c in novel], dtype=np.int64)
    k_base = np.array([k for k, c in enumerate(cat_ids) if c not in novel], dtype=np.int64)
    return {
        "AP": _mean_precision(precision, all_t, k_all),
        "AP50": _mean_precision(precision, t50, k_all),
        "AP75": _mean_precision(precision, t75, k_all),
        "AP_novel": _mean_precision(precision, all_t, k_novel),
        "AP50_novel": _mean_precision(precision, t50, k_novel),
        "AP_base": _mean_precision(precision, all_t, k_base),
        "AP50_base": _mean_precision(precision, t50, k_base),
        "per_category_AP50": {c: _mean_precision(precision, t50, np.array([k])) for k, c in enumerate(cat_ids)},
    }


def _coco_precision(coco_gt: COCO, detections: list[dict], iou_type: str) -> np.ndarray:
    """pycocotools' interpolated precision at area "all" and 100 detections per image, ``[T, R, K]`` (-1: no GT)."""
    # loadRes writes id/area/iscrowd into each dict: give it copies so the caller's list stays as it was.
    results = [dict(d) for d in detections]
    with _quiet():
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
    p = coco_eval.params
    return coco_eval.eval["precision"][:, :, :, p.areaRngLbl.index("all"), p.maxDets.index(_MAX_DETS)]


def _mean_precision(precision: np.ndarray, t_idx: np.ndarray, k_idx: np.ndarray) -> float:
    """Mean of ``precision[t_idx][:, :, k_idx]`` over entries with ground truth (> -1), as ``COCOeval.summarize``.

    NaN where there are none (summarize prints -1).
    """
    s = precision[t_idx][:, :, k_idx]
    s = s[s > -1]
    return float(np.mean(s)) if s.size else math.nan


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")


def _check_novel_ids(coco_gt: COCO, gt_name: str, novel_category_ids: Collection[int]) -> None:
    unknown = sorted({int(c) for c in novel_category_ids} - coco_gt.cats.keys())
    if unknown:
        raise ValueError(f"novel_category_ids {unknown} are not categories of the ground truth {gt_name}")


def _check_ids(coco_gt: COCO, gt_name: str, image_ids: Iterable[int], category_ids: Iterable[int]) -> None:
    for what, ids, known in (("image_id", image_ids, coco_gt.imgs), ("category_id", category_ids, coco_gt.cats)):
        unknown = sorted(set(ids) - known.keys())
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise ValueError(
                f"detections have {what} {', '.join(map(str, unknown[:5]))}{more}, not in the ground truth {gt_name}"
            )


def _as_numpy(x: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _quiet() -> contextlib.AbstractContextManager:
    """pycocotools reports progress with print(); keep it out of the logs."""
    return contextlib.redirect_stdout(io.StringIO())
