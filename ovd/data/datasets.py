"""Reading COCO-format box annotations into per-image records, with the checks a bad file needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovd.data.catalog import DatasetSpec
from ovd.utils.io import read_json

logger = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One image: boxes (float32 [N, 4] xyxy, original pixels) and their dataset category ids (int64 [N])."""

    image_id: int
    file_name: Path
    height: int
    width: int
    boxes: np.ndarray
    category_ids: np.ndarray


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


def load_coco_json(spec: DatasetSpec) -> DetectionDataset:
    """Records of a COCO detection JSON. Boxes are clipped to the image; zero-area boxes and crowd
    annotations are dropped and counted in the log; unknown ids and a file with no images are errors."""
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
            images[img["id"]] = (img["file_name"], int(img["height"]), int(img["width"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: image entry {img!r} needs id, file_name, height and width") from None
    if not images:
        raise ValueError(f"dataset {spec.name}: {path} has no images")
    per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images}
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
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        box = [max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)]
        if box != [x, y, x + bw, y + bh]:
            clipped += 1
        if box[2] <= box[0] or box[3] <= box[1]:
            dropped += 1
            continue
        per_image[img_id].append((box, cat))
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
            )
        )
    return DetectionDataset(spec.name, path, records, categories, tuple(spec.novel_category_ids))


def safe_join(root: Path, file_name: str, source: Path) -> Path:
    """``root / file_name``, refusing names that leave ``root`` (absolute paths, ``..``)."""
    p = (root / file_name).resolve()
    if not p.is_relative_to(root.resolve()):
        raise ValueError(f"{source}: image file_name {file_name!r} points outside the image folder {root}")
    return p
