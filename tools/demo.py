"""Detect the objects of a vocabulary you choose in images, folders, globs or videos; save them drawn and as JSON.

    python tools/demo.py --config-file configs/shapes/base.yaml --weights output/shapes/base/model_final.pth \\
        --input datasets/shapes/images/val --vocabulary shapes --output output/demo MODEL.DEVICE cpu

--vocabulary: coco, lvis, shapes, a comma-separated list ("red mug,stapler"), a text file with one name per line,
or a ready embeddings file (.npy); default: the model's training vocabulary. New names are embedded with the CLIP
text model recorded beside the training embeddings, or --text-encoder/--text-encoder-weights, and cached.
--output gets one annotated image (or video) per input and detections.json: {"categories", "images",
"detections"}, the last a COCO results list. An input that cannot be read is reported and skipped; the exit
status is then 1. Trailing KEY VALUE pairs override the config.
"""

from __future__ import annotations

import argparse
import glob
import logging
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from ovd.data import read_image
from ovd.engine.checkpoint import CheckpointError
from ovd.engine.setup import setup_logging
from ovd.inference import Detections, Detector
from ovd.inference.cli import add_detector_arguments, detector_from_args
from ovd.utils.io import write_json

logger = logging.getLogger("ovd.demo")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+(=.*)?$")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="image files, folders, globs (quoted) or video files")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score shown (default: %(default)s)")
    p.add_argument("--output", help="folder for annotated images/videos and detections.json")
    add_detector_arguments(p)
    args = p.parse_args(argv)
    # `--input a.jpg MODEL.DEVICE cpu`: --input's nargs="+" swallows the overrides; give them back
    split = next((i for i, s in enumerate(args.input) if CONFIG_KEY.match(s) and not Path(s).exists()), None)
    if split is not None:
        args.input, args.opts = args.input[:split], args.input[split:] + args.opts
        if not args.input:
            p.error("--input needs at least one file, folder, glob or video")
    return args


def expand_inputs(specs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files to process (folders give their images, globs their matches) and the specs that matched nothing."""
    files, missing = [], []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if found:
            files.extend(found)
        else:
            missing.append(spec)
    return files, missing


class Writer:
    """Collects detections.json and saves annotated outputs under a unique name per input."""

    def __init__(self, output: str | None, detector: Detector) -> None:
        self.dir = Path(output) if output else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        vocab = detector.vocabulary
        self.categories = [{"id": i, "name": n} for i, n in zip(vocab.category_ids, vocab.names)]
        self.images: list[dict[str, Any]] = []
        self.detections: list[dict[str, Any]] = []
        self._taken: set[str] = set()

    def out_path(self, source: Path, suffix: str) -> Path | None:
        if self.dir is None:
            return None
        name, k = source.stem + suffix, 1
        while name in self._taken:  # two inputs with one file name (from different folders)
            name, k = f"{source.stem}_{k}{suffix}", k + 1
        self._taken.add(name)
        return self.dir / name

    def add(self, source: Path, detections: Detections, *, frame: int | None = None) -> None:
        image_id = len(self.images)
        record = {"id": image_id, "file_name": str(source), "height": detections.image_size[0],
                  "width": detections.image_size[1]}
        if frame is not None:
            record["frame"] = frame
        self.images.append(record)
        self.detections.extend(detections.to_coco(image_id))

    def close(self) -> None:
        if self.dir is not None:
            write_json(self.dir / "detections.json",
                       {"categories": self.categories, "images": self.images, "detections": self.detections})


def run_image(detector: Detector, path: Path, writer: Writer, threshold: float) -> int:
    rgb = read_image(path)
    detections = detector(rgb, score_threshold=threshold)
    writer.add(path, detections)
    out = writer.out_path(path, ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png")
    if out is not None:
        Image.fromarray(detections.draw(rgb)).save(out)
    return len(detections)


def run_video(detector: Detector, path: Path, writer: Writer, threshold: float) -> int:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise OSError(f"cannot open video {path}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    out, video, count, index = writer.out_path(path, ".mp4"), None, 0, 0
    try:
        with tqdm(total=frames, desc=path.name, unit="frame", leave=False) as bar:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                detections = detector(bgr, input_format="BGR", score_threshold=threshold)
                writer.add(path, detections, frame=index)
                count, index = count + len(detections), index + 1
                if out is not None:
                    if video is None:
                        h, w = bgr.shape[:2]
                        video = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                    video.write(np.ascontiguousarray(detections.draw(bgr, input_format="BGR")[:, :, ::-1]))
                bar.update()
    finally:
        capture.release()
        if video is not None:
            video.release()
    if index == 0:
        raise OSError(f"no frame could be read from video {path}")
    return count


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        detector = detector_from_args(args)
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("vocabulary: %d classes (%s%s)", len(detector.vocabulary), ", ".join(detector.vocabulary.names[:8]),
                ", ..." if len(detector.vocabulary) > 8 else "")
    files, failed = expand_inputs(args.input)
    for spec in failed:
        logger.error("input not found (or a folder/glob with no image): %s", spec)
    writer = Writer(args.output, detector)
    total = done = 0
    for path in tqdm(files, desc="images", unit="input", disable=len(files) < 2):
        run = run_video if path.suffix.lower() in VIDEO_SUFFIXES else run_image
        try:
            n = run(detector, path, writer, args.confidence_threshold)
        except (OSError, ValueError) as e:
            tqdm.write(f"error: skipped {path}: {e}", file=sys.stderr)
            failed.append(str(path))
            continue
        total, done = total + n, done + 1
        if args.output is None:
            tqdm.write(f"{path}: {n} detections")
    writer.close()
    logger.info("%d inputs, %d detections%s", done, total, f"; written to {args.output}" if args.output else "")
    if failed:
        logger.error("%d input(s) failed: %s", len(failed), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
