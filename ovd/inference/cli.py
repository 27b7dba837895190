"""Command-line arguments shared by the inference tools (`tools/demo.py`, `tools/export_onnx.py`)."""

from __future__ import annotations

import argparse

from ovd.inference.detector_api import Detector
from ovd.inference.vocabulary import parse_vocabulary

__all__ = ["add_detector_arguments", "detector_from_args"]


def add_detector_arguments(parser: argparse.ArgumentParser) -> None:
    """--config-file, --weights, --vocabulary, --templates, --text-encoder, --text-encoder-weights and trailing
    config overrides (``opts``)."""
    parser.add_argument("--config-file", required=True, help="the detector's YAML config")
    parser.add_argument("--weights", help="detector checkpoint (default: MODEL.WEIGHTS)")
    parser.add_argument("--vocabulary", help="coco | lvis | shapes | 'name,name,...' | names.txt (one per line) | "
                                             "embeddings.npy; default: the training vocabulary")
    parser.add_argument("--templates", help="prompt template file, one template with {} per line (ensembled)")
    parser.add_argument("--text-encoder", help="CLIP text model for new names (default: the one recorded beside the "
                                               "training embeddings): an open_clip name or local-dir:<folder>")
    parser.add_argument("--text-encoder-weights", help="its weights: an open_clip tag (e.g. openai) or a file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE or KEY=VALUE pairs")


def detector_from_args(args: argparse.Namespace, *, device: str | None = None) -> Detector:
    """The `Detector` the arguments of `add_detector_arguments` describe, with their vocabulary set."""
    detector = Detector.from_config(args.config_file, args.weights, device=device, overrides=args.opts,
                                    text_encoder=args.text_encoder, text_encoder_weights=args.text_encoder_weights)
    if args.vocabulary is not None:
        detector.set_vocabulary(parse_vocabulary(args.vocabulary), templates=args.templates)
    return detector
