"""A detection page in the browser: upload or pick images, type a vocabulary, compare two vocabularies.

    python tools/web_demo.py                      # the RKD+PIS+WT shapes model `make demo` trains, on port 7860
    python tools/web_demo.py --config-file configs/shapes/rkd_pis_wt.yaml \\
        --weights output/shapes/rkd_pis_wt/model_final.pth --port 7860 MODEL.DEVICE cpu

Then open http://127.0.0.1:7860. The server listens on 127.0.0.1 only and makes no request outside this machine.
The page and its choices are described in `ovd/inference/web.py`. Needs the ``web`` extra (gradio).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ovd.engine.checkpoint import CheckpointError
from ovd.engine.setup import setup_logging
from ovd.inference import Detector
from ovd.inference.vocabulary import cache_dir
from ovd.inference.web import WebDemo, build_app, example_images, launch_kwargs, novel_class_names

DEFAULT_CONFIG = "configs/shapes/rkd_pis_wt.yaml"
DEFAULT_WEIGHTS = "output/shapes/rkd_pis_wt/model_final.pth"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help="the detector's YAML config (default: %(default)s)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="detector checkpoint (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="local port (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="the score slider's start (default: %(default)s)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE or KEY=VALUE pairs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if not Path(args.weights).is_file():
        hint = ("`make demo` trains it" if args.weights == DEFAULT_WEIGHTS
                else "pass --weights with a detector checkpoint")
        print(f"error: no detector weights at {args.weights}: {hint} (or pass --config-file and --weights)",
              file=sys.stderr)
        return 2
    try:
        detector = Detector.from_config(args.config_file, args.weights, overrides=args.opts)
        demo = WebDemo(detector, novel_names=novel_class_names(args.config_file, args.opts))
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    examples = example_images(cache_dir() / "web_examples")
    app = build_app(demo, examples=examples, threshold=args.threshold)
    print(f"serving on http://127.0.0.1:{args.port} (Ctrl+C stops)")
    app.launch(**launch_kwargs(port=args.port, examples=examples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
