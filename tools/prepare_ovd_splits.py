"""The COCO and LVIS open-vocabulary splits from the official annotation files (DESIGN §2 "Splits").

    python tools/prepare_ovd_splits.py coco --annotations datasets/coco/annotations --out datasets
    python tools/prepare_ovd_splits.py lvis --train datasets/lvis/lvis_v1_train.json --out datasets

coco reads instances_train2017.json and instances_val2017.json from --annotations and writes, under --out:

    coco/zero-shot/instances_train2017_seen_2_oriorder.json  48 base classes' boxes (coco_zeroshot_train_oriorder)
    coco/zero-shot/instances_val2017_all_2_oriorder.json     65 classes' boxes (coco_generalized_zeroshot_val)
    coco/zero-shot/ovd_split.json                            the 65 categories with their split, the ids and names
                                                             of base/novel/ignored classes, the counts

lvis reads lvis_v1_train.json and writes, under --out:

    lvis/lvis_v1_train_norare.json       without the 337 rare classes' boxes (lvis_v1_train_norare)
    metadata/lvis_v1_train_cat_info.json images per category in that file (MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH)
    lvis/lvis_v1_ovd_split.json          base (common + frequent) and novel (rare) ids, the counts

The rules are documented in ovd/data/ov_splits.py. The output depends only on the input files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from ovd.data.ov_splits import (
    lvis_category_image_counts,
    lvis_ov_split_meta,
    make_coco_ov_splits,
    make_lvis_norare,
    split_counts,
)
from ovd.utils.io import read_json, write_json

COCO_TRAIN = "coco/zero-shot/instances_train2017_seen_2_oriorder.json"
COCO_VAL = "coco/zero-shot/instances_val2017_all_2_oriorder.json"
COCO_META = "coco/zero-shot/ovd_split.json"
LVIS_NORARE = "lvis/lvis_v1_train_norare.json"
LVIS_CAT_INFO = "metadata/lvis_v1_train_cat_info.json"
LVIS_META = "lvis/lvis_v1_ovd_split.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    coco = sub.add_parser("coco", help="the 48 base / 17 novel COCO split")
    coco.add_argument("--annotations", required=True,
                      help="folder of the official COCO 2017 annotations (instances_train2017.json, "
                           "instances_val2017.json)")
    coco.add_argument("--out", required=True, help="datasets root ($OVD_DATASETS) to write coco/zero-shot/ under")
    lvis = sub.add_parser("lvis", help="LVIS v1 train without the rare classes' boxes")
    lvis.add_argument("--train", required=True, help="the official lvis_v1_train.json")
    lvis.add_argument("--out", required=True, help="datasets root ($OVD_DATASETS) to write lvis/ and metadata/ under")
    return parser.parse_args(argv)


def _row(name: str, data: dict[str, Any]) -> str:
    n = split_counts(data)
    return f"  {name:45s} {n['images']:8d} {n['annotations']:12d} {n['categories']:11d}"


def _header() -> str:
    return f"  {'file':45s} {'images':>8s} {'annotations':>12s} {'categories':>11s}"


def prepare_coco(annotations: Path, out: Path) -> None:
    train_path, val_path = annotations / "instances_train2017.json", annotations / "instances_val2017.json"
    hint = "COCO 2017 instances file (annotations_trainval2017.zip from cocodataset.org)"
    train, val = read_json(train_path, what=hint), read_json(val_path, what=hint)
    train_base, val_all, meta = make_coco_ov_splits(train, val, train_source=str(train_path), val_source=str(val_path))
    meta = {
        "description": "COCO 2017 open-vocabulary split: 48 base, 17 novel, 15 ignored classes (ovd/data/ov_splits.py)",
        "sources": {"train": train_path.name, "val": val_path.name},
        **meta,
        "counts": {"train": split_counts(train_base), "val": split_counts(val_all)},
    }
    write_json(out / COCO_TRAIN, train_base)
    write_json(out / COCO_VAL, val_all)
    write_json(out / COCO_META, meta, indent=1)
    print(f"COCO open-vocabulary split: {len(meta['base_category_ids'])} base, {len(meta['novel_category_ids'])} "
          f"novel, {len(meta['ignored_category_ids'])} ignored classes -> {out / 'coco/zero-shot'}")
    print(_header())
    print(_row(train_path.name, train))
    print(_row(COCO_TRAIN, train_base))
    print(_row(val_path.name, val))
    print(_row(COCO_VAL, val_all))
    print(f"  novel: {', '.join(meta['novel_names'])}")


def prepare_lvis(train_path: Path, out: Path) -> None:
    train = read_json(train_path, what="LVIS v1 train file (lvis_v1_train.json.zip from lvisdataset.org)")
    norare = make_lvis_norare(train, source=str(train_path))
    cat_info = lvis_category_image_counts(norare, source=str(train_path))
    meta = {
        "description": "LVIS v1 open-vocabulary split: rare classes are novel (ovd/data/ov_splits.py)",
        "source": train_path.name,
        **lvis_ov_split_meta(train, source=str(train_path)),
        "counts": {"train": split_counts(train), "train_norare": split_counts(norare)},
    }
    write_json(out / LVIS_NORARE, norare)
    write_json(out / LVIS_CAT_INFO, cat_info)
    write_json(out / LVIS_META, meta, indent=1)
    n = meta["num_categories"]
    print(f"LVIS v1 open-vocabulary split: {len(meta['base_category_ids'])} base ({n['f']} frequent, {n['c']} "
          f"common), {len(meta['novel_category_ids'])} novel (rare) classes -> {out / LVIS_NORARE}")
    print(_header())
    print(_row(train_path.name, train))
    print(_row(LVIS_NORARE, norare))
    with_images = sum(c["image_count"] > 0 for c in cat_info)
    print(f"  {LVIS_CAT_INFO}: {len(cat_info)} categories, {with_images} with training images")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "coco":
        prepare_coco(Path(args.annotations), Path(args.out))
    else:
        prepare_lvis(Path(args.train), Path(args.out))


if __name__ == "__main__":
    main()
