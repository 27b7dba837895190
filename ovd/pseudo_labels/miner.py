"""Pseudo boxes from image-level labels (DESIGN §2 PIS, offline part): one box per label of an image.

Score of region ``r`` for label ``l`` of an image (the CLIP teacher standing in for MAVL's ``"every {name}"`` query)::

    p(l | r)  = softmax_c(logit_scale · cos(e_r, t_c))[l]       over the whole vocabulary c = 1..C
    s(r, l)   = p(l | r)^(1 − α) · objectness_r^α

``e_r`` is the teacher's image embedding of the region crop, ``t_c`` its text embedding of class ``c`` (both
L2-normalised), ``logit_scale`` the teacher's learned one (CLIP's: 100), ``objectness_r ∈ [0, 1]`` the proposal's
score. The softmax makes the score *relative*: a region is good for "red star" only if it looks more like a red star
than like any other class, which is what separates an object from the background or from a neighbour. Objectness
(weight α) breaks ties between a tight box and a loose box around the same object, which CLIP scores alike, and
between several regions the teacher is sure of. Each label takes the region of highest ``s``; a label whose best
``s`` is below ``threshold`` is dropped (the paper dropped MAVL scores ≤ 0.95), and an image left with no label is
dropped. ``s ∈ [0, 1]`` is written as the box's ``score``.

Regions come from a region store (:mod:`ovd.data.region_store`, typically extracted with a larger top-k for mining)
with their objectness read back from the proposals file the store was made from, or are encoded on the fly from a
proposals file. Pseudo boxes made elsewhere are imported with :func:`import_pseudo_boxes`.

Output (DESIGN §4): COCO JSON — ``images`` (the image-label file's entries of images that keep a label),
``categories``, ``annotations`` ``{id, image_id, category_id, bbox (xywh), area, iscrowd: 0, score}`` (images by
id, labels by id), and ``info`` (mode, parameters, stats); readable by
``ovd.data.datasets.load_image_labels(spec, pseudo_boxes=path)``.

Interruption: mining is one deterministic pass whose output is written once, at the end, atomically. A killed run
leaves a previous output file as it was, and running again writes the same bytes an uninterrupted run writes. The
costly part, encoding regions, is resumable where it belongs: extract a region store first (its chunks survive a
kill) and mine from it; mining from a store is a fast pass (no model).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou
from tqdm import tqdm

from ovd.clip.models import ClipBundle
from ovd.clip.regions import RegionPreprocessor, crop_regions, encode_regions, select_regions
from ovd.data.datasets import DetectionDataset, ImageRecord
from ovd.data.images import read_image
from ovd.data.proposals import Proposals, load_proposals
from ovd.data.region_store import RegionStore
from ovd.utils.io import read_json, remove_partial_files, write_json

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_LOGIT_SCALE",
    "DEFAULT_THRESHOLD",
    "EncodedRegions",
    "ImageRegions",
    "ImportStats",
    "MiningStats",
    "RegionSource",
    "StoreRegions",
    "import_pseudo_boxes",
    "mine_pseudo_boxes",
    "open_store_regions",
    "pseudo_box_precision",
    "save_pseudo_boxes",
    "score_regions",
]

# CLIP ViT-B/32's learned logit scale. A teacher with another learned scale should be mined at its own (the toy
# teacher of the shapes world learns ~15; tools/mine_pseudo_labels.py reads it from the model when given one):
# a scale far above the teacher's makes the softmax saturate, so scores stop ranking boxes by how sure the teacher is.
DEFAULT_LOGIT_SCALE = 100.0
# Measured on the shapes world (2000 train images, toy teacher at its own logit scale, noisy-oracle proposals): mixing
# in objectness lifts precision at every threshold (at 0.5: α = 0.3 vs 0 gives 0.973 vs 0.950 with ~6 proposals per
# image, 0.866 vs 0.755 with ~16 noisier ones; α from 0.3 to 0.5 is a plateau). Threshold 0.5 keeps 86 % / 75 % of the
# labels; above ~0.7 it starts cutting on objectness rather than on the teacher.
DEFAULT_ALPHA = 0.3
DEFAULT_THRESHOLD = 0.5

# A store box and its proposal are the same box up to float32 rounding; anything less means another proposals file.
_SAME_BOX_IOU = 0.99
_BOX_DECIMALS = 2
_SCORE_DECIMALS = 6
_SHOWN_IDS = 10


@dataclass
class ImageRegions:
    """The candidate regions of one image.

    Attributes:
        boxes: float32 [k, 4] xyxy, original-image pixels.
        embeds: float32 [k, D], the teacher's L2-normalised image embeddings of the region crops.
        objectness: float32 [k] in [0, 1], the proposals' scores; None where unknown (then only α = 0 is possible).
    """

    boxes: np.ndarray
    embeds: np.ndarray
    objectness: np.ndarray | None


RegionSource = Callable[[ImageRecord], ImageRegions]
"""Gives the regions of an image (``k = 0`` where it has none)."""


class StoreRegions:
    """Regions from a region store, with objectness matched back from the proposals the store was made from."""

    def __init__(self, store: RegionStore, proposals: Proposals | None) -> None:
        """
        Args:
            store: the region store.
            proposals: the proposals it was extracted from, clipped to the images as the extractor did
                (:func:`open_store_regions` loads them); None: no objectness.
        """
        self.store = store
        self.proposals = proposals

    def __call__(self, record: ImageRecord) -> ImageRegions:
        """Raises ValueError naming the image if a stored box is not among its proposals."""
        boxes, embeds = self.store.get(record.image_id)
        if self.proposals is None:
            return ImageRegions(boxes, embeds, None)
        proposal_boxes, scores = self.proposals.get(record.image_id, (np.zeros((0, 4), np.float32), np.zeros(0)))
        if len(boxes) == 0:
            return ImageRegions(boxes, embeds, np.zeros(0, np.float32))
        if len(proposal_boxes) == 0:
            raise ValueError(f"image {record.image_id} has {len(boxes)} regions in {self.store.path} but no proposals")
        iou = box_iou(torch.from_numpy(boxes).double(), torch.from_numpy(proposal_boxes).double())
        best_iou, match = iou.max(dim=1)
        if float(best_iou.min()) < _SAME_BOX_IOU:
            raise ValueError(
                f"image {record.image_id}: region store {self.store.path} has boxes that are not among the image's "
                "proposals; were the regions extracted from another proposals file?"
            )
        return ImageRegions(boxes, embeds, np.asarray(scores, np.float32)[match.numpy()])


class EncodedRegions:
    """Regions encoded on the fly: each image's proposals after class-agnostic NMS, the ``top_k`` best, cropped and
    encoded with the teacher exactly as the region-store extractor does (:mod:`ovd.clip.regions`)."""

    def __init__(self, bundle: ClipBundle, proposals: Proposals, *, top_k: int, nms_thresh: float) -> None:
        """proposals: clipped to the images (``load_proposals(..., image_sizes=...)``)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.bundle, self.proposals = bundle, proposals
        self.top_k, self.nms_thresh = top_k, nms_thresh
        self.preprocessor = RegionPreprocessor(bundle)

    def __call__(self, record: ImageRecord) -> ImageRegions:
        empty = np.zeros((0, 4), np.float32)
        boxes, scores = self.proposals.get(record.image_id, (empty, empty[:, 0]))
        keep = select_regions(boxes, scores, top_k=self.top_k, nms_thresh=self.nms_thresh)
        boxes, scores = boxes[keep], np.asarray(scores, np.float32)[keep]
        if len(boxes) == 0:
            return ImageRegions(boxes, np.zeros((0, self.bundle.embed_dim), np.float32), scores)
        image = read_image(record.file_name, what=f"image {record.image_id}")
        if image.shape[:2] != (record.height, record.width):
            raise ValueError(f"image {record.file_name} is {image.shape[0]}x{image.shape[1]} but its annotation says "
                             f"{record.height}x{record.width}")
        embeds = encode_regions(self.bundle, self.preprocessor(crop_regions(image, boxes)))
        return ImageRegions(boxes, embeds.numpy(), scores)


