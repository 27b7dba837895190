"""ms per image of our R50-FPN detector against torchvision's fasterrcnn_resnet50_fpn.

Both with random weights, the same 800x1200 input (a real photo from scikit-image, upscaled), batch 1, CPU, the same
thread count, run alternately in one process; median over the timed runs. Vocabularies of 80 and 1203 classes
(torchvision's model gets num_classes = C + 1). Our detector keeps the top 1000 (proposal, class) candidates before
NMS (MODEL.ROI_HEADS.TOPK_CANDIDATES_TEST), as a deployment config would; with random weights the sigmoid scores
are not calibrated, so without that cap the NMS input depends on noise.

    python benchmarks/bench_inference.py [--runs 3] [--threads N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from skimage import data as skdata

from ovd.config import load_config
from ovd.modeling.build import build_model
from ovd.structures import ImageSample
from ovd.utils.timing import median_ms

REPO = Path(__file__).resolve().parents[1]
R50_FPN = "configs/bench/r50_fpn.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    photo = np.array(Image.fromarray(skdata.coffee()).resize((1200, 800), Image.BILINEAR))  # H 800, W 1200
    ours_input = [ImageSample(image=torch.from_numpy(photo[:, :, ::-1].copy()).permute(2, 0, 1), image_id=0,
                              orig_size=(800, 1200))]
    tv_input = [torch.from_numpy(photo).permute(2, 0, 1).float() / 255]
    rows = []
    for num_classes in (80, 1203):
        torch.manual_seed(0)
        cfg = load_config(REPO / R50_FPN)
        ours = build_model(cfg, text_embeds=torch.randn(num_classes, 512)).eval()
        tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=num_classes + 1, min_size=800, max_size=1333
        ).eval()
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


if __name__ == "__main__":
    main()
