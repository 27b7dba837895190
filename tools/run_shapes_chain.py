"""The main job on the shapes world: make the world, embed the class names, train, evaluate, print the table.

Each stage skips itself when its output already exists, so a second run is fast and an interrupted run continues
(training resumes from its last checkpoint). `make demo` runs this.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ovd.clip import encode_text, load_clip, load_text_embeddings, save_text_embeddings
from ovd.config import load_config
from ovd.data.catalog import datasets_root
from ovd.data.shapes import SHAPES_CATEGORIES, make_shapes_world
from ovd.engine.setup import setup_logging
from ovd.engine.trainer import train
from ovd.evaluation import format_results_table
from ovd.utils.io import read_json

logger = logging.getLogger("ovd.chain")


def text_embeddings(path: Path, names: list[str]) -> None:
    """Random-init toy CLIP text embeddings (until the RKD issue's trained teacher replaces them)."""
    if path.is_file():
        try:
            load_text_embeddings(path, expected_names=names)
            logger.info("text embeddings: %s exists, skipped", path)
            return
        except ValueError as e:
            logger.info("text embeddings: %s is stale (%s); rewriting", path, e)
    bundle = load_clip("ovd-toy-vit", seed=0)
    save_text_embeddings(path, encode_text(bundle, names), names=names, templates=["a photo of a {}"],
                         model_name="ovd-toy-vit", pretrained=None)
    logger.info("text embeddings: wrote %s", path)


def train_stage(config: str, opts: list[str]) -> dict:
    cfg = load_config(config, opts)
    out = Path(cfg.OUTPUT_DIR)
    done = out / "final_metrics.json"
    if done.is_file() and (out / "model_final.pth").is_file():
        logger.info("train %s: %s exists, skipped", config, done)
        return read_json(done)
    return train(cfg, resume=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("--output", default="output/shapes", help="where the stages write their runs")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every training stage")
    args = p.parse_args(argv)
    setup_logging()
    t0 = time.perf_counter()
    root = datasets_root() / "shapes"
    make_shapes_world(root, num_train=args.num_train, num_val=args.num_val, workers=2)
    text_embeddings(root / "text_embeddings" / "random_toy_clip.npy", [c["name"] for c in SHAPES_CATEGORIES])
    out = Path(args.output)
    base = train_stage("configs/shapes/base.yaml", ["OUTPUT_DIR", str(out / "base"), *args.opts])
    setup_logging()
    print()
    print(format_results_table(base["shapes_val"], title="shapes_val, base-only detector (AP in %)"))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s. Outputs:")
    print(f"  world:        {root}")
    print(f"  checkpoint:   {out / 'base' / 'model_final.pth'}")
    print(f"  metrics:      {out / 'base' / 'metrics.jsonl'} (TensorBoard: {out / 'base' / 'tensorboard'})")
    print(f"  detections:   {out / 'base' / 'inference' / 'shapes_val' / 'coco_instances_results.json'}")


if __name__ == "__main__":
    main()
