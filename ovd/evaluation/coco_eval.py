"""COCO-style open-vocabulary metrics: AP over all, base and novel categories (DESIGN §1 job 2, §2 "Splits").

pycocotools is the reference: matching and the 101-point interpolated precision come from its ``COCOeval``; this
module only averages ``eval["precision"]`` over the categories of each split, the way ``COCOeval.summarize`` does.
``backend="faster_coco_eval"`` runs the same algorithm in faster-coco-eval's C++: the same numbers, faster on large
sets. The setting is "generalized": every category of the ground-truth file is evaluated and the detector is
expected to score all of them, so base and novel classes compete for the same boxes.

:class:`DetectionEvaluator` is what this evaluator shares with the LVIS one (``lvis_eval``): collecting the
detections of an evaluation loop image by image, and gathering them over the ranks of a distributed run.

All AP values are fractions in [0, 1]. :func:`format_results_table` shows them ×100, the papers' convention.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import faster_coco_eval
import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from ovd.utils.io import read_json, write_json

RESULTS_FILENAME = "coco_instances_results.json"
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")
_MAX_DETS = 100


def evaluate_detections(
    gt: str | Path | COCO,
    detections: list[dict],
    *,
    novel_category_ids: Collection[int] = (),
    iou_type: str = "bbox",
    backend: str = "pycocotools",
) -> dict[str, Any]:
    """Score COCO-format detections against a COCO ground truth, overall and per open-vocabulary split.

    Args:
        gt: the ground-truth JSON file, or a loaded ``COCO``. Its categories are the evaluated vocabulary.
        detections: COCO results dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, with
            ``"segmentation"`` (RLE) for ``iou_type="segm"``. Not modified.
        novel_category_ids: the novel split; every other evaluated category is base.
        iou_type: ``"bbox"`` or ``"segm"``.
        backend: ``"pycocotools"`` (the reference) or ``"faster_coco_eval"`` (the same numbers, faster).

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
    return _evaluate(
        coco_gt, gt_name, detections, novel_category_ids=novel_category_ids, iou_type=iou_type, backend=backend
    )


def coco_results(
    image_id: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    category_ids: np.ndarray,
    *,
    masks: np.ndarray | None = None,
    category_names: Sequence[str] | None = None,
    score_decimals: int | None = None,
) -> list[dict[str, Any]]:
    """One image's detections as COCO results dicts, the format pycocotools' ``loadRes`` reads.

    Args:
        boxes (ndarray [N, 4]): xyxy in original image pixels; written as xywh rounded to 0.01 px.
        scores (ndarray [N]); category_ids (ndarray [N]): dataset category ids.
        masks (ndarray [N, H, W], optional): binary masks, written as RLE ``segmentation``.
        category_names: also written, as ``category_name``, for readers without the category list.
        score_decimals: round the scores (None: as they are).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
    scores = [float(s) if score_decimals is None else round(float(s), score_decimals) for s in np.asarray(scores)]
    out = [{"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": s}
           for c, b, s in zip(np.asarray(category_ids).tolist(), xywh.tolist(), scores)]
    if category_names is not None:
        for det, name in zip(out, category_names):
            det["category_name"] = name
    if masks is not None and len(out):
        rles = mask_utils.encode(np.asfortranarray(np.asarray(masks).transpose(1, 2, 0).astype(np.uint8)))
        for det, rle in zip(out, rles):
            det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return out


def format_results_table(results: dict[str, Any], *, title: str = "") -> str:
    """Render AP50 and AP for the novel / base / all categories as a fixed-width table, ×100 with one decimal.

    A value that is missing or NaN (no category of that split) shows as "-".
    """
    lines = [title] if title else []
    lines.append(f"{'':<6}{'novel':>8}{'base':>8}{'all':>8}")
    for metric in ("AP50", "AP"):
        values = (results.get(f"{metric}_novel"), results.get(f"{metric}_base"), results.get(metric))
        lines.append(f"{metric:<6}" + "".join(f"{percent_cell(v):>8}" for v in values))
    return "\n".join(lines)


def percent_cell(value: float | None) -> str:
    """A fraction as a table cell: ×100 with one decimal, "-" where missing or NaN."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


