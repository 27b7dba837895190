"""ms per image of our R50-FPN detector against torchvision's fasterrcnn_resnet50_fpn.

Both with random weights, the same 800x1200 input (a real photo from scikit-image, upscaled), batch 1, CPU, the same
thread count, run alternately in one process; median over the timed runs. Both RPNs' box deltas are zeroed: a random
RPN decodes into a few dozen degenerate boxes, a zeroed one proposes its top anchors, so each RoI head sees the 1000
proposals per image a trained RPN gives. Vocabularies of 80 and 1203 classes (torchvision's model gets num_classes =
C + 1). Our detector keeps the top 1000 (proposal, class) candidates before NMS
(MODEL.ROI_HEADS.TOPK_CANDIDATES_TEST), as a deployment config would; with random weights the sigmoid scores are not
calibrated, so without that cap the NMS input depends on noise.

Second table: where the time goes, each row a ratio to its own model's backbone + FPN (the floor any detector on it
pays): backbone + FPN + RPN (proposals), eager `predict`, the fast setting (MODEL.RPN.POST_NMS_TOPK_TEST 300: a third
of the RoI head's work), the deployment form (`OVDetector.fuse`: classifier and frozen norms folded; its backbone
alone too, still as a ratio to the unfolded one) and the ONNX graph (`export_onnx`, 80 classes folded in) on
onnxruntime's CPU provider with the same thread count; then torchvision's model split the same way, the reference for
those ratios.

Third table: RoIAlign alone, torchvision's CPU kernel against ours (`ovd.modeling.poolers.roi_align_cpu`), on
1000 RoIs of 16-76 px on a p2 map (256 x 200 x 304), detectron2's settings (7x7, adaptive sampling, aligned).

    python benchmarks/bench_inference.py [--runs 3] [--threads N] [--no-onnx]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from skimage import data as skdata
from torch import nn
from torchvision.ops import roi_align

from ovd.config import load_config
from ovd.inference import Detector, TextEncoder, Vocabulary
from ovd.modeling.build import build_model
from ovd.modeling.poolers import roi_align_cpu
from ovd.structures import ImageSample
from ovd.utils.timing import median_ms

REPO = Path(__file__).resolve().parents[1]
R50_FPN = "configs/bench/r50_fpn.yaml"


def zero_rpn_deltas(rpn_head: nn.Module) -> None:
    """Proposals = the top-scoring anchors (see the module docstring)."""
    nn.init.zeros_(rpn_head.bbox_pred.weight)
    nn.init.zeros_(rpn_head.bbox_pred.bias)


def torchvision_r50_fpn(num_classes: int) -> nn.Module:
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes + 1, min_size=800, max_size=1333
    ).eval()
    zero_rpn_deltas(tv.rpn.head)
    return tv


def timed(calls: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median ms of each call, interleaved run by run after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for _ in range(runs):
            for k, fn in calls.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def stage_rows(photo: np.ndarray, runs: int, threads: int, onnx: bool) -> list[tuple[str, float, float]]:
    """(row, ms, ratio to its model's backbone + FPN) of our model's stages, the fast setting, the ONNX graph and
    torchvision's model's stages."""
    torch.manual_seed(0)
    models = {}
    settings = {"eager predict": [], "fast (POST_NMS_TOPK_TEST 300)": ["MODEL.RPN.POST_NMS_TOPK_TEST", "300"]}
    for name, overrides in settings.items():
        cfg = load_config(REPO / R50_FPN, overrides)
        model = build_model(cfg, text_embeds=torch.randn(80, 512, generator=torch.Generator().manual_seed(1)))
        if models:  # the same network in every row
            model.load_state_dict(next(iter(models.values())).state_dict())
        zero_rpn_deltas(model.rpn.head)
        models[name] = model.eval()
    det = Detector(models["eager predict"], vocabulary=Vocabulary.of([f"c{i}" for i in range(80)]),
                   text_encoder=TextEncoder(None, unavailable="random vocabulary"), min_size=cfg.INPUT.MIN_SIZE_TEST,
                   max_size=cfg.INPUT.MAX_SIZE_TEST)
    sample = det.to_sample(photo)
    model = models["eager predict"]
    fused = copy.deepcopy(model).fuse()

    def proposals() -> object:
        images, sizes = model.preprocess([sample])
        return model.rpn(model.backbone(images), sizes)

    calls: dict[str, Callable[[], object]] = {
        "backbone + FPN": lambda: model.backbone(model.preprocess([sample])[0]),
        "backbone + FPN + RPN": proposals,
        **{name: (lambda m=m: m.predict([sample])) for name, m in models.items()},
        "backbone + FPN, norms folded": lambda: fused.backbone(fused.preprocess([sample])[0]),
        "eager predict, fused (fuse())": lambda: fused.predict([sample]),
    }
    if onnx:
        import onnxruntime

        from ovd.inference.export import export_onnx

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(det, Path(tmp) / "r50_fpn.onnx")
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {"image": sample.image.numpy(), "orig_size": np.asarray(sample.orig_size, dtype=np.int64)}
        calls["ONNX on onnxruntime"] = lambda: session.run(None, feeds)
    tv = torchvision_r50_fpn(80)
    tv_image = [torch.from_numpy(photo).permute(2, 0, 1).float() / 255]

    def tv_proposals() -> object:
        images, _ = tv.transform(tv_image)
        return tv.rpn(images, tv.backbone(images.tensors))

    calls.update({
        "torchvision backbone + FPN": lambda: tv.backbone(tv.transform(tv_image)[0].tensors),
        "torchvision backbone + FPN + RPN": tv_proposals,
        "torchvision full model": lambda: tv(tv_image),
    })
    ms = timed(calls, runs)
    floor = {k: ms["torchvision backbone + FPN" if k.startswith("torchvision") else "backbone + FPN"] for k in ms}
    return [(k, v, v / floor[k]) for k, v in ms.items()]


def roi_align_rows(runs: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(1, 256, 200, 304, generator=g)
    xy = torch.rand(1000, 2, generator=g) * torch.tensor([1100.0, 700.0])
    rois = torch.cat([torch.zeros(1000, 1), xy, xy + 16 + torch.rand(1000, 2, generator=g) * 60], 1)
    args = (7, 0.25, 0, True)
    return timed({"torchvision.ops.roi_align": lambda: roi_align(feature, rois, *args),
                  "ovd roi_align_cpu": lambda: roi_align_cpu(feature, rois, *args)}, runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-onnx", action="store_true", help="leave out the ONNX row (no export, no onnxruntime)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    photo = np.array(Image.fromarray(skdata.coffee()).resize((1200, 800), Image.BILINEAR))  # H 800, W 1200
    ours_input = [ImageSample(image=torch.from_numpy(photo[:, :, ::-1].copy()).permute(2, 0, 1), image_id=0,
                              orig_size=(800, 1200))]
    tv_input = [torch.from_numpy(photo).permute(2, 0, 1).float() / 255]
    rows = []
    for num_classes in (80, 1203):
        torch.manual_seed(0)
        ours = build_model(load_config(REPO / R50_FPN), text_embeds=torch.randn(num_classes, 512)).eval()
        zero_rpn_deltas(ours.rpn.head)
        tv = torchvision_r50_fpn(num_classes)
        t_ours, t_tv = [], []
        with torch.inference_mode():
            for _ in range(2):  # alternate so drift in machine load hits both
                t_ours.append(median_ms(lambda: ours.predict(ours_input), args.runs))
                t_tv.append(median_ms(lambda: tv(tv_input), args.runs))
        a, b = min(t_ours), min(t_tv)
        rows.append((num_classes, a, b, a / b))
    print(f"CPU, {args.threads} thread(s), 800x1200 input, batch 1, median of {args.runs} runs (best of 2 rounds)")
    print(f"{'classes':>8} {'ours ms':>9} {'torchvision ms':>15} {'ratio':>6}")
    for c, a, b, r in rows:
        print(f"{c:>8} {a:>9.0f} {b:>15.0f} {r:>6.2f}")
    stages = stage_rows(photo, args.runs, args.threads, not args.no_onnx)
    print(f"by stage, 80 classes, median of {args.runs} runs interleaved; ratio to the model's own backbone + FPN")
    print(f"{'':<34} {'ms':>7} {'/ backbone':>11}")
    for k, v, r in stages:
        print(f"{k:<34} {v:>7.0f} {r:>11.2f}")
    align = roi_align_rows(args.runs)
    print("RoIAlign, 1000 RoIs of 16-76 px on p2 (256x200x304), 7x7, adaptive sampling, aligned")
    for k, v in align.items():
        print(f"{k:<34} {v:>7.0f} {v / align['torchvision.ops.roi_align']:>11.2f}")


if __name__ == "__main__":
    main()
