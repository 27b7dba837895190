"""Train or evaluate a detector: `python tools/train_net.py --config-file CFG [--eval-only] [--resume] [KEY VALUE ...]`.

A run killed at any point (even while saving) continues with `--resume` exactly as if it had not stopped (bit for
bit on CPU): it starts from the last readable checkpoint in OUTPUT_DIR, skipping damaged ones with a warning.
A NaN/Inf loss stops the run and leaves OUTPUT_DIR/nonfinite_iter_<it>.json/.pth to look into; with
`SOLVER.SKIP_NONFINITE_LOSS true` such steps are skipped and counted instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ovd.config import ConfigError, load_config
from ovd.engine.checkpoint import CheckpointError
from ovd.engine.launch import launch
from ovd.engine.setup import setup_logging, use_cuda
from ovd.engine.trainer import evaluate_only, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config-file", required=True, help="YAML config (with _BASE_ inheritance)")
    p.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS on DATASETS.TEST")
    p.add_argument("--resume", action="store_true", help="continue from the last readable checkpoint in OUTPUT_DIR")
    p.add_argument("--num-gpus", type=int, default=1, help="local workers (GPUs; CPU processes with MODEL.DEVICE cpu)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY=VALUE or KEY VALUE pairs")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict | None:
    cfg = load_config(args.config_file, args.opts)
    setup_logging(cfg.OUTPUT_DIR)
    if args.eval_only:
        return evaluate_only(cfg)
    return train(cfg, resume=args.resume)


def cli(argv: list[str] | None = None) -> int:
    """Exit status 2 with one ``error:`` line for bad input (config, files, checkpoints); the traceback goes to the
    run's log.txt where logging is set up."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config_file, args.opts)  # fail on a bad config before spawning workers
        launch(main, args.num_gpus, use_cuda=use_cuda(cfg), args=(args,))
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        logging.getLogger("ovd").debug("stopped by bad input", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
