"""The open-vocabulary splits as data (DESIGN §2 "Splits"), and pure functions that cut them from the official files.

COCO 2017: of the 80 categories, 48 are *base* (their boxes train the detector), 17 *novel* (no boxes in training,
evaluated), and 15 are *ignored* (in neither split: their boxes are dropped everywhere). The split files follow
OVR-CNN's, which the original code used (``instances_{train,val}2017_*_2.json`` + ``_oriorder``):

* train (``instances_train2017_seen_2_oriorder.json``): the base classes' annotations, the images that have one;
* val (``instances_val2017_all_2_oriorder.json``, "generalized"): the annotations of all 65 classes, the images that
  have one (4836 of the 5000 val2017 images).

Both list the 65 categories in COCO id order ("oriorder"), each with ``split`` ``"base"`` or ``"novel"``: the file's
categories are the detector's vocabulary, so novel classes are in the classifier (generalized zero-shot). The
original's ``_oriorder`` files listed all 80 categories and took the 65 from dataset metadata in code; here the file
alone says it.

LVIS v1: the ``frequency`` of each category (``r`` rare, ``c`` common, ``f`` frequent, from the train image counts)
is the split: the 337 rare classes are novel. The train file without rare annotations keeps every image and all 1203
categories; evaluation is on the full ``lvis_v1_val.json``.

ImageNet-21K ∩ LVIS (the image-level data of the LVIS runs): an ImageNet folder ``<wnid>/`` (``n02084071``, a WordNet
noun offset) holds images of one synset; LVIS categories name their WordNet synset (``"dog.n.01"``). Turning offsets
into synset names needs WordNet (nltk's corpus), which ovd does not depend on: :func:`read_synset_map` reads the
mapping from a file the user makes once (see datasets/README.md).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image, UnidentifiedImageError

__all__ = [
    "COCO_BASE_NAMES",
    "COCO_CATEGORIES",
    "COCO_IGNORED_NAMES",
    "COCO_NOVEL_NAMES",
    "IMAGE_SUFFIXES",
    "coco_split_ids",
    "imagenet_lvis_image_labels",
    "lvis_category_image_counts",
    "lvis_ov_split_meta",
    "lvis_rare_category_ids",
    "make_coco_ov_splits",
    "make_lvis_norare",
    "match_imagenet_folders",
    "read_synset_map",
    "split_counts",
]

# (id, name) of the 80 COCO 2017 detection categories, as in instances_{train,val}2017.json.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)

COCO_NOVEL_NAMES: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup", "knife",
    "cake", "couch", "keyboard", "sink", "scissors",
)
COCO_BASE_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep", "bear",
    "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard", "bottle", "fork",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock",
    "vase", "toothbrush",
)
COCO_IGNORED_NAMES: tuple[str, ...] = (
    "traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "potted plant", "dining table", "cell phone", "teddy bear", "hair drier",
)

LVIS_FREQUENCIES = ("r", "c", "f")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_WNID = re.compile(r"n\d{8}")
_SYNSET = re.compile(r"[^\s]+\.[nvasr]\.\d+")
_SHOWN = 5  # problems listed in one error message


def coco_split_ids() -> dict[str, list[int]]:
    """``{"base": [...], "novel": [...], "ignored": [...]}``: the COCO category ids of each split, sorted."""
    by_name = {name: cid for cid, name in COCO_CATEGORIES}
    return {
        split: sorted(by_name[n] for n in names)
        for split, names in (("base", COCO_BASE_NAMES), ("novel", COCO_NOVEL_NAMES), ("ignored", COCO_IGNORED_NAMES))
    }


def split_counts(data: Mapping[str, Any]) -> dict[str, int]:
    """``{"images", "annotations", "categories"}``: the lengths of those lists of a COCO-style dict."""
    return {key: len(data.get(key, ())) for key in ("images", "annotations", "categories")}


def _check_instances(data: Any, source: str, kind: str) -> None:
    """``data`` has ``images``, ``annotations`` and ``categories`` lists, and annotations refer to known ids; ``kind``
    names the expected format with its article ("a COCO instances")."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} is not {kind} file: expected a JSON object with 'images', 'annotations' and "
                         f"'categories' lists, found a JSON {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{source} is not {kind} file: it has no {key!r} list (expected 'images', "
                             "'annotations' and 'categories')")
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"{source}: category {c!r:.200} needs an 'id' and a 'name' ({kind} file expected)")
    category_ids = {c["id"] for c in data["categories"]}
    image_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or ann.get("category_id") not in category_ids:
            cat = ann.get("category_id") if isinstance(ann, dict) else None
            raise ValueError(f"{source}: annotation {ann!r:.200} has category_id {cat!r}, which is not in its "
                             "'categories'")
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"{source}: annotation {ann.get('id')} refers to image_id {ann.get('image_id')!r}, "
                             "which is not in its 'images'")


