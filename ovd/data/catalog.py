"""Dataset names (as in `DATASETS.TRAIN` / `DATASETS.TEST`) → annotation file, image folder, novel classes.

Files are found under ``$OVD_DATASETS`` (default ``./datasets``), read when the name is looked up, so setting the
variable after import works. `register_dataset` adds a name for data kept elsewhere. The COCO and LVIS names and
the layout they expect are described in datasets/README.md.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from ovd.data.ov_splits import coco_split_ids, lvis_rare_category_ids
from ovd.data.shapes import SHAPES_SPLITS
from ovd.utils.io import read_json
from ovd.utils.paths import datasets_root


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives. ``novel_category_ids``: classes evaluated as novel (no training boxes)."""

    name: str
    json_file: Path
    image_root: Path
    novel_category_ids: tuple[int, ...] = ()
    meta_file: Path | None = field(default=None, compare=False)


_REGISTERED: dict[str, DatasetSpec] = {}


def register_dataset(name: str, json_file: str | os.PathLike, image_root: str | os.PathLike,
                     novel_category_ids: tuple[int, ...] = ()) -> None:
    """Make ``name`` usable in DATASETS.TRAIN / DATASETS.TEST."""
    _REGISTERED[name] = DatasetSpec(name, Path(json_file), Path(image_root), tuple(novel_category_ids))


def _shapes(split: str) -> DatasetSpec:
    root = datasets_root() / "shapes"
    image_split, file_name = SHAPES_SPLITS[split]
    meta_file = root / "meta.json"
    novel: tuple[int, ...] = ()
    if meta_file.is_file():
        novel = tuple(read_json(meta_file, what="shapes world metadata")["novel_category_ids"])
    return DatasetSpec(f"shapes_{split}", root / "annotations" / file_name, root / "images" / image_split, novel, meta_file)


# name -> (annotation file, image folder, novel classes, how to make the file), paths under $OVD_DATASETS ("{root}").
# Novel classes: "coco" the split's 17; "lvis_rare" the rare categories of the file itself; "lvis_meta" those of
# prepare_ovd_splits.py's split metadata, where present (the 1 GB train file is not read for them); None: none.
_COCO_PREPARE = "`python tools/prepare_ovd_splits.py coco --annotations {root}/coco/annotations --out {root}`"
_LVIS_PREPARE = "`python tools/prepare_ovd_splits.py lvis --train {root}/lvis/lvis_v1_train.json --out {root}`"
_BUILTIN: dict[str, tuple[str, str, str | None, str]] = {
    "coco_zeroshot_train_oriorder": (
        "coco/zero-shot/instances_train2017_seen_2_oriorder.json", "coco/train2017", "coco",
        "make it with " + _COCO_PREPARE),
    "coco_generalized_zeroshot_val": (
        "coco/zero-shot/instances_val2017_all_2_oriorder.json", "coco/val2017", "coco",
        "make it with " + _COCO_PREPARE),
    "coco_caption_train_tags": (
        "coco/zero-shot/captions_train2017_tags.json", "coco/train2017", "coco",
        "make it with `python tools/captions_to_image_labels.py "
        "--captions {root}/coco/annotations/captions_train2017.json --categories {root}/coco/zero-shot/ovd_split.json "
        "--unlabelled-categories {root}/coco/annotations/instances_val2017.json "
        "--out {root}/coco/zero-shot/captions_train2017_tags.json` (after " + _COCO_PREPARE + ")"),
    # LVIS v1 images are COCO 2017 images; each one's coco_url names its folder, train2017/ or val2017/
    "lvis_v1_train_norare": ("lvis/lvis_v1_train_norare.json", "coco", "lvis_meta", "make it with " + _LVIS_PREPARE),
    "lvis_v1_val": (
        "lvis/lvis_v1_val.json", "coco", "lvis_rare",
        "it is the official LVIS v1 val file: unzip lvis_v1_val.json.zip (https://www.lvisdataset.org/dataset) into "
        "{root}/lvis/"),
    "imagenet_lvis_v1": (
        "imagenet/annotations/imagenet_lvis_image_info.json", "imagenet/ImageNet-LVIS", None,
        "make it with `python tools/imagenet_lvis_image_labels.py --lvis {root}/lvis/lvis_v1_val.json "
        "--image-root {root}/imagenet/ImageNet-LVIS --synset-map {root}/imagenet/lvis_synsets.txt "
        "--out {root}/imagenet/annotations/imagenet_lvis_image_info.json` (datasets/README.md: the synset map)"),
}
COCO_SPLIT_META = "coco/zero-shot/ovd_split.json"
LVIS_SPLIT_META = "lvis/lvis_v1_ovd_split.json"


@functools.lru_cache(maxsize=4)
def _rare_ids(path: str, mtime_ns: int, size: int) -> tuple[int, ...]:
    # keyed by the file's version: lookups of an unchanged file do not parse it again
    return tuple(lvis_rare_category_ids(read_json(path, what="LVIS annotation file"), source=path))


def _builtin(name: str) -> DatasetSpec:
    root = datasets_root()
    json_rel, images_rel, novel_rule, how = _BUILTIN[name]
    json_file = root / json_rel
    if not json_file.is_file():
        raise FileNotFoundError(f"dataset {name}: {json_file} not found; {how.format(root=root)}; or set OVD_DATASETS")
    novel: tuple[int, ...] = ()
    meta_file = None
    if novel_rule == "coco":
        novel, meta_file = tuple(coco_split_ids()["novel"]), root / COCO_SPLIT_META
    elif novel_rule == "lvis_rare":
        stat = json_file.stat()
        novel = _rare_ids(str(json_file), stat.st_mtime_ns, stat.st_size)
    elif novel_rule == "lvis_meta":
        meta_file = root / LVIS_SPLIT_META
        if meta_file.is_file():
            novel = tuple(read_json(meta_file, what="LVIS split metadata")["novel_category_ids"])
    return DatasetSpec(name, json_file, root / images_rel, novel, meta_file)


def builtin_names() -> list[str]:
    return sorted([f"shapes_{s}" for s in SHAPES_SPLITS] + list(_BUILTIN) + list(_REGISTERED))


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a registered or built-in dataset; an unknown name lists the known ones."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name.startswith("shapes_") and name[len("shapes_"):] in SHAPES_SPLITS:
        spec = _shapes(name[len("shapes_"):])
        if not spec.json_file.is_file():
            raise FileNotFoundError(
                f"dataset {name}: {spec.json_file} not found; generate the shapes world with "
                f"`python tools/make_shapes_world.py --out {spec.json_file.parent.parent}` or set OVD_DATASETS"
            )
        return spec
    if name in _BUILTIN:
        return _builtin(name)
    close = difflib.get_close_matches(name, builtin_names(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise KeyError(f"unknown dataset {name!r}{hint}; known: {', '.join(builtin_names())}")