class DetectionEvaluator:
    """Collects the detections of an evaluation loop, image by image, and scores them once at the end.

    Under ``torch.distributed`` with world size > 1, each rank adds the images it ran; :meth:`evaluate` gathers
    every rank's detections on rank 0, which removes the images that the sampler's padding evaluated twice, writes
    the results file and computes the metrics, then broadcasts them so that every rank returns the same dict. Only
    rank 0 scores because that is single-threaded CPU work that would otherwise run world-size times on the same
    cores. With NCCL, each rank must have called ``torch.cuda.set_device`` (the object collectives use it).

    The base of :class:`COCOEvaluator` and ``LVISEvaluator``: a subclass names its results file and implements
    :meth:`_score`.
    """

    results_filename: str

    def __init__(self, gt_json: str | Path, gt: Any, *, output_dir: str | Path | None, iou_type: str) -> None:
        """``gt``: the loaded ground truth of ``gt_json``, with ``imgs`` and ``cats`` dicts keyed by id."""
        _check_iou_type(iou_type)
        self.gt_json = Path(gt_json)
        self.gt = gt
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
        where = f"{type(self).__name__}.add(image_id={image_id})"
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

        if masks is not None:
            masks = _as_numpy(masks, np.bool_)
            if masks.ndim != 3 or len(masks) != n:
                raise ValueError(f"{where}: masks must have shape [{n}, H, W], got {tuple(masks.shape)}")
        self._detections.extend(coco_results(image_id, boxes, scores, category_ids, masks=masks))

    def evaluate(self) -> dict[str, Any]:
        """Metrics of everything added (on all ranks together).

        If ``output_dir`` was given, rank 0 also writes the detections to ``output_dir/<results_filename>``.
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
            raise RuntimeError(f"{type(self).__name__}: evaluation failed on rank 0: {outcome[0]}")
        return outcome[0]

    def _write_and_score(self, detections: list[dict]) -> dict[str, Any]:
        if self.output_dir is not None:
            write_json(self.output_dir / self.results_filename, detections)
        return self._score(detections)

    def _score(self, detections: list[dict]) -> dict[str, Any]:
        raise NotImplementedError


class COCOEvaluator(DetectionEvaluator):
    """:class:`DetectionEvaluator` scoring with :func:`evaluate_detections`; see there for the arguments and keys.

    Writes ``output_dir/coco_instances_results.json`` where ``output_dir`` is given.
    """

    results_filename = RESULTS_FILENAME

    def __init__(
        self,
        gt_json: str | Path,
        *,
        novel_category_ids: Collection[int] = (),
        output_dir: str | Path | None = None,
        iou_type: str = "bbox",
        backend: str = "pycocotools",
    ) -> None:
        super().__init__(gt_json, load_coco_gt(gt_json), output_dir=output_dir, iou_type=iou_type)
        # Checked now rather than after a whole evaluation loop.
        _check_backend(backend)
        _check_novel_ids(self.gt, str(self.gt_json), novel_category_ids)
        self.novel_category_ids = frozenset(int(c) for c in novel_category_ids)
        self.backend = backend

    def _score(self, detections: list[dict]) -> dict[str, Any]:
        return _evaluate(
            self.gt,
            str(self.gt_json),
            detections,
            novel_category_ids=self.novel_category_ids,
            iou_type=self.iou_type,
            backend=self.backend,
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


def faster_coco_index(dataset: dict) -> faster_coco_eval.COCO:
    """faster-coco-eval's index over a COCO-format dict (not copied: its evaluation adds keys to the annotations)."""
    gt = faster_coco_eval.COCO()
    gt.dataset = dataset
    gt.createIndex()
    return gt


def run_faster_cocoeval(
    gt: faster_coco_eval.COCO,
    results: list[dict],
    iou_type: str,
    *,
    lvis_style: bool = False,
    max_dets: int | None = None,
) -> faster_coco_eval.COCOeval_faster:
    """faster-coco-eval's evaluate + accumulate of ``results`` (consumed: it writes ids and areas into them).

    ``lvis_style`` applies LVIS's federated rules from the images' ``neg_category_ids`` and
    ``not_exhaustive_category_ids``; ``max_dets`` replaces the detection caps ``[1, 10, 100]`` by ``[max_dets]``.
    """
    coco_eval = faster_coco_eval.COCOeval_faster(
        gt, gt.loadRes(results), iouType=iou_type, lvis_style=lvis_style, print_function=_ignore
    )
    if max_dets is not None:
        coco_eval.params.maxDets = [max_dets]
    coco_eval.evaluate()
    coco_eval.accumulate()
    return coco_eval