def open_store_regions(
    store_path: str | os.PathLike,
    *,
    image_sizes: Mapping[int, tuple[int, int]],
    proposals_file: str | os.PathLike | None = None,
    with_objectness: bool = True,
) -> StoreRegions:
    """Open a region store for mining, with the objectness of its regions.

    Args:
        store_path: the store folder.
        image_sizes: ``{image_id: (height, width)}`` of the image-label dataset (the proposals are clipped to them, as
            the extractor clipped them).
        proposals_file: the proposals the store was extracted from; default: the file named in the store's metadata.
        with_objectness: False: don't read proposals (mining with α = 0 needs none).

    Raises:
        FileNotFoundError: the store or the proposals file is missing.
        ValueError: the proposals file differs from the one the store was made from (its SHA-256 is in the store).
    """
    store = RegionStore.open(store_path)
    if not with_objectness:
        return StoreRegions(store, None)
    meta = store.meta
    if proposals_file is None:
        if not meta.get("proposals_file"):
            raise ValueError(f"region store {store.path} does not name its proposals file; pass it (--proposals)")
        proposals_file = meta["proposals_file"]
    proposals_file = Path(proposals_file)
    if not proposals_file.is_file():
        raise FileNotFoundError(f"proposals file of region store {store.path} not found: {proposals_file}")
    expected = meta.get("proposals_sha256")
    if expected is not None and hashlib.sha256(proposals_file.read_bytes()).hexdigest() != expected:
        raise ValueError(f"proposals file {proposals_file} is not the one region store {store.path} was extracted from "
                         "(SHA-256 differs)")
    proposals, _ = load_proposals(proposals_file, image_sizes=image_sizes, unknown="skip")
    return StoreRegions(store, proposals)


