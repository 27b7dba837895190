"""The class-agnostic mask head of Mask R-CNN (LVIS), its loss, and detectron2's mask pasting."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from torchvision.ops import roi_align

from ovd.structures import PolygonMasks


class MaskHead(nn.Module):
    """``num_conv`` 3x3 convs (mask_fcn1…), a 2x deconvolution, a 1x1 predictor: Tensor[N, C, S, S] → logits
    Tensor[N, 1, 2S, 2S] (one class-agnostic mask per region)."""

    def __init__(self, *, in_channels: int, conv_dim: int = 256, num_conv: int = 4) -> None:
        super().__init__()
        c = in_channels
        for i in range(num_conv):
            conv = nn.Conv2d(c, conv_dim, 3, padding=1)
            self.add_module(f"mask_fcn{i + 1}", conv)
            c = conv_dim
        self.num_conv = num_conv
        self.deconv = nn.ConvTranspose2d(c, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1, 1)
        for m in [getattr(self, f"mask_fcn{i + 1}") for i in range(num_conv)] + [self.deconv]:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.num_conv):
            x = F.relu(getattr(self, f"mask_fcn{i + 1}")(x))
        return self.predictor(F.relu(self.deconv(x)))


def mask_targets(gt_masks: Tensor | PolygonMasks, boxes: Tensor, size: int) -> Tensor:
    """Binary targets Tensor[N, size, size]: each gt mask cut out by its matched proposal box (Tensor[N, 4]).

    Bitmasks (Tensor[N, H, W]) go through aligned RoIAlign thresholded at 0.5 (detectron2's
    ``BitMasks.crop_and_resize``); polygons (`PolygonMasks`) are moved into the box's frame, scaled to
    ``size``×``size`` and rasterised by pycocotools (detectron2's ``rasterize_polygons_within_box``).
    """
    if isinstance(gt_masks, PolygonMasks):
        out = [_rasterize_in_box(p, b, size) for p, b in zip(gt_masks.polygons, boxes.detach().cpu().double().numpy())]
        if not out:
            return torch.zeros((0, size, size), dtype=torch.bool, device=boxes.device)
        return torch.from_numpy(np.stack(out)).to(boxes.device)
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
    out = roi_align(gt_masks[:, None].to(boxes.dtype), rois, (size, size), 1.0, 0, aligned=True)
    return out[:, 0] >= 0.5


def _rasterize_in_box(polygons: list[np.ndarray], box: np.ndarray, size: int) -> np.ndarray:
    if not polygons:
        return np.zeros((size, size), dtype=bool)
    x0, y0, x1, y1 = box
    sx, sy = size / max(x1 - x0, 0.1), size / max(y1 - y0, 0.1)
    moved = []
    for p in polygons:
        q = np.array(p, dtype=np.float64)
        q[0::2] = (q[0::2] - x0) * sx
        q[1::2] = (q[1::2] - y0) * sy
        moved.append(q.tolist())
    rle = mask_utils.merge(mask_utils.frPyObjects(moved, size, size))
    return mask_utils.decode(rle).astype(bool)


def mask_loss(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of class-agnostic mask logits Tensor[N, 1, M, M] against Tensor[N, M, M]."""
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(mask_logits[:, 0], targets.to(mask_logits.dtype), reduction="mean")


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Paste soft masks Tensor[N, M, M] (probabilities) into their boxes Tensor[N, 4] on an image of
    ``image_size`` (h, w) → bool Tensor[N, h, w], sampling each pixel centre bilinearly (detectron2's algorithm,
    which differs from torchvision's expand-and-resize pasting)."""
    h, w = image_size
    out = torch.zeros((len(masks), h, w), dtype=torch.bool, device=masks.device)
    for i in range(len(masks)):
        # one mask at a time keeps memory at one image's worth, as detectron2 does on CPU
        box = boxes[i]
        x0i, y0i = (box[:2].floor() - 1).clamp(min=0).to(torch.int64).tolist()
        x1i = int(min(float(box[2].ceil()) + 1, w))
        y1i = int(min(float(box[3].ceil()) + 1, h))
        ys = torch.arange(y0i, y1i, device=masks.device, dtype=torch.float32) + 0.5
        xs = torch.arange(x0i, x1i, device=masks.device, dtype=torch.float32) + 0.5
        ys = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        xs = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], dim=2)
        pasted = F.grid_sample(masks[i][None, None].float(), grid[None].to(torch.float32), align_corners=False)
        out[i, y0i:y1i, x0i:x1i] = pasted[0, 0] >= threshold
    return out