def _check_coco_categories(categories: Sequence[Mapping[str, Any]], source: str) -> None:
    found = {c["id"]: c["name"] for c in categories}
    problems = []
    for cid, name in COCO_CATEGORIES:
        if cid not in found:
            problems.append(f"id {cid} ({name!r}) is missing")
        elif found[cid] != name:
            problems.append(f"id {cid} is named {found[cid]!r}, expected {name!r}")
    extra = sorted(set(found) - {cid for cid, _ in COCO_CATEGORIES})
    if extra:
        problems.append(f"ids {extra[:10]} are not COCO 2017 category ids")
    if problems:
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise ValueError(f"{source}: its categories are not the 80 COCO 2017 categories that the open-vocabulary "
                         f"split names (ovd/data/ov_splits.py): {'; '.join(problems[:_SHOWN])}{more}")


def _keep(data: Mapping[str, Any], category_ids: set[int], categories: list[dict]) -> dict[str, Any]:
    """``data`` with only the annotations of ``category_ids``, the images that have one, and ``categories``."""
    annotations = [a for a in data["annotations"] if a["category_id"] in category_ids]
    image_ids = {a["image_id"] for a in annotations}
    out = dict(data)
    out["images"] = [img for img in data["images"] if img["id"] in image_ids]
    out["annotations"] = annotations
    out["categories"] = [dict(c) for c in categories]
    return out


