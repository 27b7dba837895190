"""Class-agnostic proposals (DESIGN §4): reading and writing the file, and the noisy oracle of the shapes world (§6).

File format: a COCO-results-style JSON list ``[{"image_id": int, "bbox": [x, y, w, h], "score": float}, ...]`` in
original-image pixels; any other key (``category_id``) is ignored. In memory: ``{image_id: (boxes float32 [N, 4] xyxy,
scores float32 [N])}``, boxes in file order; an image without proposals is absent.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
from torchvision.ops import box_iou

from ovd.data.catalog import DatasetSpec
from ovd.data.datasets import load_coco_json
from ovd.utils.io import read_json, write_json

__all__ = [
    "ProposalStats",
    "Proposals",
    "load_proposals",
    "make_oracle_proposals",
    "oracle_proposals_for_image",
    "save_proposals",
]

logger = logging.getLogger(__name__)

Proposals = dict[int, tuple[np.ndarray, np.ndarray]]
"""``{image_id: (boxes float32 [N, 4] xyxy, scores float32 [N])}``."""

# How many unknown image ids an error message or the stats list.
_SHOWN_IDS = 10
# Written coordinates are rounded to 1/100 px: far below anything a detector resolves, and the file stays small.
_BOX_DECIMALS = 2
_SCORE_DECIMALS = 5


@dataclass
class ProposalStats:
    """What :func:`load_proposals` read and what it changed, to be reported by the caller.

    Attributes:
        num_read: entries in the file.
        num_kept: entries returned.
        num_clipped: kept boxes that were clipped to their image (only counted when image sizes are known).
        num_zero_area: boxes dropped because they have no area (after clipping).
        num_unknown: entries skipped because their image id is not in ``image_sizes`` (``unknown="skip"``).
        unknown_image_ids: the first few of those image ids, sorted.
        num_images: images with at least one kept proposal.
    """

    num_read: int = 0
    num_kept: int = 0
    num_clipped: int = 0
    num_zero_area: int = 0
    num_unknown: int = 0
    unknown_image_ids: list[int] = field(default_factory=list)
    num_images: int = 0


def load_proposals(
    path: str | os.PathLike,
    *,
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
    unknown: Literal["error", "skip"] = "error",
) -> tuple[Proposals, ProposalStats]:
    """Read a proposals file.

    Args:
        path: COCO-results-style JSON (see the module docstring).
        image_sizes: ``{image_id: (height, width)}`` of the dataset. When given, image ids must be in it and boxes are
            clipped to their image; when None, ids are not checked and boxes are not clipped.
        unknown: what an entry whose image id is not in ``image_sizes`` does: ``"error"`` raises, ``"skip"`` drops it
            and counts it in the stats.

    Returns:
        ``(proposals, stats)``: ``{image_id: (boxes float32 [N, 4] xyxy, scores float32 [N])}`` with boxes in file
        order (images with no proposal left are absent), and what was clipped, dropped or skipped. A warning is logged
        when anything was.

    Raises:
        ValueError: not a list of entries, an entry without ``image_id``/``bbox``/``score`` or with non-finite values
            (naming the file and the entry), or unknown image ids with ``unknown="error"`` (naming the first ones).
    """
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    path = Path(path)
    entries = read_json(path, what="proposals file")
    if not isinstance(entries, list):
        raise ValueError(
            f"proposals file {path} must hold a JSON list of {{image_id, bbox, score}}, got {type(entries).__name__}"
        )
    image_ids, xywh, scores = _parse_entries(entries, path)
    stats = ProposalStats(num_read=len(entries))

    if image_sizes is not None:
        known = np.isin(image_ids, np.fromiter(image_sizes.keys(), np.int64, len(image_sizes)))
        if not known.all():
            missing = np.unique(image_ids[~known])
            shown = missing[:_SHOWN_IDS].tolist()
            if unknown == "error":
                raise ValueError(
                    f"proposals file {path} has proposals for {len(missing)} image ids not in the dataset "
                    f"(first: {shown}); is it the proposals file of another dataset? "
                    "(skip them with unknown='skip', --skip-unknown-images)"
                )
            stats.num_unknown, stats.unknown_image_ids = int((~known).sum()), shown
            image_ids, xywh, scores = image_ids[known], xywh[known], scores[known]

    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    if image_sizes is not None and len(image_ids):
        hw = np.array([image_sizes[i] for i in image_ids.tolist()], dtype=np.float64).reshape(-1, 2)
        limits = np.concatenate([hw[:, ::-1], hw[:, ::-1]], axis=1)
        clipped = np.clip(boxes, 0.0, limits)
        changed = (clipped != boxes).any(axis=1)
        boxes = clipped
    else:
        changed = np.zeros(len(boxes), dtype=bool)
    boxes = boxes.astype(np.float32)
    # Area is judged on the float32 values the caller gets, so a kept box is never empty downstream.
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    stats.num_zero_area = int((~has_area).sum())
    stats.num_clipped = int((changed & has_area).sum())
    image_ids, boxes, scores = image_ids[has_area], boxes[has_area], scores[has_area]
    stats.num_kept = len(image_ids)

    proposals = _group_by_image(image_ids, boxes, scores)
    stats.num_images = len(proposals)
    if stats.num_clipped or stats.num_zero_area or stats.num_unknown:
        logger.warning(
            "%s: %d proposals clipped to their image, %d of zero area dropped, %d for unknown images skipped",
            path, stats.num_clipped, stats.num_zero_area, stats.num_unknown,
        )
    return proposals, stats


def save_proposals(path: str | os.PathLike, proposals: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write ``{image_id: (boxes [N, 4] xyxy, scores [N])}`` as a COCO-results-style JSON list, atomically.

    Images are written in increasing id order, boxes in the given order, coordinates rounded to 1/100 px and scores
    to 5 decimals.
    """
    entries = []
    for image_id in sorted(proposals):
        boxes, scores = proposals[image_id]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes but {len(scores)} scores")
        xywh = np.round(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1), _BOX_DECIMALS)
        entries.extend(
            {"image_id": int(image_id), "bbox": b, "score": s}
            for b, s in zip(xywh.tolist(), np.round(scores, _SCORE_DECIMALS).tolist())
        )
    path = Path(path)
    write_json(path, entries)
    return path


