"""RoIAlign over one or several feature levels, with detectron2's level assignment and ``aligned`` switch.

torchvision's MultiScaleRoIAlign always uses ``aligned=False`` and infers scales from shapes; detectron2 weights
were trained with ROIAlignV2 (``aligned=True``) and fixed strides, so the level loop is ours, the kernel torchvision's
on CUDA and in exported graphs. On CPU (float32) both directions are ours: the forward (`roi_align_cpu`) is the same
sampling summed in another order (equal within float rounding), the backward (`roi_align_input_grad`) is
torchvision's gradient bit for bit; each is 2-3x faster than torchvision's CPU kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
        out = rois.new_empty((len(rois), c, self.output_size, self.output_size))  # every RoI has one level
        for lvl, (feat, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == lvl, as_tuple=True)[0]
            if len(idx):
                out[idx] = self._align(feat, rois[idx], scale).to(out.dtype)
        return out

    def _align(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        rois = rois.to(feature.dtype)
        args = (self.output_size, scale, self.sampling_ratio, self.aligned)
        if feature.device.type != "cpu" or feature.dtype != torch.float32 or torch.jit.is_tracing():
            return roi_align(feature, rois, *args)  # exported graphs keep the RoiAlign operator
        if feature.requires_grad:
            return _CPURoIAlign.apply(feature, rois, *args)
        return roi_align_cpu(feature, rois, *args)


class _CPURoIAlign(torch.autograd.Function):
    """`roi_align_cpu` with `roi_align_input_grad` as its backward (CPU, float32)."""

    @staticmethod
    def forward(ctx, feature: Tensor, rois: Tensor, output_size: int, scale: float, sampling_ratio: int,
                aligned: bool) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (scale, sampling_ratio, aligned, tuple(feature.shape))
        return roi_align_cpu(feature, rois, output_size, scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        scale, sampling_ratio, aligned, shape = ctx.args
        return roi_align_input_grad(grad, rois, scale, sampling_ratio, aligned, shape), None, None, None, None, None


def roi_align_input_grad(
    grad: Tensor, rois: Tensor, scale: float, sampling_ratio: int, aligned: bool, shape: tuple[int, int, int, int]
) -> Tensor:
    """The gradient of `roi_align` with respect to its input (Tensor[B, C, H, W] of ``shape``), bit for bit what
    torchvision's CPU kernel computes, for grad Tensor[R, C, PH, PW] of rois Tensor[R, 5] (batch index, xyxy).

    Why ours: torchvision's CPU backward recomputes every sampling point's bilinear weights for every channel (its
    forward computes them once per RoI) and took 41% of a shapes-world training step, 4x its forward. Here each
    sampling point's four weights and pixels are computed once, then the weighted gradients of all channels are
    added with `index_add_` in the kernel's own order (RoI, bin, sampling row, column, corner) and with its own
    arithmetic, ``(g · w) / count``, so every float sum is the same sequence of additions.
    """
    num_rois, channels, ph_size, pw_size = grad.shape
    b, _, h, w = shape
    out = grad.new_zeros(b * h * w, channels)
    if num_rois:
        (y1, bin_h, grid_h), (x1, bin_w, grid_w) = _roi_grid(rois, scale, sampling_ratio, aligned, ph_size, pw_size)
        count = (grid_h * grid_w).clamp(min=1).to(grad.dtype)
        gh, gw = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
        # one entry per (roi, ph, pw, iy, ix) inside that roi's own sampling grid, in the kernel's loop order
        inside = (torch.arange(gh).view(1, gh, 1) < grid_h.view(-1, 1, 1)) & (
            torch.arange(gw).view(1, 1, gw) < grid_w.view(-1, 1, 1))
        idx = torch.nonzero(inside[:, None, None].expand(num_rois, ph_size, pw_size, gh, gw).flatten())[:, 0]
        ix, rest = idx % gw, idx // gw
        iy, bins = rest % gh, rest // gh  # bins: roi * PH * PW + ph * PW + pw
        pw, r = bins % pw_size, bins // pw_size
        ph, r = r % ph_size, r // ph_size
        # the kernel's expressions, evaluated in its order
        y = y1[r] + ph * bin_h[r] + (iy + 0.5) * bin_h[r] / grid_h[r]
        x = x1[r] + pw * bin_w[r] + (ix + 0.5) * bin_w[r] / grid_w[r]
        keep = ~((y < -1.0) | (y > h) | (x < -1.0) | (x > w))  # samples outside the map add nothing
        y, x, bins, r = y[keep], x[keep], bins[keep], r[keep]
        y_low, y_high, ly, hy = _corners(y, h)
        x_low, x_high, lx, hx = _corners(x, w)
        weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], 1).flatten()
        pixels = torch.stack([y_low * w + x_low, y_low * w + x_high, y_high * w + x_low, y_high * w + x_high], 1)
        pixels = pixels.add_((rois[r, 0].long() * (h * w))[:, None]).flatten()
        bins, counts = bins.repeat_interleave(4), count[r].repeat_interleave(4)
        g = grad.permute(0, 2, 3, 1).reshape(num_rois * ph_size * pw_size, channels)
        step = 4096  # entries per add: the [step, C] block stays in cache
        for i in range(0, len(pixels), step):
            s = slice(i, i + step)
            out.index_add_(0, pixels[s], g[bins[s]] * weights[s, None] / counts[s, None])
    return out.view(b, h, w, channels).permute(0, 3, 1, 2)


def roi_align_cpu(feature: Tensor, rois: Tensor, output_size: int, scale: float, sampling_ratio: int,
                  aligned: bool) -> Tensor:
    """torchvision's `roi_align` (Tensor[R, C, S, S] for rois Tensor[R, 5]: batch index, xyxy) on CPU, computed as
    one weighted gather of channels-last rows with `embedding_bag`.

    Bilinear sampling is separable: a bin's weight on pixel (y, x) is (its y-samples' weight on row y) x (its
    x-samples' weight on column x) / samples. So each bin reads every pixel under it once, all channels at a time,
    where torchvision's kernel reads four pixels per sampling point, one channel at a time; the sums differ from
    its only in float rounding order.
    """
    b, c, h, w = feature.shape
    num_rois, s = len(rois), output_size
    if num_rois == 0:
        return feature.new_zeros((0, c, s, s))
    (y1, bin_h, grid_h), (x1, bin_w, grid_w) = _roi_grid(rois, scale, sampling_ratio, aligned, s, s)
    # each axis as a list of (pixel, weight) per (roi, bin index), in that order; n: entries per (roi, bin index)
    y_pixel, y_weight, ny = _axis_weights(y1, bin_h, grid_h, s, h)
    x_pixel, x_weight, nx = _axis_weights(x1, bin_w, grid_w, s, w)
    # bin (r, i, j) takes every pair of row entry of (r, i) and column entry of (r, j)
    y_first, x_first = ny.flatten().cumsum(0) - ny.flatten(), nx.flatten().cumsum(0) - nx.flatten()
    ny_bin, nx_bin = ny[:, :, None].expand(-1, s, s).flatten(), nx[:, None, :].expand(-1, s, s).flatten()
    counts = ny_bin * nx_bin
    offsets = counts.cumsum(0) - counts
    bins = torch.repeat_interleave(torch.arange(len(counts)), counts)
    local = torch.arange(len(bins)) - offsets[bins]
    per_row = nx_bin[bins]
    yi = y_first.view(-1, s, 1).expand(-1, s, s).flatten()[bins] + local // per_row
    xi = x_first.view(-1, 1, s).expand(-1, s, s).flatten()[bins] + local % per_row
    roi = bins // (s * s)
    pixels = y_pixel[yi] * w + x_pixel[xi] + rois[roi, 0].long() * (h * w)
    count = (grid_h * grid_w).clamp(min=1).to(feature.dtype)
    weights = y_weight[yi] * x_weight[xi] / count[roi]
    table = feature.permute(0, 2, 3, 1).reshape(b * h * w, c)
    out = F.embedding_bag(pixels, table, offsets, mode="sum", per_sample_weights=weights)
    return out.view(num_rois, s, s, c).permute(0, 3, 1, 2)


def _roi_grid(rois: Tensor, scale: float, sampling_ratio: int, aligned: bool, ph_size: int, pw_size: int
              ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Per RoI and axis (y, then x), torchvision's kernel's geometry: the start in map pixels, the bin size and
    the samples per bin (``sampling_ratio``, or adaptive: ceil(roi size / output size))."""
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    roi_w, roi_h = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:  # the legacy mode forces a 1-pixel minimum
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    axes = []
    for start, extent, size in ((y1, roi_h, ph_size), (x1, roi_w, pw_size)):
        if sampling_ratio > 0:
            grid = torch.full_like(extent, sampling_ratio, dtype=torch.int64)
        else:
            grid = torch.ceil(extent / size).long()
        axes.append((start, extent / size, grid))
    return axes[0], axes[1]


def _corners(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel's bilinear corners of sampling coordinates inside [-1, size]: (low, high, weight of high,
    weight of low), clamped at the map's edge as the kernel does."""
    coord = coord.clamp(min=0)
    low = coord.long()
    top = low >= size - 1
    high = torch.where(top, size - 1, low + 1)
    low = torch.where(top, size - 1, low)
    coord = torch.where(top, low.to(coord.dtype), coord)
    frac = coord - low
    return low, high, frac, 1.0 - frac


def _axis_weights(start: Tensor, bin_size: Tensor, grid: Tensor, size: int, map_size: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """One axis of every bin's separable sampling weights, summed over the bin's samples: the pixels and weights
    (1-d, ordered by RoI, bin index, pixel) and how many there are per (RoI, bin index) (Tensor[R, S]); samples
    outside [-1, map_size] weigh nothing."""
    g = max(int(grid.max()), 1)
    k = torch.arange(g, dtype=start.dtype)
    p = torch.arange(size, dtype=start.dtype)
    # the kernel's expression, start + p * bin + (k + 0.5) * bin / grid, for every bin p and sample k
    coord = start.view(-1, 1, 1) + p.view(1, -1, 1) * bin_size.view(-1, 1, 1) + (k + 0.5).view(1, 1, -1) * (
        bin_size.view(-1, 1, 1)) / grid.view(-1, 1, 1)
    valid = (k.view(1, 1, -1) < grid.view(-1, 1, 1)) & (coord >= -1.0) & (coord <= map_size)
    low, high, frac, rest = _corners(coord, map_size)
    first = low.masked_fill(~valid, map_size).amin(2).clamp(max=map_size - 1)  # Tensor[R, S]
    lo = (low - first[..., None]).masked_fill(~valid, 0)  # samples that weigh nothing point at the first pixel
    hi = (high - first[..., None]).masked_fill(~valid, 0)
    dense = start.new_zeros((*first.shape, int(hi.max()) + 1))  # weights on pixels first, first + 1, ...
    zero = rest.new_zeros(())  # where, not a product: an empty RoI's coordinates are NaN (0 / 0 samples)
    dense.scatter_add_(2, lo, torch.where(valid, rest, zero)).scatter_add_(2, hi, torch.where(valid, frac, zero))
    nonzero = dense != 0
    pixels = (first[..., None] + torch.arange(dense.shape[2]))[nonzero]
    return pixels, dense[nonzero], nonzero.sum(2)
