"""Tiny made-up files in the exact formats of the official COCO 2017, LVIS v1 and ImageNet-21K releases: the field
names, id conventions and nesting of the real files, a handful of entries each (the real files are not on CI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from PIL import Image

from ovd.data.ov_splits import COCO_CATEGORIES

# COCO's supercategories cover contiguous id ranges: (last id, supercategory)
_SUPERCATEGORIES = [(1, "person"), (9, "vehicle"), (15, "outdoor"), (25, "animal"), (33, "accessory"), (43, "sports"),
                    (51, "kitchen"), (61, "food"), (70, "furniture"), (77, "electronic"), (82, "appliance"),
                    (90, "indoor")]
COCO_ID = {name: cid for cid, name in COCO_CATEGORIES}
_INFO = {"description": "made-up test file", "url": "", "version": "1.0", "year": 2017, "contributor": "ovd tests",
         "date_created": "2017/09/01"}
_LICENSES = [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"}]


def coco_categories() -> list[dict]:
    return [{"supercategory": next(s for last, s in _SUPERCATEGORIES if cid <= last), "id": cid, "name": name}
            for cid, name in COCO_CATEGORIES]


def _coco_image(image_id: int, folder: str, height: int = 48, width: int = 64) -> dict:
    file_name = f"{image_id:012d}.jpg"
    return {"license": 4, "file_name": file_name, "coco_url": f"http://images.cocodataset.org/{folder}/{file_name}",
            "height": height, "width": width, "date_captured": "2013-11-14 11:18:45",
            "flickr_url": f"http://farm1.staticflickr.com/1/{image_id}_x.jpg", "id": image_id}


def _box_annotation(ann_id: int, image_id: int, category_id: int, k: int, **extra) -> dict:
    x, y, w, h = 2.0 + 5 * k, 3.0 + 4 * k, 10.5, 8.25
    return {"segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "area": w * h, "bbox": [x, y, w, h],
            "category_id": category_id, "image_id": image_id, "id": ann_id, **extra}


def coco_instances(objects: dict[int, Sequence[str]], *, folder: str = "train2017", crowd: Sequence[int] = ()) -> dict:
    """An ``instances_<folder>.json``: images ``objects`` keys, one box per listed category name (``iscrowd`` 1 for the
    annotation ids in ``crowd``), and all 80 categories. Annotation ids are ``100 * image_id + k``."""
    annotations = [
        _box_annotation(100 * image_id + k, image_id, COCO_ID[name], k, iscrowd=int(100 * image_id + k in crowd))
        for image_id, names in objects.items() for k, name in enumerate(names)
    ]
    return {"info": _INFO, "licenses": _LICENSES, "images": [_coco_image(i, folder) for i in objects],
            "annotations": annotations, "categories": coco_categories()}


def coco_captions(captions: dict[int, Sequence[str]], *, folder: str = "train2017") -> dict:
    """A ``captions_<folder>.json``: the images, and one annotation ``{image_id, id, caption}`` per caption."""
    annotations = [{"image_id": image_id, "id": 1000 * image_id + k, "caption": text}
                   for image_id, texts in captions.items() for k, text in enumerate(texts)]
    return {"info": _INFO, "licenses": _LICENSES, "images": [_coco_image(i, folder) for i in captions],
            "annotations": annotations}


# A few LVIS v1 categories as the official files write them; ids and counts here are made up.
LVIS_CATEGORIES = [
    {"id": 1, "name": "aerosol_can", "synset": "aerosol.n.02", "synonyms": ["aerosol_can", "spray_can"],
     "def": "a dispenser that holds a substance under pressure", "frequency": "c"},
    {"id": 3, "name": "airplane", "synset": "airplane.n.01", "synonyms": ["airplane", "aeroplane"],
     "def": "an aircraft that has a fixed wing and is powered by propellers or jets", "frequency": "f"},
    {"id": 9, "name": "bow_(weapon)", "synset": "bow.n.04", "synonyms": ["bow_(weapon)"],
     "def": "a weapon for shooting arrows", "frequency": "r"},
    {"id": 12, "name": "dog", "synset": "dog.n.01", "synonyms": ["dog"],
     "def": "a common domesticated canine", "frequency": "f"},
    {"id": 20, "name": "poncho", "synset": "poncho.n.01", "synonyms": ["poncho"],
     "def": "a blanket-like cloak with a hole in the center for the head", "frequency": "r"},
    {"id": 27, "name": "sawhorse", "synset": "sawhorse.n.01", "synonyms": ["sawhorse", "sawbuck"],
     "def": "a framework for holding wood that is being sawed", "frequency": "r"},
]
LVIS_RARE_IDS = [9, 20, 27]
# Made-up WordNet ids of the fixture's synsets (the real ones come from WordNet; see read_synset_map).
LVIS_WNIDS = {"aerosol.n.02": "n02681392", "airplane.n.01": "n02691156", "bow.n.04": "n02879718",
              "dog.n.01": "n02084071", "poncho.n.01": "n03980874", "sawhorse.n.01": "n04140064"}


def lvis_file(objects: dict[int, tuple[str, Sequence[int]]]) -> dict:
    """An ``lvis_v1_{train,val}.json``: ``objects`` maps an image id to its COCO folder and the LVIS category ids of
    its boxes (one each). Images have ``coco_url`` and no ``file_name``, plus ``neg_category_ids`` and
    ``not_exhaustive_category_ids``; categories carry ``image_count`` / ``instance_count`` as LVIS publishes them."""
    images, annotations = [], []
    for image_id, (folder, category_ids) in objects.items():
        image = _coco_image(image_id, folder)
        del image["file_name"]
        images.append({**image, "neg_category_ids": [27], "not_exhaustive_category_ids": [3]})
        annotations += [_box_annotation(100 * image_id + k, image_id, c, k) for k, c in enumerate(category_ids)]
    categories = []
    for c in LVIS_CATEGORIES:
        with_c = {a["image_id"] for a in annotations if a["category_id"] == c["id"]}
        n = sum(a["category_id"] == c["id"] for a in annotations)
        categories.append({**c, "image_count": len(with_c), "instance_count": n})
    return {"info": _INFO, "licenses": _LICENSES, "images": images, "annotations": annotations,
            "categories": categories}


def imagenet_tree(root: Path, folders: dict[str, Sequence[tuple[int, int]]]) -> Path:
    """``<root>/<wnid>/<wnid>_<k>.JPEG`` tiny JPEGs of the given ``(height, width)`` sizes."""
    for wnid, sizes in folders.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for k, (h, w) in enumerate(sizes):
            Image.new("RGB", (w, h), (40 * k % 255, 90, 160)).save(root / wnid / f"{wnid}_{k + 1}.JPEG", "JPEG")
    return root


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