def oracle_proposals_for_image(
    gt_boxes: np.ndarray,
    image_size: tuple[int, int],
    rng: np.random.Generator,
    *,
    recall: float = 0.9,
    jitter: float = 0.1,
    num_random: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy-oracle proposals of one image, standing in for MAVL (DESIGN §6).

    Each true box is kept with probability ``recall`` as a jittered copy: its centre moves by up to ``jitter`` of the
    box's width/height and each side length is scaled by ``exp(u)``, ``|u| <= jitter`` (all uniform), scored U(0.5, 1).
    ``num_random`` random boxes (sides 10–50 % of the image's) are added, scored U(0, 0.6), so scores are informative
    but imperfect. Boxes are clipped to the image and kept at least 1 px wide and high.

    Args:
        gt_boxes: float [G, 4] xyxy, every class.
        image_size: (height, width).

    Returns:
        ``(boxes float32 [P, 4] xyxy, scores float32 [P])``: the kept true boxes in order, then the random ones.
    """
    h, w = image_size
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    # Every draw is made for every box, kept or not, so one box's fate does not shift the others' noise.
    keep = rng.random(len(gt)) < recall
    u = rng.uniform(-jitter, jitter, (len(gt), 4))
    size = gt[:, 2:] - gt[:, :2]
    centre = (gt[:, :2] + gt[:, 2:]) / 2 + u[:, :2] * size
    new_size = size * np.exp(u[:, 2:])
    true_boxes = np.concatenate([centre - new_size / 2, centre + new_size / 2], axis=1)[keep]
    true_scores = rng.uniform(0.5, 1.0, len(gt))[keep]

    sides = rng.uniform(0.1, 0.5, (num_random, 2)) * np.array([w, h])
    corner = rng.uniform(0.0, 1.0, (num_random, 2)) * (np.array([w, h]) - sides)
    random_boxes = np.concatenate([corner, corner + sides], axis=1)
    random_scores = rng.uniform(0.0, 0.6, num_random)

    boxes = np.concatenate([true_boxes, random_boxes])
    boxes[:, :2] = np.clip(boxes[:, :2], 0.0, [w - 1.0, h - 1.0])
    boxes[:, 2:] = np.clip(np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0), 0.0, [w, h])
    return boxes.astype(np.float32), np.concatenate([true_scores, random_scores]).astype(np.float32)


def make_oracle_proposals(
    json_file: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    recall: float = 0.9,
    jitter: float = 0.1,
    num_random: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Write noisy-oracle proposals for every image of a COCO file with *all* boxes (``train_all.json``, ``val.json``).

    Image ``i``'s proposals come from ``numpy.random.default_rng([seed, i])`` (:func:`oracle_proposals_for_image`), so
    they do not depend on the other images.

    Returns:
        stats: ``images``, ``gt_boxes``, ``proposals``, ``images_without_proposals``, ``recall_target``, and
        ``recall_achieved``: the fraction of true boxes with a written proposal of IoU >= 0.5.
    """
    if not 0.0 <= recall <= 1.0:
        raise ValueError(f"recall must be in [0, 1], got {recall}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if num_random < 0:
        raise ValueError(f"num_random must be >= 0, got {num_random}")
    json_file = Path(json_file)
    dataset = load_coco_json(DatasetSpec(json_file.stem, json_file, json_file.parent))
    proposals: Proposals = {}
    num_gt = num_found = 0
    for record in sorted(dataset.records, key=lambda r: r.image_id):
        rng = np.random.default_rng([seed, record.image_id])
        boxes, scores = oracle_proposals_for_image(
            record.boxes, (record.height, record.width), rng, recall=recall, jitter=jitter, num_random=num_random
        )
        # Measured on the boxes as written, rounded.
        boxes = np.round(boxes, _BOX_DECIMALS)
        if len(boxes):
            proposals[record.image_id] = (boxes, scores)
        num_gt += len(record.boxes)
        if len(record.boxes) and len(boxes):
            best = box_iou(torch.from_numpy(record.boxes).double(), torch.from_numpy(boxes).double()).amax(dim=1)
            num_found += int((best >= 0.5).sum())
    save_proposals(out_path, proposals)
    return {
        "images": len(dataset.records),
        "gt_boxes": num_gt,
        "proposals": sum(len(s) for _, s in proposals.values()),
        "images_without_proposals": len(dataset.records) - len(proposals),
        "recall_target": recall,
        "recall_achieved": num_found / num_gt if num_gt else float("nan"),
    }


def _parse_entries(entries: list, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image_ids int64 [N], xywh float64 [N, 4], scores float32 [N])``; a malformed entry raises naming it."""
    try:
        raw_ids = [e["image_id"] for e in entries]
        if not all(type(i) is int for i in raw_ids):
            raise TypeError("image ids must be integers")
        image_ids = np.array(raw_ids, dtype=np.int64)
        xywh = np.array([e["bbox"] for e in entries], dtype=np.float64).reshape(len(entries), 4)
        scores = np.array([e["score"] for e in entries], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        for i, e in enumerate(entries):
            ok = (
                isinstance(e, dict) and type(e.get("image_id")) is int
                and isinstance(e.get("bbox"), list) and len(e["bbox"]) == 4
                and all(isinstance(v, (int, float)) for v in e["bbox"]) and isinstance(e.get("score"), (int, float))
            )
            if not ok:
                raise ValueError(
                    f"proposals file {path}: entry {i} ({e!r:.200}) is not {{image_id: int, bbox: [x, y, w, h], score}}"
                ) from None
        raise
    bad = ~(np.isfinite(xywh).all(axis=1) & np.isfinite(scores))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"proposals file {path}: entry {i} ({entries[i]!r:.200}) has a non-finite bbox or score")
    return image_ids, xywh, scores.astype(np.float32)


def _group_by_image(image_ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> Proposals:
    order = np.argsort(image_ids, kind="stable")
    ids, starts = np.unique(image_ids[order], return_index=True)
    return {
        int(i): (boxes[rows], scores[rows])
        for i, rows in zip(ids.tolist(), np.split(order, starts[1:]))
    }
