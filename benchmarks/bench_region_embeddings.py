"""Regions per second of the region-embedding extractor against the bare CLIP image encoder.

The extractor runs end to end (annotations and proposals read, NMS, images decoded, regions cropped and preprocessed
in DataLoader workers or in-process, encoding, the store written and finalised) on a shapes world's train images with
noisy-oracle proposals. The bare encoder gets the same regions already cropped and preprocessed, in memory: the same
model (by default the toy CLIP; random init either way), batch size and thread count. Rounds alternate so drift in
machine load hits both; printed are the best round of each and, less sensitive to other load on a shared machine, the
median of the per-round ratios. One row per model: by default the real teacher's architecture (CLIP ViT-B/32 at 224
px) and the shapes world's toy CLIP (64 px, ~7 M parameters), whose encoder is so cheap that decoding the image and
resizing its crops, a fixed cost per region, weigh far more.

    python benchmarks/bench_region_embeddings.py [--num-images 60] [--threads N] [--num-workers 0] [--world DIR]
    python benchmarks/bench_region_embeddings.py --models ovd-toy-vit --num-images 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from ovd.clip import load_clip
from ovd.clip.regions import RegionPreprocessor, crop_regions, encode_regions, select_regions
from ovd.data.catalog import DatasetSpec
from ovd.data.datasets import load_coco_json
from ovd.data.images import read_image
from ovd.data.proposals import load_proposals, make_oracle_proposals
from ovd.clip.region_extraction import extract_region_embeddings
from ovd.data.shapes import make_shapes_world


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, help="an existing shapes world (default: generate one in a temporary folder)")
    p.add_argument("--num-images", type=int, default=60, help="train images of a generated world (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ovd-toy-vit"],
                   help="open_clip architectures, random init (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = args.world or make_shapes_world(tmp / "world", num_train=args.num_images, num_val=1, seed=0)
        ann, image_root = world / "annotations" / "train_all.json", world / "images" / "train"
        proposals_file = tmp / "proposals.json"
        make_oracle_proposals(ann, proposals_file, seed=0)
        records = load_coco_json(DatasetSpec("bench", ann, image_root)).records
        proposals, _ = load_proposals(proposals_file, image_sizes={r.image_id: (r.height, r.width) for r in records})
        rows = [measure(args, model, records, proposals, ann, image_root, proposals_file, tmp) for model in args.models]

    print(f"CPU, {args.threads} thread(s), {args.num_workers} worker(s), {len(records)} shapes-world images, "
          f"top {args.top_k} regions each, batch {args.batch_size}, {args.rounds} rounds, random init; regions/s, best round")
    header = f"{'model':<22}{'regions':>8}{'bare encoder':>14}{'extractor':>11}{'ratio':>7}{'median ratio':>14}"
    print(header)
    for r in rows:
        print(f"{r['model']:<22}{r['regions']:>8}{r['bare']:>14.0f}{r['extractor']:>11.0f}{r['ratio']:>7.2f}"
              f"{r['median_ratio']:>14.2f}")
    for r in rows:
        print(f"{r['model']} rounds (bare, extractor): " + ", ".join(f"({a:.0f}, {b:.0f})" for a, b in r["rounds"]))


def measure(args, model, records, proposals, ann, image_root, proposals_file, tmp) -> dict:
    """Best-round rates of the bare encoder and the extractor for one model, rounds alternating."""
    bundle = load_clip(model, seed=0)
    preprocessor = RegionPreprocessor(bundle)
    crops = []
    for r in records:
        boxes, scores = proposals[r.image_id]
        keep = select_regions(boxes, scores, top_k=args.top_k, nms_thresh=0.5)
        crops.append(preprocessor(crop_regions(read_image(r.file_name), boxes[keep])))
    crops = torch.cat(crops)
    batches = crops.split(args.batch_size)

    def bare() -> float:
        start = time.perf_counter()
        for batch in batches:
            encode_regions(bundle, batch)
        return len(crops) / (time.perf_counter() - start)

    def extractor() -> float:
        summary = extract_region_embeddings(
            bundle, dataset_json=ann, image_root=image_root, proposals_file=proposals_file, out_dir=tmp / "store",
            top_k=args.top_k, batch_size=args.batch_size, num_workers=args.num_workers, overwrite=True,
            progress=False,
        )
        assert summary.regions == len(crops)
        return summary.regions / summary.seconds

    bare()  # warm-up
    rounds = []
    for _ in range(args.rounds):
        rate_bare = bare()
        (tmp / "store" / "meta.json").unlink(missing_ok=True)  # a finished store would be returned as is
        rounds.append((rate_bare, extractor()))
    best_bare, best_extractor = max(b for b, _ in rounds), max(e for _, e in rounds)
    return {"model": f"{model} ({preprocessor.image_size[0]} px)", "regions": len(crops), "bare": best_bare,
            "extractor": best_extractor, "ratio": best_extractor / best_bare,
            "median_ratio": statistics.median(e / b for b, e in rounds), "rounds": rounds}


if __name__ == "__main__":
    main()
