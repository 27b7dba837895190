"""Train the shapes world's CLIP teacher (DESIGN §6): a small open_clip model that knows base *and* novel names.

    python tools/train_toy_clip.py              # world $OVD_DATASETS/shapes -> $OVD_DATASETS/shapes/toy_clip
    python tools/train_toy_clip.py --world /tmp/shapes --out /tmp/toy_clip --steps 100 --batch-size 32

The folder loads like real CLIP weights: ``load_clip("local-dir:<out>")``, or
``tools/dump_text_embeddings.py --model local-dir:<out>``. A finished run with the same params is not repeated.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from ovd.clip.train_toy import train_toy_clip
from ovd.data.shapes import default_shapes_root


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=default_shapes_root(),
                        help="shapes world root (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <world>/toy_clip, so $OVD_DATASETS/shapes/toy_clip)")
    parser.add_argument("--steps", type=int, default=600, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain even if the folder holds a run with other params")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.out or args.world / "toy_clip"
    metrics = train_toy_clip(args.world, out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, overwrite=args.overwrite)
    zero_shot = metrics["zero_shot"]
    print(f"\nzero-shot accuracy on {zero_shot['num_crops']} held-out crops ({metrics['steps']} steps, "
          f"{metrics['seconds']:.0f} s):")
    print("  base   novel  all")
    print("  " + "  ".join("  -  " if zero_shot[k] is None else f"{zero_shot[k]:.3f}"
                           for k in ("base", "novel", "all")))
    print(f"toy CLIP: {out.resolve()}  (load_clip('local-dir:{out}'))")
    return metrics


if __name__ == "__main__":
    main()
