"""Recall of class-agnostic proposals (DESIGN §2 "Where the proposals come from"): AR@k and recall at IoU 0.5, over
all classes and over the base and novel classes separately.

The definition is pycocotools' ``COCOeval`` with ``params.useCats = 0`` (every box of one class), ``iouType="bbox"``,
area range "all" and ``maxDets = ks``: per image the proposals are ranked by score (descending, ties in the given
order) and the first ``max(ks)`` kept; at each IoU threshold 0.50:0.05:0.95 they are matched greedily in that order,
each to the still-unmatched true box of highest IoU at or above the threshold (the last such box on a tie, as
pycocotools). Recall at ``k`` is the fraction of true boxes matched by one of their image's first ``k`` proposals;
``AR@k`` is its mean over the ten thresholds. Crowd boxes are left out of the ground truth: in pycocotools a
proposal can match a crowd box only when no other box is left for it, so they never change a recall. Images
without true boxes count for nothing. A split (base, novel) keeps only the true boxes of its classes; the proposals
stay the same. ``tests/test_proposal_recall.py`` pins every value to pycocotools.

Greedy matching of the first ``k`` proposals is a prefix of the matching of all of them, so one pass gives every
``k``; it runs over the proposal rank only, vectorised over images, IoU thresholds and splits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from ovd.data.catalog import DatasetSpec
from ovd.data.datasets import DetectionDataset, load_coco_json
from ovd.evaluation.coco_eval import percent_cell

__all__ = ["DEFAULT_KS", "IOU_THRESHOLDS", "format_recall_table", "proposal_recall"]

DEFAULT_KS = (10, 20, 50, 100)
# pycocotools' Params.iouThrs, the same expression, so that a box at exactly a threshold is judged alike.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
_SPLITS = ("", "_base", "_novel")
# Images are matched in batches padded to [images, proposals, true boxes]; this many IoU entries per batch.
_BATCH_ENTRIES = 1 << 21


def proposal_recall(
    gt: DetectionDataset | str | os.PathLike,
    proposals: Mapping[int, tuple[np.ndarray, np.ndarray]],
    *,
    novel_category_ids: Collection[int] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Class-agnostic recall of ``proposals`` against the true boxes of ``gt`` (see the module docstring).

    Args:
        gt: the dataset (its ``records``' ``boxes`` and ``category_ids``), or a COCO annotation file.
        proposals: ``{image_id: (boxes float [N, 4] xyxy, scores float [N])}`` (:mod:`ovd.data.proposals`); an
            image of ``gt`` that is absent has no proposals.
        novel_category_ids: the novel split; every other category is base. Default: the dataset's own (none for a
            file).
        ks: the proposal budgets per image.

    Returns:
        ``AR@k`` for each ``k`` and ``recall@0.5`` (IoU 0.5, ``max(ks)`` proposals) over all true boxes, the same
        with the suffixes ``_base`` and ``_novel``, and the box counts ``num_gt``, ``num_gt_base`` and
        ``num_gt_novel``. Recalls are fractions in [0, 1], NaN for a split without true boxes (pycocotools: -1).
        With no novel categories the ``_novel`` values and ``num_gt_novel`` are absent.

    Raises:
        ValueError: proposals of an image id not in ``gt``, boxes and scores of different lengths, a novel id that
            is not a category of ``gt``, or a ``k`` below 1.
    """
    dataset = gt if isinstance(gt, DetectionDataset) else _load_gt_file(Path(gt))
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be proposal counts >= 1, got {ks}")
    novel = set(dataset.novel_category_ids if novel_category_ids is None else (int(c) for c in novel_category_ids))
    unknown = sorted(novel - set(dataset.category_ids))
    if unknown:
        raise ValueError(f"novel_category_ids {unknown} are not categories of dataset {dataset.name}")
    known_ids = {r.image_id for r in dataset.records}
    stray = sorted(set(proposals) - known_ids)
    if stray:
        raise ValueError(f"proposals for {len(stray)} image ids not in dataset {dataset.name} (first: {stray[:10]}); "
                         "are they the proposals of another dataset?")
    splits = _SPLITS if novel else _SPLITS[:2]
    matched, num_gt = _match_all(dataset, proposals, novel, max_dets=ks[-1], num_splits=len(splits))

    metrics: dict[str, float] = {}
    for s, suffix in enumerate(splits):
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = matched[s] / num_gt[s] if num_gt[s] else np.full_like(matched[s], math.nan, dtype=np.float64)
        for k in ks:
            metrics[f"AR@{k}{suffix}"] = float(np.mean(recall[:, k - 1]))
        metrics[f"recall@0.5{suffix}"] = float(recall[0, ks[-1] - 1])
    for s, suffix in enumerate(splits):
        metrics[f"num_gt{suffix}"] = int(num_gt[s])
    return metrics


def format_recall_table(metrics: Mapping[str, float], *, title: str = "") -> str:
    """Render :func:`proposal_recall`'s values for the novel / base / all classes as a fixed-width table, ×100 with
    one decimal, with the number of true boxes in the last row. A missing or NaN value shows as "-"."""
    rows = [k for k in metrics if k.startswith(("AR@", "recall@")) and not k.endswith(("_base", "_novel"))]
    width = max(len(r) for r in [*rows, "gt boxes"])
    lines = [title] if title else []
    lines.append(f"{'':<{width}}{'novel':>8}{'base':>8}{'all':>8}")
    for metric in rows:
        values = (metrics.get(f"{metric}_novel"), metrics.get(f"{metric}_base"), metrics.get(metric))
        lines.append(f"{metric:<{width}}" + "".join(f"{percent_cell(v):>8}" for v in values))
    counts = (metrics.get("num_gt_novel"), metrics.get("num_gt_base"), metrics.get("num_gt"))
    lines.append(f"{'gt boxes':<{width}}" + "".join(f"{'-' if c is None else c:>8}" for c in counts))
    return "\n".join(lines)


