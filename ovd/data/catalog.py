"""Dataset names (as in `DATASETS.TRAIN` / `DATASETS.TEST`) → annotation file, image folder, novel classes.

Files are found under ``$OVD_DATASETS`` (default ``./datasets``), read when the name is looked up, so setting the
variable after import works. `register_dataset` adds a name for data kept elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

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


def builtin_names() -> list[str]:
    return sorted([f"shapes_{s}" for s in SHAPES_SPLITS] + list(_REGISTERED))


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
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(builtin_names())}")
