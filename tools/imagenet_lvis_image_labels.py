"""Image-level labels of the ImageNet-21K synsets that are LVIS categories (DESIGN §2 "Image-level data").

    python tools/imagenet_lvis_image_labels.py --lvis datasets/lvis/lvis_v1_val.json \\
        --synset-map datasets/imagenet/lvis_synsets.txt --image-root datasets/imagenet/ImageNet-LVIS \\
        --out datasets/imagenet/annotations/imagenet_lvis_image_info.json
    python tools/imagenet_lvis_image_labels.py --lvis datasets/lvis/lvis_v1_val.json \\
        --synset-map datasets/imagenet/lvis_synsets.txt --list-wnids     # the ImageNet-21K folders to extract

Each folder ``<image-root>/<wnid>/`` (``n02084071``) becomes images labelled with the LVIS category whose ``synset``
(``dog.n.01``) is the folder's synset. The output is an image-label JSON (``images[]`` with ``id``, ``file_name``
``<wnid>/<file>`` relative to --image-root, ``height``, ``width``, ``pos_category_ids``; ``categories`` = the LVIS
categories); image sizes are read from the file headers, the pixels are not decoded.

The wnid -> synset map (--synset-map): a wnid is a WordNet 3.0 noun offset, which only WordNet itself turns into a
synset name. ovd does not depend on nltk; make the map once where nltk's wordnet corpus is installed
(``pip install nltk && python -m nltk.downloader wordnet``), one ``wnid synset`` pair per line:

    python - > datasets/imagenet/lvis_synsets.txt <<'EOF'
    import json, sys
    from nltk.corpus import wordnet as wn
    for c in json.load(open("datasets/lvis/lvis_v1_val.json"))["categories"]:
        try:
            print(f"n{wn.synset(c['synset']).offset():08d} {c['synset']}")
        except Exception as e:
            print(f"no WordNet synset for LVIS category {c['name']}: {e}", file=sys.stderr)
    EOF

A JSON object {wnid: synset} is read too. A folder whose wnid maps to no LVIS category is an error, or with
--skip-unmatched is left out and counted.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from ovd.data.ov_splits import imagenet_lvis_image_labels, lvis_rare_category_ids, read_synset_map
from ovd.utils.io import read_json, write_json

_SHOWN = 10


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lvis", required=True,
                        help="an LVIS v1 file whose categories (with 'synset') label the images: lvis_v1_val.json")
    parser.add_argument("--synset-map", required=True, help="'wnid synset' lines, or JSON {wnid: synset}")
    parser.add_argument("--image-root", help="folder of the ImageNet-21K <wnid>/ folders (ImageNet-LVIS)")
    parser.add_argument("--out", help="image-label JSON to write")
    parser.add_argument("--skip-unmatched", action="store_true",
                        help="leave out (and count) folders that map to no LVIS category instead of failing")
    parser.add_argument("--num-workers", type=int, default=0, help="processes reading image headers (default: 0)")
    parser.add_argument("--list-wnids", action="store_true",
                        help="print 'wnid synset name' of the LVIS categories found in the map and exit")
    args = parser.parse_args(argv)
    if not args.list_wnids and not (args.image_root and args.out):
        parser.error("give --image-root and --out (or --list-wnids)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    lvis = read_json(args.lvis, what="LVIS file")
    lvis_rare_category_ids(lvis, source=args.lvis)
    synset_map = read_synset_map(args.synset_map)
    if args.list_wnids:
        wnid_of = {synset: wnid for wnid, synset in synset_map.items()}
        for c in sorted(lvis["categories"], key=lambda c: c["id"]):
            if c.get("synset") in wnid_of:
                print(wnid_of[c["synset"]], c["synset"], c["name"])
        return
    dataset, report = imagenet_lvis_image_labels(args.image_root, lvis["categories"], synset_map,
                                                 skip_unmatched=args.skip_unmatched, num_workers=args.num_workers)
    write_json(args.out, dataset)
    novel = sum(c["image_count"] > 0 and c["split"] == "novel" for c in dataset["categories"])
    print(f"{report['images']} images of {report['matched_folders']} of {report['folders']} folders in "
          f"{args.image_root} -> {args.out}")
    print(f"  LVIS categories with images: {report['categories_with_images']} of {len(dataset['categories'])} "
          f"({novel} rare)")
    if report["unmatched"]:
        print(f"  left out {len(report['unmatched'])} folders that map to no LVIS category:")
        for wnid, why in list(report["unmatched"].items())[:_SHOWN]:
            print(f"    {wnid}: {why}")


if __name__ == "__main__":
    main()