def _load_gt_file(path: Path) -> DetectionDataset:
    return load_coco_json(DatasetSpec(path.stem, path, path.parent))


def _match_all(
    dataset: DetectionDataset,
    proposals: Mapping[int, tuple[np.ndarray, np.ndarray]],
    novel: set[int],
    *,
    max_dets: int,
    num_splits: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(matched int64 [S, T, max_dets], num_gt int64 [S])``: per split and IoU threshold, the true boxes matched
    by the first ``k`` proposals of their image (index ``k - 1``), summed over images; and the true boxes per split."""
    images = []
    for record in dataset.records:
        if not len(record.boxes):
            continue
        # pycocotools (useCats=0) sees an image's true boxes category by category, each in annotation order.
        order = np.argsort(record.category_ids, kind="stable")
        gt_boxes = np.asarray(record.boxes, np.float64)[order]
        is_novel = np.isin(record.category_ids[order], list(novel))
        in_split = np.stack([np.ones_like(is_novel), ~is_novel, is_novel][:num_splits])
        boxes, scores = proposals.get(record.image_id, (np.zeros((0, 4)), np.zeros(0)))
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(f"image {record.image_id}: {len(boxes)} proposal boxes but {len(scores)} scores")
        ranked = boxes[np.argsort(-scores, kind="stable")[:max_dets]]
        images.append((gt_boxes, in_split, ranked))

    num_t = len(IOU_THRESHOLDS)
    matched = np.zeros((num_splits, num_t, max_dets), np.int64)
    num_gt = np.zeros(num_splits, np.int64)
    # Images with similar numbers of boxes go together, so that little of a batch is padding.
    images.sort(key=lambda im: len(im[0]))
    start = 0
    while start < len(images):
        stop = start + 1
        while stop < len(images) and (stop + 1 - start) * max_dets * len(images[stop][0]) <= _BATCH_ENTRIES:
            stop += 1
        hits, batch_gt = _match_batch(images[start:stop], max_dets, num_splits)
        matched += np.cumsum(hits.sum(axis=0), axis=-1).reshape(num_splits, num_t, -1)
        num_gt += batch_gt
        start = stop
    return matched, num_gt


def _match_batch(
    images: list[tuple[np.ndarray, np.ndarray, np.ndarray]], max_dets: int, num_splits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of a batch of images at every IoU threshold and split at once.

    Args:
        images: per image ``(true boxes float64 [G, 4] xyxy, in_split bool [S, G], ranked proposals float64 [D, 4])``.

    Returns:
        ``(hits bool [B, S*T, max_dets], num_gt int64 [S])``: whether the proposal of each rank matched a true box
        (rows split-major, then threshold), and the true boxes per split.
    """
    num_images, num_t = len(images), len(IOU_THRESHOLDS)
    num_g = max(len(g) for g, _, _ in images)
    gt = np.zeros((num_images, num_g, 4))
    valid = np.zeros((num_images, num_splits, num_g), bool)
    det = np.zeros((num_images, max_dets, 4))
    det_valid = np.zeros((num_images, max_dets), bool)
    for b, (g, in_split, d) in enumerate(images):
        gt[b, : len(g)] = g
        valid[b, :, : len(g)] = in_split
        det[b, : len(d)] = d
        det_valid[b, : len(d)] = True

    ious = _bbox_iou(det, gt)  # [B, D, G]
    ious[~det_valid] = -1.0
    # One row per (split, threshold); a box outside the split is never a candidate, as if it were not there.
    thresholds = np.tile(IOU_THRESHOLDS, num_splits)[None, :, None]
    allowed = np.repeat(valid, num_t, axis=1)  # [B, S*T, G]
    taken = np.zeros_like(allowed)
    hits = np.zeros((num_images, num_splits * num_t, max_dets), bool)
    rows = np.arange(num_images)[:, None]
    cols = np.arange(num_splits * num_t)[None, :]
    for d in range(max_dets):
        iou = ious[:, d, None, :]
        candidate = (iou >= thresholds) & allowed & ~taken
        found = candidate.any(axis=-1)
        if not found.any():
            continue
        # The last box of the highest IoU: pycocotools replaces its best match on an equal IoU.
        scored = np.where(candidate, iou, -1.0)[..., ::-1]
        best = num_g - 1 - np.argmax(scored, axis=-1)
        taken[rows, cols, best] |= found
        hits[:, :, d] = found
    return hits, valid.sum(axis=(0, 2))


def _bbox_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU [B, D, G] of xyxy boxes [B, D, 4] and [B, G, 4], computed as pycocotools' ``bbIou`` does in double
    precision (areas as width × height, the intersection only where it has positive width and height)."""
    dw, dh = det[..., 2] - det[..., 0], det[..., 3] - det[..., 1]
    gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    w = np.minimum(det[:, :, None, 2], gt[:, None, :, 2]) - np.maximum(det[:, :, None, 0], gt[:, None, :, 0])
    h = np.minimum(det[:, :, None, 3], gt[:, None, :, 3]) - np.maximum(det[:, :, None, 1], gt[:, None, :, 1])
    overlap = (w > 0) & (h > 0)
    inter = np.where(overlap, w * h, 0.0)
    union = (dw * dh)[:, :, None] + (gw * gh)[:, None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)
