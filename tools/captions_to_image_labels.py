"""Image-level labels from captions: class names, plurals and synonyms matched as whole words (DESIGN §2, §4).

    python tools/captions_to_image_labels.py --captions annotations/captions_train2017.json \\
        --categories zero-shot/ovd_split.json --unlabelled-categories annotations/instances_val2017.json \\
        --out zero-shot/captions_train2017_tags.json
    python tools/captions_to_image_labels.py --captions datasets/shapes/annotations/train_image_labels.json \\
        --categories datasets/shapes/meta.json --out /tmp/labels.json \\
        --reference datasets/shapes/annotations/train_image_labels.json

The matching rules are documented in ovd/pseudo_labels/captions.py. Images whose captions name no category are
dropped unless --keep-empty.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from ovd.pseudo_labels.captions import (
    captions_to_image_labels,
    compare_image_labels,
    load_caption_images,
    load_categories,
    load_synonyms,
)
from ovd.utils.io import read_json, write_json

_SHOWN_CLASSES = 10


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", required=True,
                        help="COCO caption file (images + annotations[].caption), or images[] with captions lists")
    parser.add_argument("--categories", required=True,
                        help="JSON file with the vocabulary's 'categories' (COCO/LVIS annotation file, shapes "
                             "meta.json)")
    parser.add_argument("--out", required=True, help="image-label JSON to write")
    parser.add_argument("--synonyms", help="JSON {category name: [synonym, ...]}")
    parser.add_argument("--unlabelled-categories",
                        help="JSON file with 'categories' (e.g. COCO's instances_val2017.json): those whose ids are "
                             "not in --categories are matched but never labelled, so 'hot dog' does not label 'dog'")
    parser.add_argument("--keep-empty", action="store_true",
                        help="keep images whose captions name no category (with empty pos_category_ids)")
    parser.add_argument("--reference", help="image-label JSON to compare the derived labels with (same image ids)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    images = load_caption_images(args.captions)
    categories = load_categories(args.categories)
    synonyms = load_synonyms(args.synonyms) if args.synonyms else None
    ids = {c["id"] for c in categories}
    unlabelled = ([c for c in load_categories(args.unlabelled_categories) if c["id"] not in ids]
                  if args.unlabelled_categories else [])
    dataset, stats = captions_to_image_labels(images, categories, synonyms=synonyms, keep_empty=args.keep_empty,
                                              unlabelled_categories=unlabelled)
    write_json(args.out, dataset)

    print(f"{stats.images} images, {stats.captions} captions, {len(categories)} categories -> {args.out}")
    print(f"  labelled images  {stats.labelled_images} ({stats.labelled_images / max(stats.images, 1):.1%})")
    print(f"  empty images     {stats.empty_images} ({'kept' if args.keep_empty else 'dropped'})")
    print(f"  labels per image {stats.labels_per_image:.2f}")
    if stats.ambiguous_forms:
        print(f"  forms naming several categories (all labelled): {', '.join(stats.ambiguous_forms[:_SHOWN_CLASSES])}")
    ranked = sorted(stats.images_per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    print("  most labelled:  " + ", ".join(f"{name} {count}" for name, count in ranked[:_SHOWN_CLASSES]))
    print("  least labelled: " + ", ".join(f"{name} {count}" for name, count in ranked[-_SHOWN_CLASSES:][::-1]))
    if args.reference:
        reference = read_json(args.reference, what="reference image-label file")["images"]
        agreement = compare_image_labels(dataset["images"], reference)
        print(f"  agreement with {args.reference}: exact {agreement['exact']:.4f}, precision "
              f"{agreement['precision']:.4f}, recall {agreement['recall']:.4f} over {agreement['images']} images")


if __name__ == "__main__":
    main()
