"""Named vocabularies: the class names (and category ids) a preset name stands for, in one registry.

    coco    the 80 COCO classes with COCO's ids
    lvis    the 1203 LVIS v1 categories, read from the official annotation file ($OVD_DATASETS/lvis/lvis_v1_val.json;
            ``_`` read as a space, so prompts say "a photo of a bat (animal)" as Detic's embeddings do)
    shapes  the 16 shapes-world categories with their ids
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ovd.data.ov_splits import COCO_CATEGORIES
from ovd.data.shapes import SHAPES_CATEGORIES
from ovd.utils.io import read_json
from ovd.utils.paths import datasets_root

__all__ = ["VOCABULARY_NAMES", "lvis_annotation_file", "named_vocabulary"]


def lvis_annotation_file() -> Path:
    """Where the ``lvis`` vocabulary is read: ``$OVD_DATASETS/lvis/lvis_v1_val.json``."""
    return datasets_root() / "lvis" / "lvis_v1_val.json"


def _coco() -> tuple[list[str], list[int]]:
    return [n for _, n in COCO_CATEGORIES], [i for i, _ in COCO_CATEGORIES]


def _lvis() -> tuple[list[str], list[int]]:
    path = lvis_annotation_file()
    if not path.is_file():
        raise FileNotFoundError(f"the lvis vocabulary is read from the LVIS v1 annotation file, not found: {path} "
                                "(see datasets/README.md; or pass the names yourself)")
    categories = sorted(read_json(path, what="LVIS annotation file")["categories"], key=lambda c: c["id"])
    return [c["name"].replace("_", " ") for c in categories], [c["id"] for c in categories]


def _shapes() -> tuple[list[str], list[int]]:
    return [c["name"] for c in SHAPES_CATEGORIES], [c["id"] for c in SHAPES_CATEGORIES]


_REGISTRY: dict[str, Callable[[], tuple[list[str], list[int]]]] = {"coco": _coco, "lvis": _lvis, "shapes": _shapes}
VOCABULARY_NAMES = tuple(_REGISTRY)


def named_vocabulary(name: str) -> tuple[list[str], list[int]]:
    """(class names, category ids) of the vocabulary called ``name`` (one of `VOCABULARY_NAMES`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown vocabulary preset {name!r}; presets: {', '.join(VOCABULARY_NAMES)}")
    return _REGISTRY[name]()
