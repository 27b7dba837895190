"""Images per second of the proposal generator (tools/generate_proposals.py) against the plain forward of its model.

The generator runs end to end (images read and resized, in DataLoader workers or in-process, the forward, top-k,
chunks saved, the proposals file and its sidecar written) over the validation images of a shapes world. The plain
forward is ``model.predict`` over the same images, already read and resized, in memory: the same model (random init),
batches and thread count. Rounds alternate so drift in machine load hits both; printed are the best round of each and,
less sensitive to other load on a shared machine, the median of the per-round ratios (target: >= 0.9).

    python benchmarks/bench_proposals.py [--num-images 200] [--image-size 160] [--batch-size 8] [--threads N]
    python benchmarks/bench_proposals.py --image-size 640 --batch-size 16 --num-workers 8 MODEL.DEVICE cuda \\
        INPUT.MIN_SIZE_TEST 640 INPUT.MAX_SIZE_TEST 640
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ovd.config import load_config
from ovd.data.catalog import DatasetSpec
from ovd.data.datasets import load_coco_json
from ovd.data.shapes import make_shapes_world
from ovd.engine.setup import select_device
from ovd.data.build import build_test_mapper
from ovd.inference.proposal_generation import generate_proposals, meta_path
from ovd.modeling.build import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="configs/shapes/proposals_oln.yaml")
    p.add_argument("--world", type=Path, help="an existing shapes world (default: generate one in a temporary folder)")
    p.add_argument("--num-images", type=int, default=200, help="val images of a generated world (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=160, help="of a generated world (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, args.opts)
    device = select_device(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = args.world or make_shapes_world(tmp / "world", num_train=1, num_val=args.num_images,
                                                image_size=args.image_size, seed=0)
        ann = world / "annotations" / "val.json"
        dataset = load_coco_json(DatasetSpec("bench", ann, world / "images" / "val"))
        mapper = build_test_mapper(cfg, dataset)
        records = sorted(dataset.records, key=lambda r: r.image_id)
        samples = [mapper(r) for r in records]
        # the generator's batches: consecutive images, never across a chunk
        batches = [samples[c + s : c + min(s + args.batch_size, args.chunk_size)]
                   for c in range(0, len(samples), args.chunk_size)
                   for s in range(0, min(args.chunk_size, len(samples) - c), args.batch_size)]

        def plain() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    model.predict(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return len(samples) / (time.perf_counter() - start)

        def generator() -> float:
            out = tmp / "proposals.json"
            meta_path(out).unlink(missing_ok=True)  # a finished file would be returned as is
            summary = generate_proposals(model, dataset, out, mapper=mapper, source={"bench": "random init"},
                                         batch_size=args.batch_size, chunk_size=args.chunk_size,
                                         num_workers=args.num_workers, overwrite=True, progress=False)
            assert summary.images == len(samples) and not summary.skipped
            return summary.images_per_second

        plain()  # warm-up
        rounds = [(plain(), generator()) for _ in range(args.rounds)]

    best_plain, best_generator = max(a for a, _ in rounds), max(b for _, b in rounds)
    print(f"{device.type}, {args.threads} thread(s), {args.num_workers} worker(s), {len(samples)} shapes-world images "
          f"at {args.image_size} px, batch {args.batch_size}, {args.rounds} rounds, {args.config_file} random init; "
          "images/s, best round")
    print(f"{'plain forward':>14}{'generator':>11}{'ratio':>7}{'median ratio':>14}")
    print(f"{best_plain:>14.1f}{best_generator:>11.1f}{best_generator / best_plain:>7.2f}"
          f"{statistics.median(b / a for a, b in rounds):>14.2f}")
    print("rounds (plain, generator): " + ", ".join(f"({a:.1f}, {b:.1f})" for a, b in rounds))


if __name__ == "__main__":
    main()
