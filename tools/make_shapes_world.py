"""Generate the shapes world (DESIGN §6): a synthetic COCO-format OVD dataset.

    python tools/make_shapes_world.py                       # -> $OVD_DATASETS/shapes (default ./datasets/shapes)
    python tools/make_shapes_world.py --out /tmp/shapes --num-train 200 --num-val 50 --image-size 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ovd.data.shapes import default_shapes_root, load_shapes_meta, make_shapes_world


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_shapes_root(), help="output folder (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="rendering processes; the output does not depend on it")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if a world with other params exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    existed = (args.out / "meta.json").is_file() and not args.overwrite
    start = time.perf_counter()
    root = make_shapes_world(
        args.out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
        min_objects=args.min_objects, max_objects=args.max_objects, seed=args.seed, workers=args.workers,
        overwrite=args.overwrite,
    )
    meta = load_shapes_meta(root)
    if existed:
        print("shapes world already complete with these params; nothing done")
    else:
        print(f"generated in {time.perf_counter() - start:.1f} s")
    for split, c in meta["counts"].items():
        print(f"  {split:5s}: {c['images']:6d} images  {c['boxes']:6d} boxes  "
              f"({c['base_boxes']} base, {c['novel_boxes']} novel)")
    print(f"shapes world: {root.resolve()}")


if __name__ == "__main__":
    main()
