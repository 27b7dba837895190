"""Dataset names (as in `DATASETS.TRAIN` / `DATASETS.TEST`) → annotation file, image folder, novel classes.

Files are found under ``$OVD_DATASETS`` (default ``./datasets``), read when the name is looked up, so setting the
variable after import works. A config declares its own datasets in DATASETS.CUSTOM (`register_config_datasets`, called
by the trainer and the tools that read a config); `register_dataset` does the same from Python. The COCO and LVIS
names and the layout they expect are described in datasets/README.md.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from ovd.config.schema import CustomDatasetConfig
from ovd.data.ov_splits import coco_split_ids, lvis_rare_category_ids
from ovd.data.shapes import SHAPES_SPLITS
from ovd.utils.io import read_json
from ovd.utils.paths import datasets_root


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives. ``novel_category_ids``: classes evaluated as novel (no training boxes).
    ``ann_type``: "box" (COCO annotations) or "image" (image-level labels, ``images[].pos_category_ids``)."""

    name: str
    json_file: Path
    image_root: Path
    novel_category_ids: tuple[int, ...] = ()
    meta_file: Path | None = field(default=None, compare=False)
    ann_type: str = "box"


_REGISTERED: dict[str, DatasetSpec] = {}
_CUSTOM: dict[str, CustomDatasetConfig] = {}
ANN_TYPES = ("box", "image")
# built-in datasets of image-level labels (the others are box-labelled)
_IMAGE_LABELLED = ("shapes_train_image_labels", "coco_caption_train_tags", "imagenet_lvis_v1")


def register_dataset(name: str, json_file: str | os.PathLike, image_root: str | os.PathLike,
                     novel_category_ids: tuple[int, ...] = (), *, ann_type: str = "box") -> None:
    """Make ``name`` usable in DATASETS.TRAIN / DATASETS.TEST."""
    _REGISTERED[name] = DatasetSpec(name, Path(json_file), Path(image_root), tuple(novel_category_ids),
                                    ann_type=ann_type)


def register_config_datasets(entries: list[CustomDatasetConfig]) -> None:
    """Make the names of DATASETS.CUSTOM usable; their files are checked when a name is first looked up."""
    for i, entry in enumerate(entries):
        where = f"DATASETS.CUSTOM[{i}]"
        if not entry.NAME:
            raise ValueError(f"{where}: NAME is empty; every custom dataset needs a name")
        if not entry.JSON or not entry.IMAGES:
            raise ValueError(f"{where} ({entry.NAME}): JSON and IMAGES are both needed, got JSON={entry.JSON!r}, "
                             f"IMAGES={entry.IMAGES!r}")
        if entry.ANN_TYPE not in ANN_TYPES:
            raise ValueError(f"{where} ({entry.NAME}): ANN_TYPE {entry.ANN_TYPE!r}; expected one of {ANN_TYPES}")
        if entry.CAPTIONS and entry.ANN_TYPE != "image":
            raise ValueError(f"{where} ({entry.NAME}): CAPTIONS make image-level labels; set ANN_TYPE: image")
        split = entry.NAME[len("shapes_"):] if entry.NAME.startswith("shapes_") else None
        if entry.NAME in _BUILTIN or split in SHAPES_SPLITS:
            raise ValueError(f"{where}: {entry.NAME!r} is the name of a built-in dataset; choose another name")
        _CUSTOM[entry.NAME] = entry


def dataset_ann_type(name: str) -> str:
    """"box" or "image", without reading any file (DATALOADER.DATASET_ANN's default for ``name``)."""
    if name in _CUSTOM:
        return _CUSTOM[name].ANN_TYPE
    if name in _REGISTERED:
        return _REGISTERED[name].ann_type
    return "image" if name in _IMAGE_LABELLED else "box"


@functools.lru_cache(maxsize=16)
def _custom_spec(name: str, json_file: str, image_root: str, novel: tuple[str, ...], ann_type: str,
                 mtime_ns: int, size: int) -> DatasetSpec:
    # keyed by the file's version: a changed file is checked again
    path, root = Path(json_file), Path(image_root)
    data = read_json(path, what=f"annotation file of dataset {name}")
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list) or not isinstance(
            data.get("images"), list):
        raise ValueError(f"dataset {name}: {path} is not COCO JSON (it needs 'images' and 'categories' lists)")
    by_name = {c.get("name"): c.get("id") for c in data["categories"] if isinstance(c, dict)}
    ids = set(by_name.values())
    novel_ids = []
    for item in novel:
        if item in by_name:
            novel_ids.append(by_name[item])
        elif item.lstrip("-").isdigit() and int(item) in ids:
            novel_ids.append(int(item))
        else:
            close = difflib.get_close_matches(item, [str(n) for n in by_name], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"dataset {name}: NOVEL class {item!r} is not a category name or id of {path}{hint}; "
                             f"its categories: {', '.join(map(str, list(by_name)[:30]))}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {name}: image folder {root} not found (IMAGES of {path})")
    names = [img.get("file_name") for img in data["images"] if isinstance(img, dict)]
    missing = [n for n in names if not isinstance(n, str) or not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"dataset {name}: {len(missing)} of the {len(names)} images listed in {path} are not "
                                f"in {root}, e.g. {', '.join(map(str, missing[:3]))}")
    return DatasetSpec(name, path, root, tuple(sorted(set(novel_ids))), ann_type=ann_type)


def _custom(entry: CustomDatasetConfig) -> DatasetSpec:
    path = Path(entry.JSON)
    if not path.is_file():
        how = f"; make it from the captions with `python tools/run_chain.py` (CAPTIONS: {entry.CAPTIONS})" \
            if entry.CAPTIONS else ""
        raise FileNotFoundError(f"dataset {entry.NAME}: annotation file {path} not found (JSON of DATASETS.CUSTOM){how}")
    stat = path.stat()
    return _custom_spec(entry.NAME, str(path), entry.IMAGES, tuple(str(n) for n in entry.NOVEL), entry.ANN_TYPE,
                        stat.st_mtime_ns, stat.st_size)


def _shapes(split: str) -> DatasetSpec:
    root = datasets_root() / "shapes"
    image_split, file_name = SHAPES_SPLITS[split]
    meta_file = root / "meta.json"
    novel: tuple[int, ...] = ()
    if meta_file.is_file():
        novel = tuple(read_json(meta_file, what="shapes world metadata")["novel_category_ids"])
    return DatasetSpec(f"shapes_{split}", root / "annotations" / file_name, root / "images" / image_split, novel, meta_file,
                       dataset_ann_type(f"shapes_{split}"))


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
    return DatasetSpec(name, json_file, root / images_rel, novel, meta_file, dataset_ann_type(name))


def builtin_names() -> list[str]:
    return sorted([f"shapes_{s}" for s in SHAPES_SPLITS] + list(_BUILTIN) + list(_REGISTERED) + list(_CUSTOM))


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a registered or built-in dataset; an unknown name lists the known ones."""
    if name in _CUSTOM:
        return _custom(_CUSTOM[name])
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
