"""CLIP image embeddings of each image's top class-agnostic proposals, for RKD (DESIGN §2, §4).

    python tools/extract_region_embeddings.py --dataset shapes_train_base --proposals props.json \\
        --model local-dir:output/toy_clip --out datasets/shapes/region_embeddings/train
    python tools/extract_region_embeddings.py --dataset-json ann.json --image-root images/ --proposals props.json \\
        --model ViT-B-32 --pretrained openai --device cuda --num-workers 8 --shard 0/4 --out store_0
    python tools/extract_region_embeddings.py merge store_0 store_1 store_2 store_3 --out store

Run again after an interruption with the same arguments: finished chunks are kept. ``--shard i/n`` processes the
chunks i, i+n, ... of the images sorted by id (``--chunk-size`` images each); ``merge`` joins all n shard stores into
what one unsharded run writes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ovd.clip import load_clip
from ovd.clip.arguments import add_clip_arguments, check_clip_arguments
from ovd.config import load_config
from ovd.data.catalog import get_dataset, register_config_datasets
from ovd.clip.region_extraction import extract_region_embeddings
from ovd.data.region_store import merge_stores
from ovd.utils.cli import parse_merge_args, parse_shard


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", help="a dataset name of the catalogue (e.g. shapes_train_base), or of the "
                      "DATASETS.CUSTOM of --config-file")
    parser.add_argument("--config-file", help="a config whose DATASETS.CUSTOM declares --dataset")
    data.add_argument("--dataset-json", help="COCO annotation file (with --image-root)")
    parser.add_argument("--image-root", help="image folder of --dataset-json")
    parser.add_argument("--proposals", required=True, help="class-agnostic proposals, COCO-results JSON")
    add_clip_arguments(parser)
    parser.add_argument("--top-k", type=int, default=5, help="regions kept per image after NMS (default: %(default)s)")
    parser.add_argument("--nms", type=float, default=0.5, help="class-agnostic NMS IoU threshold (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="regions per encoder batch (default: %(default)s)")
    parser.add_argument("--num-workers", type=int,
                        help="image reading/cropping processes (default: 0 on CPU, where the encoder keeps every core "
                             "busy and a worker would only take turns with it; 4 otherwise)")
    parser.add_argument("--chunk-size", type=int, default=256, help="images per resumable chunk (default: %(default)s)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: this run's share (default: 0/1)")
    parser.add_argument("--skip-unknown-images", action="store_true",
                        help="count and skip proposals of image ids not in the dataset instead of failing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="store folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a store or partial run made with other settings")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.dataset_json is not None and args.image_root is None:
        parser.error("--dataset-json needs --image-root")
    check_clip_arguments(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["merge"]:
        args = parse_merge_args(argv[1:], prog="extract_region_embeddings.py", what="region stores")
        store = merge_stores(args.shards, args.out, overwrite=args.overwrite)
        print(f"merged {len(args.shards)} shards: {len(store)} images, {store.num_regions} regions -> {store.path}")
        return
    args = parse_args(argv)
    if args.config_file:
        register_config_datasets(load_config(args.config_file).DATASETS.CUSTOM)
    if args.dataset is not None:
        spec = get_dataset(args.dataset)
        dataset_json, image_root = spec.json_file, spec.image_root
    else:
        dataset_json, image_root = args.dataset_json, args.image_root
    bundle = load_clip(args.model, args.pretrained, device=args.device, seed=args.seed if args.random_init else None)
    summary = extract_region_embeddings(
        bundle,
        dataset_json=dataset_json,
        image_root=image_root,
        proposals_file=args.proposals,
        out_dir=args.out,
        top_k=args.top_k,
        nms_thresh=args.nms,
        batch_size=args.batch_size,
        num_workers=args.num_workers if args.num_workers is not None else 0 if args.device == "cpu" else 4,
        chunk_size=args.chunk_size,
        shard=args.shard,
        unknown_images="skip" if args.skip_unknown_images else "error",
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print("region embeddings:")
    print(summary.format())


if __name__ == "__main__":
    main()
