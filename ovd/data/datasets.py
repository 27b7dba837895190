"""Reading COCO-format box annotations into per-image records, with the checks a bad file needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ovd.data.catalog import DatasetSpec
from ovd.utils.io import read_json

logger = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One image: boxes (float32 [N, 4] xyxy, original pixels) and their dataset category ids (int64 [N]).

    For image-labelled data, ``image_labels`` (int64 [L]) are the category ids named for the image and the boxes
    are its pseudo boxes, one per kept label.
    """

    image_id: int
    file_name: Path
    height: int
    width: int
    boxes: np.ndarray
    category_ids: np.ndarray
    image_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    masks: list[list[np.ndarray]] | None = None  # per box, its polygons (flat float64 xy arrays); None without masks


@dataclass
class DetectionDataset:
    name: str
    json_file: Path
    records: list[ImageRecord]
    categories: list[dict]  # sorted by id; index in this list = contiguous class index
    novel_category_ids: tuple[int, ...]

    @property
    def category_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def class_image_counts(self) -> np.ndarray:
        """Images per class (int64 [C]) in the annotations; 0 for classes without boxes."""
        index = {cid: i for i, cid in enumerate(self.category_ids)}
        counts = np.zeros(len(index), dtype=np.int64)
        for r in self.records:
            for cid in set(r.category_ids.tolist()):
                counts[index[cid]] += 1
        return counts

    def __len__(self) -> int:
        return len(self.records)