def check_detections(gt: Any, gt_name: str, detections: Sequence[dict], iou_type: str) -> None:
    """Every detection has the fields ``iou_type`` needs, and refers to an image and category of ``gt``.

    ``gt``: a loaded ground truth with ``imgs`` and ``cats`` dicts keyed by id (pycocotools' or faster-coco-eval's).
    """
    _check_iou_type(iou_type)
    required = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    for i, det in enumerate(detections):
        missing = [key for key in required if key not in det]
        if missing:
            raise ValueError(f"detection {i} lacks {missing}, needed for iou_type {iou_type!r}")
    _check_ids(gt, gt_name, (d["image_id"] for d in detections), (d["category_id"] for d in detections))


def mean_precision(precision: np.ndarray, t_idx: np.ndarray, k_idx: np.ndarray) -> float:
    """Mean of ``precision[t_idx][:, :, k_idx]`` over entries with ground truth (> -1), as ``COCOeval.summarize``.

    ``precision`` (ndarray [T, R, K]): interpolated precision per IoU threshold, recall threshold and category.
    NaN where there are none (summarize prints -1).
    """
    s = precision[t_idx][:, :, k_idx]
    s = s[s > -1]
    return float(np.mean(s)) if s.size else math.nan


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
    backend: str,
) -> dict[str, Any]:
    _check_backend(backend)
    _check_novel_ids(coco_gt, gt_name, novel_category_ids)
    check_detections(coco_gt, gt_name, detections, iou_type)

    params = Params(iouType=iou_type)
    cat_ids = sorted(coco_gt.getCatIds())  # COCOeval's params.catIds: the K axis of eval["precision"]
    if detections:
        precision = _coco_precision(coco_gt, detections, iou_type, backend)
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
        "AP": mean_precision(precision, all_t, k_all),
        "AP50": mean_precision(precision, t50, k_all),
        "AP75": mean_precision(precision, t75, k_all),
        "AP_novel": mean_precision(precision, all_t, k_novel),
        "AP50_novel": mean_precision(precision, t50, k_novel),
        "AP_base": mean_precision(precision, all_t, k_base),
        "AP50_base": mean_precision(precision, t50, k_base),
        "per_category_AP50": {c: mean_precision(precision, t50, np.array([k])) for k, c in enumerate(cat_ids)},
    }


def _coco_precision(coco_gt: COCO, detections: list[dict], iou_type: str, backend: str) -> np.ndarray:
    """The interpolated precision at area "all" and 100 detections per image, ``[T, R, K]`` (-1: no GT)."""
    # loadRes writes id/area/iscrowd into each dict: give it copies so the caller's list stays as it was.
    results = [dict(d) for d in detections]
    if backend == "pycocotools":
        with _quiet():
            coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
    else:
        coco_eval = run_faster_cocoeval(faster_coco_index(coco_gt.dataset), results, iou_type)
    p = coco_eval.params
    return coco_eval.eval["precision"][:, :, :, p.areaRngLbl.index("all"), p.maxDets.index(_MAX_DETS)]


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_novel_ids(coco_gt: COCO, gt_name: str, novel_category_ids: Collection[int]) -> None:
    unknown = sorted({int(c) for c in novel_category_ids} - coco_gt.cats.keys())
    if unknown:
        raise ValueError(f"novel_category_ids {unknown} are not categories of the ground truth {gt_name}")


def _check_ids(gt: Any, gt_name: str, image_ids: Iterable[int], category_ids: Iterable[int]) -> None:
    for what, ids, known in (("image_id", image_ids, gt.imgs), ("category_id", category_ids, gt.cats)):
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


def _ignore(*args: Any, **kwargs: Any) -> None:
    """faster-coco-eval's progress reports go nowhere."""
