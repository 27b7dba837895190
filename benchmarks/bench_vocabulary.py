"""Cost of the vocabulary size at inference, and of setting a vocabulary.

1. ms per image of `ovd.Detector` on CPU: random-init R50-FPN (bench_inference.py's model, top 1000 (proposal,
   class) candidates before NMS), an 800x1200 photo (scikit-image's coffee, upscaled), batch 1, vocabularies of
   80, 1203 and 21,000 classes with random text embeddings (scores are noise, the work is the same), unfused and
   fused; median of the timed runs, the six settings interleaved run by run so load drift hits all of them.
   Target: 21k classes ≤ 1.3x the 80-class time.
2. The post-processing step alone on the 21k-class scores: `ROIHeads.postprocess` (the one post-processing of eager
   inference and the ONNX graph: per-class NMS as one NMS with class offsets from dense class ranks) against the same
   with NMS run class by class (torchvision's exact loop), and whether both keep the same detections; and the
   classifier alone (zero-shot and weight transfer), unfused and fused.
3. `Detector.set_vocabulary` with 1203 names (LVIS's where its annotation file is at hand): cold (loads a randomly initialised ViT-B-32 text tower,
   encodes, writes the cache) and cached (a fresh encoder reading the disk cache), in a temporary $OVD_CACHE.

    python benchmarks/bench_vocabulary.py [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
from pathlib import Path
import os
import statistics
import tempfile
import time
from typing import Callable
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.ops.boxes import _batched_nms_vanilla
from skimage import data as skdata

from ovd.config import load_config
from ovd.inference import Detector, TextEncoder, Vocabulary, preset_vocabulary
from ovd.modeling import roi_heads
from ovd.modeling.build import build_model
from ovd.modeling.classifier import WeightTransferClassifier, ZeroShotClassifier
from ovd.utils.timing import median_ms

REPO = Path(__file__).resolve().parents[1]
R50_FPN = "configs/bench/r50_fpn.yaml"
SIZES = (80, 1203, 21000)


def detector_with(model_state: dict, num_classes: int, *, fused: bool) -> Detector:
    """A random R50-FPN `Detector` with ``num_classes`` random text embeddings, ``model_state`` loaded over it."""
    torch.manual_seed(num_classes)
    cfg = load_config(REPO / R50_FPN)
    model = build_model(cfg, text_embeds=torch.randn(num_classes, 512))
    # one set of network weights for every vocabulary size: only the classifier's vocabulary differs
    model.load_state_dict({**model.state_dict(), **model_state})
    # A random R50's RPN decodes its boxes into a few dozen degenerate ones; with zero deltas the proposals are its
    # top-scoring anchors, so the RoI head sees the ~1000 proposals per image a trained RPN gives.
    nn.init.zeros_(model.rpn.head.bbox_pred.weight)
    nn.init.zeros_(model.rpn.head.bbox_pred.bias)
    det = Detector(model, vocabulary=Vocabulary.of([f"c{i}" for i in range(num_classes)]),
                   text_encoder=TextEncoder(None, unavailable="random vocabulary"),
                   min_size=cfg.INPUT.MIN_SIZE_TEST, max_size=cfg.INPUT.MAX_SIZE_TEST)
    return det.fuse() if fused else det


def bench_images(photo: np.ndarray, runs: int) -> dict[tuple[int, bool], float]:
    """Median ms per image for each (classes, fused), the settings interleaved run by run."""
    torch.manual_seed(0)
    state = build_model(load_config(REPO / R50_FPN), text_embeds=torch.randn(1, 512)).state_dict()
    shared = {k: v for k, v in state.items() if "cls_score.text_embeds" not in k and "freq_weight" not in k}
    detectors = {(c, f): detector_with(shared, c, fused=f) for c in SIZES for f in (False, True)}
    times: dict[tuple[int, bool], list[float]] = {key: [] for key in detectors}
    with torch.inference_mode():
        for det in detectors.values():
            det(photo)  # warm-up
        for _ in range(runs):
            # one image per setting in turn, so load from other processes hits every setting alike
            for key, det in detectors.items():
                t = time.perf_counter()
                det(photo)
                times[key].append(time.perf_counter() - t)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def bench_postprocess(photo: np.ndarray, runs: int) -> tuple[float, float, bool]:
    """ms of `ROIHeads.postprocess` on the real [1000, 21001] scores of the photo, with its NMS and with NMS run class
    by class, and whether the two keep the same detections."""
    det = detector_with({}, SIZES[-1], fused=True)
    heads, sample = det.model.roi_heads, det.to_sample(photo)
    with torch.inference_mode():
        images, sizes = det.model.preprocess([sample])
        features = det.model.backbone(images)
        proposals, _ = det.model.rpn(features, sizes)
        boxes = proposals[0].proposal_boxes
        logits, deltas = heads.box_predictor(heads.box_features(features, [boxes]))
        pred, scores = heads.box_coder.decode_single(deltas, boxes), torch.sigmoid(logits)
        a = heads.postprocess(pred, scores, sizes[0])
        t_ours = median_ms(lambda: heads.postprocess(pred, scores, sizes[0]), runs)
        with mock.patch.object(roi_heads, "class_nms", _batched_nms_vanilla):
            b = heads.postprocess(pred, scores, sizes[0])
            t_loop = median_ms(lambda: heads.postprocess(pred, scores, sizes[0]), runs)
        # (score, class) pairs: where a random head scores two boxes of one class equally (saturated at 1.0), the
        # two NMS orders may keep either box
        same = sorted(zip(a.scores.tolist(), a.pred_classes.tolist())) == sorted(
            zip(b.scores.tolist(), b.pred_classes.tolist()))
    return t_ours, t_loop, same


def bench_classifier(runs: int) -> list[tuple[str, int, float, float]]:
    """ms of the classifier alone on 1000 box features (1024-d, the FPN head's), unfused and fused."""
    rows = []
    for cls in (ZeroShotClassifier, WeightTransferClassifier):
        for num_classes in SIZES:
            torch.manual_seed(0)
            classifier = cls(in_dim=1024, text_embeds=torch.randn(num_classes, 512), bias_init=-4.6).eval()
            fused, x = classifier.fuse(), torch.randn(1000, 1024)
            with torch.inference_mode():
                rows.append((cls.__name__, num_classes, median_ms(lambda: classifier(x), runs),
                             median_ms(lambda: fused(x), runs)))
    return rows


def bench_set_vocabulary(runs: int) -> tuple[float, float]:
    """ms of a cold and of a cached `set_vocabulary` of 1203 names: the LVIS names where the LVIS annotation file is
    at hand (the `lvis` preset), else 1203 made-up two-word names of similar length (the cost depends on the count)."""
    try:
        names = preset_vocabulary("lvis")
    except FileNotFoundError:
        names = Vocabulary.of([f"object number {i}" for i in range(1203)])
    cfg = load_config(REPO / R50_FPN)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["OVD_CACHE"] = cache
        model = build_model(cfg, text_embeds=torch.randn(1, 512))

        def make() -> Detector:
            # a fresh encoder each time: nothing in memory, the tower is loaded only on a cache miss
            current = Vocabulary.of([f"c{i}" for i in range(model.roi_heads.num_classes)])
            return Detector(model, vocabulary=current, text_encoder=TextEncoder("ViT-B-32", None, seed=0),
                            min_size=800, max_size=1333)

        det = make()
        t = time.perf_counter()
        det.set_vocabulary(names)
        cold = (time.perf_counter() - t) * 1e3
        cached = median_ms(lambda: make().set_vocabulary(names), runs)
    return cold, cached


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    photo = np.array(Image.fromarray(skdata.coffee()).resize((1200, 800), Image.BILINEAR))  # H 800, W 1200
    times = bench_images(photo, args.runs)
    t_eager, t_topk, same = bench_postprocess(photo, args.runs)
    classifier_rows = bench_classifier(args.runs)
    cold, cached = bench_set_vocabulary(args.runs)
    print(f"CPU, {args.threads} thread(s), 800x1200 input, batch 1, random-init R50-FPN, random text embeddings; "
          f"median of {args.runs} runs, the settings interleaved")
    print(f"{'classes':>8} {'unfused ms':>11} {'fused ms':>9} {'unfused/80':>11} {'fused/80':>9}")
    for c in SIZES:
        u, f = times[(c, False)], times[(c, True)]
        print(f"{c:>8} {u:>11.0f} {f:>9.0f} {u / times[(80, False)]:>11.2f} {f / times[(80, True)]:>9.2f}")
    print(f"post-processing of the 21000-class scores: ROIHeads.postprocess {t_eager:.0f} ms, with NMS class by class "
          f"{t_topk:.0f} ms (same scores and classes kept: {'yes' if same else 'NO'})")
    print("the classifier alone, 1000 box features: unfused ms / fused ms")
    for name, c, u, f in classifier_rows:
        print(f"  {name:<25} {c:>6} classes {u:>7.1f} {f:>7.1f}")
    print(f"set_vocabulary, 1203 names, random-init ViT-B-32 text tower: cold {cold:.0f} ms, "
          f"cached {cached:.1f} ms")


if __name__ == "__main__":
    main()