def load_coco_json(spec: DatasetSpec, *, with_masks: bool = False) -> DetectionDataset:
    """Records of a COCO detection JSON. Boxes are clipped to the image; zero-area boxes and crowd
    annotations are dropped and counted in the log; unknown ids and a file with no images are errors.

    ``with_masks``: also keep each box's polygons (``segmentation``; for the mask head). Polygons with fewer than
    three points are dropped as detectron2 does; an annotation without polygons or with an RLE mask is an error.
    """
    path = spec.json_file
    data = read_json(path, what=f"annotation file of dataset {spec.name}")
    for key in ("images", "categories"):
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{path} is not a COCO annotation file: it has no {key!r} list")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    cat_ids = {c["id"] for c in categories}
    unknown_novel = set(spec.novel_category_ids) - cat_ids
    if unknown_novel:
        raise ValueError(f"dataset {spec.name}: novel category ids {sorted(unknown_novel)} are not in {path}")
    images = {}
    for img in data["images"]:
        try:
            images[img["id"]] = (_file_name(img), int(img["height"]), int(img["width"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{path}: image entry {img!r} needs id, file_name, height and width") from None
    if not images:
        raise ValueError(f"dataset {spec.name}: {path} has no images")
    per_image: dict[int, list[tuple[list[float], int, list[np.ndarray] | None]]] = {i: [] for i in images}
    clipped = dropped = crowd = 0
    for ann in data.get("annotations", []):
        img_id, cat = ann.get("image_id"), ann.get("category_id")
        if img_id not in images:
            raise ValueError(f"{path}: annotation {ann.get('id')} refers to image_id {img_id}, which is not in images")
        if cat not in cat_ids:
            raise ValueError(f"{path}: annotation {ann.get('id')} has category_id {cat}, which is not in categories")
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        _, h, w = images[img_id]
        x, y, bw, bh = _xywh(ann, path)
        box = [max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)]
        if box != [x, y, x + bw, y + bh]:
            clipped += 1
        if box[2] <= box[0] or box[3] <= box[1]:
            dropped += 1
            continue
        per_image[img_id].append((box, cat, _polygons(ann, path) if with_masks else None))
    if clipped or dropped or crowd:
        logger.warning(
            "%s: %d boxes clipped to their image, %d of zero area dropped, %d crowd annotations ignored",
            path, clipped, dropped, crowd,
        )
    root = Path(spec.image_root)
    records = []
    for img_id, (file_name, h, w) in images.items():
        anns = per_image[img_id]
        records.append(
            ImageRecord(
                image_id=img_id,
                file_name=safe_join(root, file_name, path),
                height=h,
                width=w,
                boxes=np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4),
                category_ids=np.array([a[1] for a in anns], dtype=np.int64),
                masks=[a[2] for a in anns] if with_masks else None,
            )
        )
    return DetectionDataset(spec.name, path, records, categories, tuple(spec.novel_category_ids))


def _polygons(ann: dict, path: Path) -> list[np.ndarray]:
    seg = ann.get("segmentation")
    if not isinstance(seg, list) or not all(isinstance(p, list) for p in seg):
        kind = "an RLE mask" if isinstance(seg, dict) else f"segmentation {type(seg).__name__}"
        raise ValueError(f"{path}: annotation {ann.get('id')} has {kind}; mask training (MODEL.MASK_ON) needs "
                         "polygons: a list of [x0, y0, x1, y1, ...] lists")
    return [np.asarray(p, dtype=np.float64) for p in seg if len(p) >= 6 and len(p) % 2 == 0]


def _xywh(ann: dict, source: str | Path) -> tuple[float, float, float, float]:
    """An annotation's ``bbox`` as four floats, or an error naming ``source`` and the annotation."""
    bbox = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: annotation {ann.get('id')} has bbox {bbox!r}; expected [x, y, w, h] numbers") from None
    return x, y, w, h


def _file_name(img: dict) -> str:
    """The image's ``file_name``; LVIS v1 images have none: their ``coco_url`` ends in the COCO 2017 folder and file
    (``http://images.cocodataset.org/val2017/000000397133.jpg`` → ``val2017/000000397133.jpg``, under ``coco/``)."""
    if "file_name" in img:
        return img["file_name"]
    return "/".join(img["coco_url"].rsplit("/", 2)[-2:])


def safe_join(root: Path, file_name: str, source: Path) -> Path:
    """``root / file_name``, refusing names that leave ``root`` (absolute paths, ``..``)."""
    p = (root / file_name).resolve()
    if not p.is_relative_to(root.resolve()):
        raise ValueError(f"{source}: image file_name {file_name!r} points outside the image folder {root}")
    return p


def load_image_labels(spec: DatasetSpec, pseudo_boxes: str | Path | None = None) -> DetectionDataset:
    """An image-labelled dataset: COCO-style JSON whose ``images[]`` carry ``pos_category_ids``.

    With ``pseudo_boxes`` (COCO JSON whose annotations are the mined boxes, one per image label), each record's boxes
    are its pseudo boxes and images left without any are dropped (counted in the log): that is the training set of
    pseudo image-level supervision. Unknown label ids and pseudo boxes for images not in the dataset are errors.
    """
    path = spec.json_file
    data = read_json(path, what=f"image-label file of dataset {spec.name}")
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise ValueError(f"{path} is not an image-label file: it needs 'images' (with pos_category_ids) and 'categories'")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    cat_ids = {c["id"] for c in categories}
    root = Path(spec.image_root)
    records = []
    for img in data["images"]:
        if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= img.keys():
            raise ValueError(f"{path}: image entry {img!r:.200} needs id, file_name, height and width")
        if "pos_category_ids" not in img:
            raise ValueError(f"{path}: image {img.get('id')} has no pos_category_ids")
        labels = sorted(set(img["pos_category_ids"]))
        unknown = [c for c in labels if c not in cat_ids]
        if unknown:
            raise ValueError(f"{path}: image {img.get('id')} is labelled with category ids {unknown}, not in categories")
        records.append(ImageRecord(
            image_id=img["id"], file_name=safe_join(root, img["file_name"], path), height=int(img["height"]),
            width=int(img["width"]), boxes=np.zeros((0, 4), np.float32), category_ids=np.zeros(0, np.int64),
            image_labels=np.array(labels, dtype=np.int64),
        ))
    if not records:
        raise ValueError(f"dataset {spec.name}: {path} has no images")
    dataset = DetectionDataset(spec.name, path, records, categories, tuple(spec.novel_category_ids))
    if pseudo_boxes is not None:
        attach_pseudo_boxes(dataset, Path(pseudo_boxes))
    return dataset


def attach_pseudo_boxes(dataset: DetectionDataset, path: Path) -> None:
    """Set each record's boxes to its pseudo boxes from ``path``; drop images that have none."""
    data = read_json(path, what="pseudo-box file")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if anns is None:
        raise ValueError(f"pseudo-box file {path} is not COCO JSON with an 'annotations' list")
    for i, a in enumerate(anns):
        if not (isinstance(a, dict) and isinstance(a.get("image_id"), int) and isinstance(a.get("category_id"), int)
                and isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4):
            raise ValueError(f"pseudo-box file {path}: annotation {i} ({a!r:.200}) is not "
                             "{image_id: int, category_id: int, bbox: [x, y, w, h]}")
    by_id = {r.image_id: r for r in dataset.records}
    unknown = sorted({a["image_id"] for a in anns if a["image_id"] not in by_id})
    if unknown:
        raise ValueError(f"pseudo-box file {path} has boxes for image ids {unknown[:10]} that are not in dataset "
                         f"{dataset.name} ({dataset.json_file})")
    boxes: dict[int, list] = {i: [] for i in by_id}
    not_labelled = 0
    for a in anns:
        rec = by_id[a["image_id"]]
        if a["category_id"] not in rec.image_labels:
            not_labelled += 1
            continue
        x, y, w, h = _xywh(a, f"pseudo-box file {path}")
        box = [max(x, 0.0), max(y, 0.0), min(x + w, rec.width), min(y + h, rec.height)]
        if box[2] > box[0] and box[3] > box[1]:
            boxes[rec.image_id].append((box, a["category_id"]))
    for rec in dataset.records:
        b = boxes[rec.image_id]
        rec.boxes = np.array([x[0] for x in b], dtype=np.float32).reshape(-1, 4)
        rec.category_ids = np.array([x[1] for x in b], dtype=np.int64)
    before = len(dataset.records)
    dataset.records = [r for r in dataset.records if len(r.boxes)]
    if not_labelled or before != len(dataset.records):
        logger.warning("%s: %d pseudo boxes for labels the image does not have were ignored; %d of %d images have no "
                       "pseudo box and are left out", path, not_labelled, before - len(dataset.records), before)
    if not dataset.records:
        raise ValueError(f"pseudo-box file {path} leaves no image of dataset {dataset.name} with a pseudo box")
