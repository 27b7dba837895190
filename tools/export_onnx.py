"""Export a detector to ONNX for images of any size, its vocabulary folded in or (--vocabulary-input) an input.

    python tools/export_onnx.py --config-file configs/shapes/base.yaml --weights output/shapes/base/model_final.pth \\
        --vocabulary shapes --output output/shapes/detector.onnx \\
        --check datasets/shapes/images/val/000000.png MODEL.DEVICE cpu

The graph takes the resized image (uint8 [3, h, w], model channel order, any h, w up to INPUT.MAX_SIZE_TEST) and the
original (H, W), and returns boxes in original pixels, scores and class indices (see `ovd.inference.export`);
`OnnxDetector` reads, resizes and runs it. With --vocabulary-input the graph also takes the text embeddings
[C, D] (any C), so a deployment changes its words without exporting again. --check runs an image through
onnxruntime and through PyTorch (with the --vocabulary given) and prints how far apart they are.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from ovd.data.images import read_image
from ovd.engine.checkpoint import CheckpointError
from ovd.inference.cli import add_detector_arguments, detector_from_args
from ovd.inference.export import OnnxDetector, export_onnx


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabulary-input", action="store_true",
                   help="the graph takes the normalised text embeddings [C, D] as an input instead of folding in "
                        "the --vocabulary")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--output", required=True, help="the .onnx file")
    p.add_argument("--check", metavar="IMAGE", help="an image: compare onnxruntime with PyTorch on it")
    add_detector_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        detector = detector_from_args(args, device="cpu")
        path = export_onnx(detector, args.output, vocabulary_input=args.vocabulary_input, opset=args.opset)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vocab = "the vocabulary an input" if args.vocabulary_input else f"{len(detector.vocabulary)} classes"
    print(f"wrote {path}: {vocab}, images up to {detector.max_size} px")
    if args.check:
        image = read_image(args.check)
        exported = OnnxDetector(path)
        if args.vocabulary_input:
            exported.set_vocabulary(detector.vocabulary,
                                    detector.model.roi_heads.box_predictor.cls_score.text_embeds.cpu().numpy())
        eager, onnx = detector(image), exported(image)
        print(f"check on {args.check}: PyTorch {len(eager)} detections, onnxruntime {len(onnx)}")
        if len(eager) != len(onnx) or not np.array_equal(eager.class_ids, onnx.class_ids):
            print("error: the detections differ", file=sys.stderr)
            return 1
        if len(eager):
            print(f"max |box difference| {np.abs(eager.boxes - onnx.boxes).max():.2e} px, "
                  f"max |score difference| {np.abs(eager.scores - onnx.scores).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