def make_coco_ov_splits(
    train: Mapping[str, Any],
    val: Mapping[str, Any],
    *,
    train_source: str = "instances_train2017.json",
    val_source: str = "instances_val2017.json",
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The COCO open-vocabulary split of the official instance files (see the module docstring).

    Args:
        train, val: the parsed ``instances_train2017.json`` / ``instances_val2017.json``.
        train_source, val_source: how errors name them (the tool passes the paths).

    Returns:
        ``(train_base, val_generalized, meta)``. The two split files keep every other top-level key (``info``,
        ``licenses``) and the entries' own fields, in file order; their ``categories`` are the 65 of the split sorted
        by id, each with ``split``. ``meta``: ``categories`` (the same 65), ``base/novel/ignored_category_ids`` and
        ``base/novel/ignored_names`` (in id order).

    Raises:
        ValueError naming the file: not a COCO instances file, categories other than the 80 COCO ones (a wrong
        name, a missing or extra id), annotations of unknown categories or images.
    """
    ids = coco_split_ids()
    for data, source in ((train, train_source), (val, val_source)):
        _check_instances(data, source, "a COCO instances")
        _check_coco_categories(data["categories"], source)
    split_of = {**{i: "base" for i in ids["base"]}, **{i: "novel" for i in ids["novel"]}}
    categories = [{**c, "split": split_of[c["id"]]} for c in sorted(train["categories"], key=lambda c: c["id"])
                  if c["id"] in split_of]
    name = dict(COCO_CATEGORIES)
    meta = {
        "categories": categories,
        **{f"{split}_category_ids": ids[split] for split in ("base", "novel", "ignored")},
        **{f"{split}_names": [name[i] for i in ids[split]] for split in ("base", "novel", "ignored")},
    }
    train_base = _keep(train, set(ids["base"]), categories)
    val_generalized = _keep(val, set(split_of), categories)
    return train_base, val_generalized, meta


def lvis_rare_category_ids(data: Mapping[str, Any], *, source: str = "LVIS file") -> list[int]:
    """Sorted ids of the categories whose ``frequency`` is ``"r"``: LVIS's novel classes.

    Raises:
        ValueError naming ``source``: no ``categories`` list, or a category without an ``r``/``c``/``f`` frequency
        (not an LVIS v1 file).
    """
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list):
        raise ValueError(f"{source} is not an LVIS v1 file: it has no 'categories' list")
    for c in categories:
        frequency = c.get("frequency") if isinstance(c, dict) else None
        if frequency not in LVIS_FREQUENCIES:
            what = f"category {c.get('id')} ({c.get('name')!r})" if isinstance(c, dict) else f"category {c!r:.100}"
            has = "no 'frequency'" if frequency is None else f"frequency {frequency!r}"
            raise ValueError(f"{source} is not an LVIS v1 file: {what} has {has}, expected 'r', 'c' or 'f'")
    return sorted(c["id"] for c in categories if c["frequency"] == "r")


def make_lvis_norare(train: Mapping[str, Any], *, source: str = "lvis_v1_train.json") -> dict[str, Any]:
    """``lvis_v1_train.json`` without the annotations of the rare classes: every image and all categories are kept,
    every other field as in the file.

    Raises:
        ValueError naming ``source``: not an LVIS v1 file (see :func:`lvis_rare_category_ids`), annotations of unknown
        categories or images.
    """
    _check_instances(train, source, "an LVIS v1")
    rare = set(lvis_rare_category_ids(train, source=source))
    out = dict(train)
    out["annotations"] = [a for a in train["annotations"] if a["category_id"] not in rare]
    return out


def lvis_category_image_counts(train: Mapping[str, Any], *, source: str = "LVIS file") -> list[dict[str, Any]]:
    """Per category, sorted by id: ``id``, ``name``, ``frequency``, ``image_count`` (images with at least one
    annotation of it) and ``instance_count``, counted from the annotations in ``train``; the format of
    ``MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH`` (:func:`ovd.modeling.build.read_class_frequencies`).

    The original code's file (``lvis_v1_train_norare_cat_info.json``, read with ``IGNORE_ZERO_CATS``) counted
    ``lvis_v1_train_norare.json``, so rare classes count 0 images; counting the full ``lvis_v1_train.json`` gives
    Detic's ``lvis_v1_train_cat_info.json`` instead.
    """
    _check_instances(train, source, "an LVIS v1")
    lvis_rare_category_ids(train, source=source)
    images: dict[int, set[int]] = {c["id"]: set() for c in train["categories"]}
    instances: Counter[int] = Counter()
    for a in train["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    return [
        {"id": c["id"], "name": c["name"], "frequency": c["frequency"], "image_count": len(images[c["id"]]),
         "instance_count": instances[c["id"]]}
        for c in sorted(train["categories"], key=lambda c: c["id"])
    ]


def lvis_ov_split_meta(data: Mapping[str, Any], *, source: str = "LVIS file") -> dict[str, Any]:
    """The LVIS split of a file's categories: ``novel_category_ids`` (rare), ``base_category_ids`` (common and
    frequent), and ``num_categories`` per frequency."""
    rare = lvis_rare_category_ids(data, source=source)
    frequency = Counter(c["frequency"] for c in data["categories"])
    return {
        "base_category_ids": sorted(c["id"] for c in data["categories"] if c["frequency"] != "r"),
        "novel_category_ids": rare,
        "num_categories": {f: frequency[f] for f in LVIS_FREQUENCIES},
    }


def read_synset_map(path: str | os.PathLike) -> dict[str, str]:
    """``{wnid: synset name}`` (``{"n02084071": "dog.n.01"}``) from a file the user supplies.

    Accepted: a JSON object ``{wnid: synset}`` (or ``{synset: wnid}``), or text with one ``wnid synset`` pair per line
    (either order, whitespace-separated, anything after them ignored; blank lines and ``#`` comments skipped).

    Raises:
        FileNotFoundError; ValueError naming the file (and line) for an entry that is not a wnid (``n`` + 8 digits)
        and a synset name (``name.n.01``), or a wnid given two different synsets.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synset map not found: {path} (expected 'wnid synset' lines or a JSON object "
                                "{wnid: synset}, e.g. 'n02084071 dog.n.01')")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        pairs = [(f"entry {k!r}", k, v) for k, v in data.items()]
    elif data is not None:
        raise ValueError(f"synset map {path}: a JSON synset map must be an object {{wnid: synset}}, found a JSON "
                         f"{type(data).__name__}")
    else:
        pairs = []
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if fields:
                pairs.append((f"line {number}", fields[0], fields[1] if len(fields) > 1 else ""))
    out: dict[str, str] = {}
    for where, a, b in pairs:
        a, b = (b, a) if isinstance(b, str) and _WNID.fullmatch(b) else (a, b)
        if not (isinstance(a, str) and _WNID.fullmatch(a) and isinstance(b, str) and _SYNSET.fullmatch(b)):
            raise ValueError(f"synset map {path}, {where}: expected a WordNet id and a synset name such as "
                             f"'n02084071 dog.n.01', got {a!r} {b!r}")
        if out.setdefault(a, b) != b:
            raise ValueError(f"synset map {path}, {where}: {a} is mapped to both {out[a]!r} and {b!r}")
    if not out:
        raise ValueError(f"synset map {path} is empty (expected 'wnid synset' lines such as 'n02084071 dog.n.01')")
    return out


def match_imagenet_folders(
    wnids: Iterable[str], categories: Sequence[Mapping[str, Any]], synset_map: Mapping[str, str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The LVIS category of each ImageNet folder: ``(matched {wnid: category}, unmatched {wnid: why})``.

    A folder matches the category whose ``synset`` is the folder's synset in ``synset_map``. Raises ValueError when
    two LVIS categories name the same synset (the image label would be ambiguous).
    """
    by_synset: dict[str, Mapping[str, Any]] = {}
    for c in categories:
        if "synset" not in c:
            raise ValueError(f"LVIS category {c.get('id')} ({c.get('name')!r}) has no 'synset' (an LVIS v1 category "
                             "file is expected)")
        if c["synset"] in by_synset:
            raise ValueError(f"LVIS categories {by_synset[c['synset']]['id']} and {c['id']} both name synset "
                             f"{c['synset']!r}")
        by_synset[c["synset"]] = c
    matched, unmatched = {}, {}
    for wnid in wnids:
        synset = synset_map.get(wnid)
        if synset is None:
            unmatched[wnid] = "not in the synset map"
        elif synset not in by_synset:
            unmatched[wnid] = f"synset {synset!r} is no LVIS category's synset"
        else:
            matched[wnid] = dict(by_synset[synset])
    return matched, unmatched


def _image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the file's header (PIL opens lazily: the pixels are not decoded). No EXIF rotation
    is applied, as ovd's image reader applies none."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise OSError(f"cannot read the size of image {path}: {e}") from None
    return height, width


def imagenet_lvis_image_labels(
    image_root: str | os.PathLike,
    categories: Sequence[Mapping[str, Any]],
    synset_map: Mapping[str, str],
    *,
    skip_unmatched: bool = False,
    num_workers: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An image-label dataset (DESIGN §4) of ImageNet-21K folders ``<image_root>/<wnid>/*.JPEG`` whose synsets are
    LVIS categories.

    Args:
        image_root: the folder of wnid folders (images directly inside; other files and folders are errors).
        categories: the LVIS categories (with ``synset`` and ``frequency``).
        synset_map: ``{wnid: synset}`` (:func:`read_synset_map`).
        skip_unmatched: leave out folders with no LVIS category (counted in the report) instead of raising.
        num_workers: processes reading image headers (0: this one).

    Returns:
        ``(dataset, report)``. ``dataset``: ``images`` (folders then files in sorted order, ids from 1, ``file_name``
        ``<wnid>/<file>`` relative to ``image_root``, ``height``, ``width``, ``pos_category_ids`` ``[the folder's
        category]``), ``annotations: []``, ``categories``: all LVIS categories sorted by id, each with ``split``
        (``novel`` for rare) and ``image_count`` the number of ImageNet images labelled with it (no
        ``instance_count``). ``report``: ``folders``, ``matched_folders``, ``unmatched`` ``{wnid: why}``, ``images``,
        ``categories_with_images``.

    Raises:
        FileNotFoundError: no ``image_root``. ValueError naming the folder: a folder whose name is not a wnid, one
        that maps to no LVIS category (without ``skip_unmatched``), or no image at all. OSError naming an unreadable
        image.
    """
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet image folder not found: {root} (expected <wnid>/*.JPEG folders)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    bad = [f for f in folders if not _WNID.fullmatch(f)]
    if bad:
        raise ValueError(f"{root}: folders {bad[:_SHOWN]} are not ImageNet WordNet ids (expected names such as "
                         "n02084071)")
    matched, unmatched = match_imagenet_folders(folders, categories, synset_map)
    if unmatched and not skip_unmatched:
        shown = "; ".join(f"{root / w}: {why}" for w, why in list(unmatched.items())[:_SHOWN])
        raise ValueError(f"{len(unmatched)} of {len(folders)} ImageNet folders map to no LVIS category ({shown}); "
                         "each folder's wnid must map (in the synset map) to the synset of an LVIS category, or "
                         "leave such folders out (--skip-unmatched)")
    files = []
    for wnid in matched:
        names = sorted(p.name for p in (root / wnid).iterdir() if not p.name.startswith("."))
        others = [n for n in names if not n.lower().endswith(IMAGE_SUFFIXES)]
        if others:
            raise ValueError(f"{root / wnid}: {others[:_SHOWN]} are not images (expected {', '.join(IMAGE_SUFFIXES)})")
        files += [f"{wnid}/{n}" for n in names]
    if not files:
        raise ValueError(f"{root}: no image in the {len(matched)} folders that map to LVIS categories")
    paths = [root / f for f in files]
    if num_workers > 0:
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            sizes = pool.map(_image_size, paths, chunksize=max(1, len(paths) // (num_workers * 16)))
    else:
        sizes = [_image_size(p) for p in paths]
    images, per_category = [], Counter()
    for image_id, (file_name, (height, width)) in enumerate(zip(files, sizes), start=1):
        category_id = matched[file_name.split("/", 1)[0]]["id"]
        per_category[category_id] += 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width,
                       "pos_category_ids": [category_id]})
    out_categories = []
    for c in sorted(categories, key=lambda c: c["id"]):
        c = {k: v for k, v in c.items() if k != "instance_count"}
        out_categories.append({**c, "image_count": per_category[c["id"]],
                               "split": "novel" if c.get("frequency") == "r" else "base"})
    dataset = {"images": images, "annotations": [], "categories": out_categories}
    report = {"folders": len(folders), "matched_folders": len(matched), "unmatched": unmatched, "images": len(images),
              "categories_with_images": len(per_category)}
    return dataset, report
