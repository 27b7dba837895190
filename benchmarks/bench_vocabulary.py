"""Cost of the vocabulary size at inference, and of setting a vocabulary (issue #8).

1. ms per image of `ovd.Detector` on CPU: random-init R50-FPN (bench_inference.py's model, top 1000 (proposal,
   class) candidates before NMS), an 800x1200 photo (scikit-image's coffee, upscaled), batch 1, vocabularies of
   80, 1203 and 21,000 classes with random text embeddings (scores are noise, the work is the same), unfused and
   fused; median of the timed runs, best of rounds that alternate the settings so load drift hits all of them.
   Target: 21k classes ≤ 1.3x the 80-class time.
2. The post-processing step alone on the 21k-class scores: `ROIHeads.postprocess` (threshold, then top-k) against
   `ExportableDetector.postprocess` (top-k of all scores, then threshold; the same detections).
3. `Detector.set_vocabulary` with the 1203 LVIS names: cold (loads a randomly initialised ViT-B-32 text tower,
   encodes, writes the cache) and cached (a fresh encoder reading the disk cache), in a temporary $OVD_CACHE.

    python benchmarks/bench_vocabulary.py [--runs 3] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from ovd.config import load_config
from ovd.inference import Detector, TextEncoder, Vocabulary, preset_vocabulary
from ovd.inference.export import ExportableDetector
from ovd.modeling.build import build_model

R50_FPN = [
    "MODEL.DEVICE", "cpu",
    "MODEL.BACKBONE.NAME", "resnet_fpn",
    "MODEL.RESNETS.DEPTH", "50",
    "MODEL.RPN.IN_FEATURES", "[p2,p3,p4,p5,p6]",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[32],[64],[128],[256],[512]]",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "1000",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "1000",
    "MODEL.ROI_HEADS.IN_FEATURES", "[p2,p3,p4,p5]",
    "MODEL.ROI_HEADS.TOPK_CANDIDATES_TEST", "1000",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "7",
    "INPUT.SIZE_DIVISIBILITY", "32",
]
SIZES = (80, 1203, 21000)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def detector_with(model_state: dict, num_classes: int, *, fused: bool) -> Detector:
    torch.manual_seed(num_classes)
    cfg = load_config(None, R50_FPN)
    model = build_model(cfg, text_embeds=torch.randn(num_classes, 512))
    # one set of network weights for every vocabulary size: only the classifier's vocabulary differs
    model.load_state_dict({**model.state_dict(), **model_state})
    det = Detector(model, vocabulary=Vocabulary.of([f"c{i}" for i in range(num_classes)]),
                   text_encoder=TextEncoder(None, unavailable="random vocabulary"),
                   min_size=cfg.INPUT.MIN_SIZE_TEST, max_size=cfg.INPUT.MAX_SIZE_TEST)
    return det.fuse() if fused else det


def bench_images(photo: np.ndarray, runs: int, rounds: int) -> dict[tuple[int, bool], float]:
    torch.manual_seed(0)
    shared = {k: v for k, v in build_model(load_config(None, R50_FPN), text_embeds=torch.randn(1, 512)).state_dict().items()
              if "cls_score.text_embeds" not in k and "freq_weight" not in k}
    detectors = {(c, f): detector_with(shared, c, fused=f) for c in SIZES for f in (False, True)}
    best: dict[tuple[int, bool], float] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for key, det in detectors.items():
                ms = median_ms(lambda: det(photo), runs)
                best[key] = min(best.get(key, float("inf")), ms)
    return best


def bench_postprocess(photo: np.ndarray, runs: int) -> tuple[float, float, int]:
    """ms of the two selections on the real [1000, 21001] scores of the photo, and how many detections they share."""
    det = detector_with({}, SIZES[-1], fused=True)
    heads, sample = det.model.roi_heads, det.to_sample(photo)
    with torch.inference_mode():
        images, sizes = det.model.preprocess([sample])
        features = det.model.backbone(images)
        proposals, _ = det.model.rpn(features, sizes)
        boxes = proposals[0].proposal_boxes
        logits, deltas = heads.box_predictor(heads.box_features(features, [boxes]))
        pred, scores = heads.box_coder.decode_single(deltas, boxes), torch.sigmoid(logits)
        exportable = ExportableDetector(det.model, image_size=sample.orig_size, min_size=det.min_size,
                                        max_size=det.max_size)
        a = heads.postprocess(pred, scores, sizes[0])
        b = exportable.postprocess(pred, scores)
        same = len({(round(s, 6), c) for s, c in zip(a.scores.tolist(), a.pred_classes.tolist())}
                   & {(round(s, 6), c) for s, c in zip(b.scores.tolist(), b.pred_classes.tolist())})
        t_eager = median_ms(lambda: heads.postprocess(pred, scores, sizes[0]), runs)
        t_topk = median_ms(lambda: exportable.postprocess(pred, scores), runs)
    return t_eager, t_topk, same


def bench_set_vocabulary(runs: int) -> tuple[float, float]:
    names = preset_vocabulary("lvis")
    cfg = load_config(None, R50_FPN)
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
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    photo = np.array(Image.fromarray(skdata.coffee()).resize((1200, 800), Image.BILINEAR))  # H 800, W 1200
    times = bench_images(photo, args.runs, args.rounds)
    t_eager, t_topk, same = bench_postprocess(photo, args.runs)
    cold, cached = bench_set_vocabulary(args.runs)
    print(f"CPU, {args.threads} thread(s), 800x1200 input, batch 1, random-init R50-FPN, random text embeddings; "
          f"median of {args.runs} runs, best of {args.rounds} rounds")
    print(f"{'classes':>8} {'unfused ms':>11} {'fused ms':>9} {'unfused/80':>11} {'fused/80':>9}")
    for c in SIZES:
        u, f = times[(c, False)], times[(c, True)]
        print(f"{c:>8} {u:>11.0f} {f:>9.0f} {u / times[(80, False)]:>11.2f} {f / times[(80, True)]:>9.2f}")
    print(f"post-processing of the 21000-class scores: ROIHeads.postprocess {t_eager:.0f} ms, top-k first "
          f"{t_topk:.0f} ms ({same} detections in common of at most 100)")
    print(f"set_vocabulary, 1203 LVIS names, random-init ViT-B-32 text tower: cold {cold:.0f} ms, cached {cached:.1f} ms")


if __name__ == "__main__":
    main()
