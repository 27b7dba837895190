"""Encode a vocabulary with a CLIP text tower and cache it as `.npy` [C, D] + JSON sidecar (DESIGN §1 item 4, §4).

Examples:
    python tools/dump_text_embeddings.py --pretrained openai --coco-json instances_val2017.json --out coco.npy
    python tools/dump_text_embeddings.py --model ovd-toy-vit --random-init --seed 0 --names "red circle,blue star" --out v.npy
    python tools/dump_text_embeddings.py --model local-dir:output/toy_clip --names-file names.txt --out v.npy
"""

from __future__ import annotations

import argparse
from typing import Sequence

from ovd.clip import (
    DEFAULT_TEMPLATES,
    encode_text,
    load_clip,
    load_templates,
    read_lines,
    save_text_embeddings,
)
from ovd.clip.arguments import add_clip_arguments, check_clip_arguments
from ovd.utils.io import read_json


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clip_arguments(parser)
    names = parser.add_mutually_exclusive_group(required=True)
    names.add_argument("--names", help="comma-separated class names")
    names.add_argument("--names-file", help="text file, one class name per line")
    names.add_argument("--coco-json", help="COCO annotation file; its categories sorted by id")
    parser.add_argument("--templates-file", help=f"prompt templates, one per line with {{}} (default: {DEFAULT_TEMPLATES[0]!r})")
    parser.add_argument("--out", required=True, help="output .npy; the sidecar goes beside it as .json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    check_clip_arguments(parser, args)
    return args


def vocabulary(args: argparse.Namespace) -> list[str]:
    """The class names, in the order of the rows to write."""
    if args.names is not None:
        return [name.strip() for name in args.names.split(",")]
    if args.names_file is not None:
        return read_lines(args.names_file, what="names file")
    categories = read_json(args.coco_json, what="COCO annotation file")["categories"]
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    names = vocabulary(args)
    templates = load_templates(args.templates_file) if args.templates_file else DEFAULT_TEMPLATES
    bundle = load_clip(args.model, args.pretrained, device=args.device, seed=args.seed if args.random_init else None)
    embeds = encode_text(bundle, names, templates=templates, batch_size=args.batch_size)
    path = save_text_embeddings(
        args.out, embeds, names=names, templates=templates, model_name=args.model, pretrained=args.pretrained
    )
    print(f"text embeddings {embeds.shape[0]}x{embeds.shape[1]} -> {path} (sidecar {path.with_suffix('.json')})")


if __name__ == "__main__":
    main()
