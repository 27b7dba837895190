"""RoIAlign over one or several feature levels, with detectron2's level assignment and ``aligned`` switch.

torchvision's MultiScaleRoIAlign always uses ``aligned=False`` and infers scales from shapes; detectron2 weights
were trained with ROIAlignV2 (``aligned=True``) and fixed strides, so the level loop is ours, the kernel torchvision's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


class ROIPooler(nn.Module):
    def __init__(
        self,
        *,
        output_size: int,
        strides: list[int],
        sampling_ratio: int = 0,
        aligned: bool = True,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        self.output_size, self.sampling_ratio, self.aligned = output_size, sampling_ratio, aligned
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(round(math.log2(strides[0])))
        self.max_level = int(round(math.log2(strides[-1])))
        self.canonical_box_size, self.canonical_level = canonical_box_size, canonical_level

    def forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Pooled features Tensor[sum(len(b)), C, S, S] for the xyxy ``boxes`` of each image, in order."""
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0
        )
        if len(features) == 1:
            return self._align(features[0], rois, self.scales[0])
        sizes = (rois[:, 3] - rois[:, 1]).mul(rois[:, 4] - rois[:, 2]).sqrt()
        levels = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_box_size + 1e-8))
        levels = levels.clamp(self.min_level, self.max_level).to(torch.int64) - self.min_level
        c = features[0].shape[1]
        out = rois.new_zeros((len(rois), c, self.output_size, self.output_size))
        for lvl, (feat, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == lvl, as_tuple=True)[0]
            if len(idx):
                out[idx] = self._align(feat, rois[idx], scale).to(out.dtype)
        return out

    def _align(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_align(
            feature, rois.to(feature.dtype), self.output_size, scale, self.sampling_ratio, self.aligned
        )
