"""Class-agnostic proposals of every image of a dataset from a trained proposal model (DESIGN §2), as a proposals file
(COCO results list, ovd/data/proposals.py) for region embeddings (RKD) and pseudo boxes (PIS).

    python tools/generate_proposals.py --config-file configs/shapes/proposals_oln.yaml \\
        --weights output/shapes/proposals_oln/model_final.pth --dataset shapes_train_all --out props.json --evaluate
    python tools/generate_proposals.py --config-file C --weights W --dataset-json ann.json --image-root images/ \\
        --out props_0.json --shard 0/4 --batch-size 16 --num-workers 8 MODEL.DEVICE cuda
    python tools/generate_proposals.py merge props_0.json props_1.json props_2.json props_3.json --out props.json

Per image: the model's proposals (at most TEST.DETECTIONS_PER_IMAGE), optionally class-agnostic NMS (--nms), the
--top-k best. Run again after an interruption with the same arguments: finished chunks are kept; a finished file
is left as is. --shard i/n processes the chunks i, i+n, ... of the images sorted by id (--chunk-size images each);
merge joins all n shard files into what one unsharded run writes (rerun the unsharded command with --evaluate to
score the merged file: it is recognised as finished). Beside the file, <out stem>.meta.json records the settings,
counts and unreadable images. An image that cannot be read is reported and skipped, and the exit status is then 1;
bad arguments (unknown dataset, a checkpoint of another model) exit with 2. --evaluate prints the proposal recall
(AR@k, recall@0.5) over all, base and novel boxes of the dataset (of this shard's images when sharded).
Trailing KEY VALUE pairs override the config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from ovd.config import load_config
from ovd.data.build import build_test_mapper, load_dataset
from ovd.data.catalog import DatasetSpec, register_config_datasets
from ovd.data.datasets import load_coco_json
from ovd.engine.checkpoint import CheckpointError
from ovd.engine.setup import setup_logging
from ovd.evaluation import format_recall_table
from ovd.utils.cli import parse_merge_args, parse_shard
from ovd.inference.proposal_generation import (
    GenerationSummary,
    build_proposal_model,
    evaluate_proposal_file,
    generate_proposals,
    merge_proposal_shards,
    meta_path,
    model_source,
    shard_records,
)

logger = logging.getLogger("ovd.proposals")
BAD_INPUT = (KeyError, ValueError, FileNotFoundError, FileExistsError, CheckpointError, RuntimeError)
_SHOWN_SKIPPED = 20


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the proposal model's YAML config")
    p.add_argument("--weights", help="its checkpoint (default: MODEL.WEIGHTS)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", help="a dataset name of the catalogue (e.g. shapes_train_all) or of the config's "
                      "DATASETS.CUSTOM")
    data.add_argument("--dataset-json", help="COCO annotation file (with --image-root)")
    p.add_argument("--image-root", help="image folder of --dataset-json")
    p.add_argument("--out", required=True, help="the proposals file to write")
    p.add_argument("--top-k", type=int, default=100, help="proposals kept per image (default: %(default)s)")
    p.add_argument("--nms", type=float, help="extra class-agnostic NMS IoU threshold on the model's proposals "
                                             "(default: none)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: TEST.IMS_PER_BATCH)")
    p.add_argument("--num-workers", type=int, help="image reading processes (default: DATALOADER.NUM_WORKERS)")
    p.add_argument("--chunk-size", type=int, default=256, help="images per resumable chunk (default: %(default)s)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: this run's share (default: 0/1)")
    p.add_argument("--evaluate", action="store_true", help="print the proposal recall after writing")
    p.add_argument("--overwrite", action="store_true", help="replace a file or partial run made with other settings")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE or KEY=VALUE pairs")
    args = p.parse_args(argv)
    if args.dataset_json is not None and args.image_root is None:
        p.error("--dataset-json needs --image-root")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if argv[:1] == ["merge"]:
        args = parse_merge_args(argv[1:], prog="generate_proposals.py", what="proposals files")
        try:
            summary = merge_proposal_shards(args.shards, args.out, overwrite=args.overwrite)
        except BAD_INPUT as e:
            return _error(e)
        print(f"merged {len(args.shards)} shards:\n{summary.format()}")
        return _report_skipped(summary)

    args = parse_args(argv)
    try:
        cfg = load_config(args.config_file, args.opts)
        register_config_datasets(cfg.DATASETS.CUSTOM)
        weights = args.weights or cfg.MODEL.WEIGHTS
        if not weights:
            raise ValueError("no weights: pass --weights (a checkpoint) or set MODEL.WEIGHTS")
        if args.dataset is not None:
            dataset = load_dataset(args.dataset)
        else:
            json_file = Path(args.dataset_json)
            dataset = load_coco_json(DatasetSpec(json_file.stem, json_file, Path(args.image_root)))
        model = build_proposal_model(cfg, weights)
        if args.top_k > cfg.TEST.DETECTIONS_PER_IMAGE:
            logger.warning("--top-k %d: the model gives at most TEST.DETECTIONS_PER_IMAGE=%d proposals per image "
                           "(override it to get more)", args.top_k, cfg.TEST.DETECTIONS_PER_IMAGE)
        summary = generate_proposals(
            model, dataset, args.out,
            mapper=build_test_mapper(cfg, dataset),
            source=model_source(cfg, args.config_file, weights),
            top_k=args.top_k,
            nms_thresh=args.nms,
            batch_size=args.batch_size or cfg.TEST.IMS_PER_BATCH,
            chunk_size=args.chunk_size,
            shard=args.shard,
            num_workers=cfg.DATALOADER.NUM_WORKERS if args.num_workers is None else args.num_workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except BAD_INPUT as e:
        return _error(e)
    print(f"proposals of {dataset.name}:\n{summary.format()}")
    if args.evaluate:
        sharded = args.shard[1] > 1
        records = ([r for chunk in shard_records(dataset.records, chunk_size=args.chunk_size, shard=args.shard).values()
                    for r in chunk] if sharded else None)
        metrics = evaluate_proposal_file(args.out, dataset, records=records)
        where = f", shard {args.shard[0]}/{args.shard[1]}: {len(records)} images" if sharded else ""
        print(format_recall_table(metrics, title=f"proposal recall (%) on {dataset.name}{where}"))
    return _report_skipped(summary)


def _error(e: Exception) -> int:
    print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 2


def _report_skipped(summary: GenerationSummary) -> int:
    if not summary.skipped:
        return 0
    logger.error("%d image(s) could not be read and have no proposals:%s%s", len(summary.skipped),
                 "".join(f"\n  image {s.image_id}: {s.error}" for s in summary.skipped[:_SHOWN_SKIPPED]),
                 f"\n  ... (all listed in {meta_path(summary.out)})" if len(summary.skipped) > _SHOWN_SKIPPED else "")
    return 1


if __name__ == "__main__":
    sys.exit(main())
