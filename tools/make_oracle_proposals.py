"""Noisy-oracle class-agnostic proposals (DESIGN §6): jittered true boxes plus random boxes, standing in for MAVL.

Give it an annotation file with *all* boxes (the shapes world's train_all.json or val.json):

    python tools/make_oracle_proposals.py --dataset-json datasets/shapes/annotations/train_all.json \\
        --out datasets/shapes/proposals/train_oracle.json
"""

from __future__ import annotations

import argparse
from typing import Sequence

from ovd.data.proposals import make_oracle_proposals


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-json", required=True, help="COCO annotation file with all boxes")
    parser.add_argument("--out", required=True, help="proposals JSON to write")
    parser.add_argument("--recall", type=float, default=0.9,
                        help="probability of proposing each true box (default: %(default)s)")
    parser.add_argument("--jitter", type=float, default=0.1,
                        help="largest centre shift and log-size change, as a fraction of the box (default: %(default)s)")
    parser.add_argument("--num-random", type=int, default=3, help="random boxes per image (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    stats = make_oracle_proposals(args.dataset_json, args.out, recall=args.recall, jitter=args.jitter,
                                  num_random=args.num_random, seed=args.seed)
    print(f"{stats['proposals']} proposals for {stats['images']} images ({stats['images_without_proposals']} without) "
          f"-> {args.out}")
    print(f"recall at IoU 0.5: {stats['recall_achieved']:.3f} of {stats['gt_boxes']} true boxes "
          f"(target {stats['recall_target']})")


if __name__ == "__main__":
    main()