def score_regions(
    region_embeds: np.ndarray,
    text_embeds: np.ndarray,
    label_indices: np.ndarray,
    objectness: np.ndarray | None = None,
    *,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    alpha: float = DEFAULT_ALPHA,
) -> np.ndarray:
    """The mining score ``s(r, l) = p(l | r)^(1 − α) · objectness_r^α`` (module docstring).

    Args:
        region_embeds: float [k, D], L2-normalised.
        text_embeds: float [C, D], L2-normalised, the whole vocabulary.
        label_indices: int [L], rows of ``text_embeds`` to score.
        objectness: float [k] in [0, 1]; may be None only when ``alpha == 0``.

    Returns:
        float64 [k, L] in [0, 1].
    """
    if alpha != 0 and objectness is None:
        raise ValueError(f"alpha = {alpha} needs the regions' objectness, and none is known")
    logits = logit_scale * (np.asarray(region_embeds, np.float64) @ np.asarray(text_embeds, np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits[:, label_indices] - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    if alpha == 0:
        return np.exp(log_p)
    with np.errstate(divide="ignore"):  # objectness 0 gives score 0
        log_obj = np.log(np.asarray(objectness, np.float64))[:, None]
    return np.exp((1.0 - alpha) * log_p + alpha * log_obj)


@dataclass
class MiningStats:
    """What :func:`mine_pseudo_boxes` did.

    Attributes:
        images: image-labelled images processed.
        images_without_regions: images skipped because they have no region (not in the store, or no proposal).
        images_kept: images with at least one pseudo box.
        images_dropped: images without any pseudo box (those without regions included).
        labels: image labels in all.
        labels_without_regions: labels of the images without regions.
        labels_below_threshold: labels dropped because their best score is below the threshold.
        labels_kept: pseudo boxes written.
    """

    images: int = 0
    images_without_regions: int = 0
    images_kept: int = 0
    images_dropped: int = 0
    labels: int = 0
    labels_without_regions: int = 0
    labels_below_threshold: int = 0
    labels_kept: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mine_pseudo_boxes(
    records: Sequence[ImageRecord],
    *,
    category_ids: Sequence[int],
    text_embeds: np.ndarray,
    regions: RegionSource,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], MiningStats]:
    """Choose one box per image label among the image's regions (module docstring); deterministic.

    Args:
        records: the image-labelled images (``image_labels`` set), e.g. ``load_image_labels(spec).records``.
        category_ids: the vocabulary, C category ids in the order of ``text_embeds``' rows.
        text_embeds: float [C, D], the teacher's L2-normalised text embeddings of the vocabulary.
        regions: gives each image's regions (:class:`StoreRegions`, :class:`EncodedRegions`).
        threshold: labels whose best score is below it are dropped.
        alpha: weight of objectness, in [0, 1].
        logit_scale: CLIP's logit scale (temperature⁻¹) of the softmax over the vocabulary.

    Returns:
        ``(annotations, stats)``: COCO annotations (images by id, labels by id; ids from 1) with ``score``.

    Raises:
        ValueError: a label not in the vocabulary (image id and label named), embeddings of different dims, objectness
            outside [0, 1], or parameters out of range.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if logit_scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    text_embeds = np.asarray(text_embeds, np.float32)
    index = {int(c): i for i, c in enumerate(category_ids)}
    if text_embeds.ndim != 2 or len(text_embeds) != len(index):
        raise ValueError(f"text_embeds must be [C, D] with C = {len(index)} categories, got {list(text_embeds.shape)}")
    records = sorted(records, key=lambda r: r.image_id)
    for r in records:
        unknown = [int(c) for c in r.image_labels if int(c) not in index]
        if unknown:
            raise ValueError(f"image {r.image_id} is labelled with category ids {unknown}, which are not in the "
                             f"vocabulary of {len(index)} categories")

    stats = MiningStats(images=len(records))
    annotations: list[dict[str, Any]] = []
    for record in tqdm(records, desc="pseudo boxes", unit="img", disable=not progress):
        labels = np.asarray(record.image_labels, np.int64)
        stats.labels += len(labels)
        found = regions(record)
        if len(found.boxes) == 0:
            stats.images_without_regions += 1
            stats.labels_without_regions += len(labels)
            continue
        if found.embeds.shape[1] != text_embeds.shape[1]:
            raise ValueError(f"image {record.image_id}: region embeddings have dim {found.embeds.shape[1]}, "
                             f"text embeddings {text_embeds.shape[1]}")
        if found.objectness is not None and not ((found.objectness >= 0) & (found.objectness <= 1)).all():
            raise ValueError(f"image {record.image_id}: proposal scores must be in [0, 1] to serve as objectness")
        scores = score_regions(found.embeds, text_embeds, np.array([index[int(c)] for c in labels], np.int64),
                               found.objectness, logit_scale=logit_scale, alpha=alpha)
        best = scores.argmax(axis=0)
        best_scores = scores[best, np.arange(len(labels))]
        keep = best_scores >= threshold
        stats.labels_below_threshold += int((~keep).sum())
        for label, region, score in zip(labels[keep], best[keep], best_scores[keep]):
            annotations.append(_annotation(len(annotations) + 1, record.image_id, int(label),
                                           found.boxes[region], float(score)))
    stats.labels_kept = len(annotations)
    stats.images_kept = len({a["image_id"] for a in annotations})
    stats.images_dropped = stats.images - stats.images_kept
    return annotations, stats


@dataclass
class ImportStats:
    """What :func:`import_pseudo_boxes` did.

    Attributes:
        boxes_read: annotations in the file.
        boxes_not_image_label: skipped because their category is not among the image's labels.
        boxes_zero_area: skipped because they have no area once clipped to the image.
        boxes_clipped: kept boxes that were clipped to their image.
        boxes_below_threshold: skipped because their score is below the threshold.
        boxes_duplicate: skipped because a higher-scored box of the same image and label exists (one box per label).
        boxes_without_score: kept boxes that had no score (written with score 1).
        labels_kept: pseudo boxes written.
        images_kept: images with at least one.
        images_dropped: image-labelled images without any.
    """

    boxes_read: int = 0
    boxes_not_image_label: int = 0
    boxes_zero_area: int = 0
    boxes_clipped: int = 0
    boxes_below_threshold: int = 0
    boxes_duplicate: int = 0
    boxes_without_score: int = 0
    labels_kept: int = 0
    images_kept: int = 0
    images_dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_pseudo_boxes(
    path: str | os.PathLike,
    records: Sequence[ImageRecord],
    *,
    threshold: float | None = None,
) -> tuple[list[dict[str, Any]], ImportStats]:
    """Validate pseudo boxes made elsewhere (COCO JSON with ``annotations``) and convert them to our format.

    Boxes are clipped to their image; a box whose category is not among its image's labels, of zero area, or scored
    below ``threshold`` is skipped and counted; of several boxes for one label the highest-scored is kept (the first in
    the file on a tie). A box without ``score`` counts as score 1.

    Args:
        path: the file.
        records: the image-labelled images the boxes are for.
        threshold: minimum score (None: keep all).

    Returns:
        ``(annotations, stats)``, annotations as :func:`mine_pseudo_boxes` returns them.

    Raises:
        ValueError (naming the file): no ``annotations`` list, a malformed annotation, or boxes for image ids not in
            ``records`` (the first ids named).
    """
    path = Path(path)
    data = read_json(path, what="pseudo-box file")
    entries = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"pseudo-box file {path} is not COCO JSON with an 'annotations' list")
    by_id = {r.image_id: r for r in records}
    for i, a in enumerate(entries):
        ok = (isinstance(a, dict) and type(a.get("image_id")) is int and type(a.get("category_id")) is int
              and isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4
              and all(isinstance(v, (int, float)) and np.isfinite(v) for v in a["bbox"])
              and isinstance(a.get("score", 1.0), (int, float)))
        if not ok:
            raise ValueError(f"pseudo-box file {path}: annotation {i} ({a!r:.200}) is not "
                             "{image_id: int, category_id: int, bbox: [x, y, w, h], score?: float}")
    unknown = sorted({a["image_id"] for a in entries} - set(by_id))
    if unknown:
        raise ValueError(f"pseudo-box file {path} has boxes for {len(unknown)} image ids that are not in the "
                         f"image-label dataset (first: {unknown[:_SHOWN_IDS]})")

    stats = ImportStats(boxes_read=len(entries))
    # (image_id, label) -> (score, box xyxy, clipped, had a score)
    best: dict[tuple[int, int], tuple[float, np.ndarray, bool, bool]] = {}
    for a in entries:
        record = by_id[a["image_id"]]
        if a["category_id"] not in record.image_labels:
            stats.boxes_not_image_label += 1
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        raw = np.array([x, y, x + w, y + h])
        box = np.clip(raw, 0.0, [record.width, record.height, record.width, record.height])
        if box[2] <= box[0] or box[3] <= box[1]:
            stats.boxes_zero_area += 1
            continue
        score = float(a.get("score", 1.0))
        if threshold is not None and score < threshold:
            stats.boxes_below_threshold += 1
            continue
        key = (a["image_id"], a["category_id"])
        if key in best:
            stats.boxes_duplicate += 1
            if score <= best[key][0]:
                continue
        best[key] = (score, box, bool((box != raw).any()), "score" in a)
    annotations = [_annotation(i + 1, image_id, label, box, score)
                   for i, ((image_id, label), (score, box, _, _)) in enumerate(sorted(best.items()))]
    stats.boxes_clipped = sum(clipped for _, _, clipped, _ in best.values())
    stats.boxes_without_score = sum(not scored for _, _, _, scored in best.values())
    stats.labels_kept = len(annotations)
    stats.images_kept = len({a["image_id"] for a in annotations})
    stats.images_dropped = len(by_id) - stats.images_kept
    return annotations, stats


def save_pseudo_boxes(
    path: str | os.PathLike,
    *,
    image_labels: Mapping[str, Any],
    annotations: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any],
) -> Path:
    """Write pseudo boxes as COCO JSON (module docstring), atomically: a reader never sees, and a killed run never
    leaves, a partial file at ``path``.

    Args:
        image_labels: the image-label file's content (its ``images`` entries of images with a box are written, in
            file order, and its ``categories``).
        annotations: from :func:`mine_pseudo_boxes` or :func:`import_pseudo_boxes`.
        info: parameters and stats to record.
    """
    with_boxes = {a["image_id"] for a in annotations}
    path = Path(path)
    remove_partial_files(path)  # what a killed run left of its write
    write_json(path, {
        "info": dict(info),
        "images": [img for img in image_labels["images"] if img["id"] in with_boxes],
        "annotations": list(annotations),
        "categories": image_labels["categories"],
    })
    return path


def pseudo_box_precision(
    annotations: Sequence[Mapping[str, Any]],
    gt: DetectionDataset,
    *,
    novel_category_ids: Sequence[int] = (),
    iou_thresh: float = 0.5,
) -> dict[str, Any]:
    """Precision of pseudo boxes against true boxes: the fraction with IoU ≥ ``iou_thresh`` to a true box of the same
    class in the same image.

    Args:
        annotations: pseudo boxes (COCO, xywh).
        gt: the same images with all their true boxes (the shapes world's ``train_all.json``).
        novel_category_ids: classes reported as novel; the others are base.

    Returns:
        ``{"all" | "base" | "novel": {"boxes", "correct", "precision"}, "per_class": {name: {"split", "boxes",
        "correct", "precision"}}}``, precision NaN where there is no box.

    Raises:
        ValueError: a pseudo box of an image that ``gt`` does not have.
    """
    by_id = {r.image_id: r for r in gt.records}
    names = {c["id"]: c["name"] for c in gt.categories}
    novel = set(novel_category_ids)
    boxes = {cid: 0 for cid in names}
    correct = {cid: 0 for cid in names}
    for a in annotations:
        record = by_id.get(a["image_id"])
        if record is None:
            raise ValueError(f"pseudo box {a.get('id')} is of image {a['image_id']}, which the ground truth lacks")
        x, y, w, h = a["bbox"]
        true = record.boxes[record.category_ids == a["category_id"]]
        boxes[a["category_id"]] += 1
        if len(true):
            iou = box_iou(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float64), torch.from_numpy(true).double())
            correct[a["category_id"]] += bool(iou.max() >= iou_thresh)

    def summary(ids: Sequence[int]) -> dict[str, Any]:
        n, k = sum(boxes[c] for c in ids), sum(correct[c] for c in ids)
        return {"boxes": n, "correct": k, "precision": k / n if n else float("nan")}

    return {
        "all": summary(list(names)),
        "base": summary([c for c in names if c not in novel]),
        "novel": summary([c for c in names if c in novel]),
        "per_class": {names[c]: {"split": "novel" if c in novel else "base", **summary([c])} for c in names},
    }


def _annotation(ann_id: int, image_id: int, category_id: int, box: np.ndarray, score: float) -> dict[str, Any]:
    """A COCO annotation of an xyxy box, rounded like the proposals files (1/100 px) so output is stable."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = round(x2 - x1, _BOX_DECIMALS), round(y2 - y1, _BOX_DECIMALS)
    return {"id": ann_id, "image_id": int(image_id), "category_id": int(category_id),
            "bbox": [round(x1, _BOX_DECIMALS), round(y1, _BOX_DECIMALS), w, h], "area": round(w * h, 4),
            "iscrowd": 0, "score": round(score, _SCORE_DECIMALS)}
