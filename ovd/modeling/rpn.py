"""Region proposal network with detectron2's numerics, on torchvision's head, matcher, sampler and NMS.

Differences from torchvision's own RPN, kept on purpose so detectron2 checkpoints behave as trained:
anchors are not rounded and are ordered size-major (index = size_idx * len(ratios) + ratio_idx); proposals are
ranked by logit and only empty boxes are dropped; the losses are normalised by ``batch_size_per_image * num_images``
with a configurable smooth-L1 beta (0 = L1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher, _topk_min
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import batched_nms, box_iou

from ovd.modeling.losses import smooth_l1_sum
from ovd.structures import Instances

BBOX_CLAMP = math.log(1000.0 / 16)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int] | tuple[Tensor, Tensor]) -> Tensor:
    """Boxes Tensor[N, 4] (xyxy) clipped to the image (h, w): torchvision's clip_boxes_to_image, but also for a size
    the ONNX tracer follows (0-d tensors read from a dynamic input's shape), which torchvision's would freeze."""
    h, w = image_size
    limits = torch.stack([w, h, w, h]).to(boxes.dtype) if isinstance(h, Tensor) else boxes.new_tensor([w, h, w, h])
    return torch.minimum(boxes.clamp(min=0), limits)


class AnchorGenerator(nn.Module):
    """detectron2's DefaultAnchorGenerator: per level, every (size, ratio) cell anchor at every grid position."""

    def __init__(self, *, sizes: list[list[float]], aspect_ratios: list[list[float]], strides: list[int],
                 offset: float = 0.0) -> None:
        super().__init__()
        if len(sizes) == 1:
            sizes = sizes * len(strides)
        if len(aspect_ratios) == 1:
            aspect_ratios = aspect_ratios * len(strides)
        if not len(sizes) == len(aspect_ratios) == len(strides):
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR: {len(sizes)} size lists and {len(aspect_ratios)} ratio lists for "
                f"{len(strides)} feature levels"
            )
        self.strides, self.offset = list(strides), offset
        self.cell_anchors = [self._cell_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]
        nums = {len(c) for c in self.cell_anchors}
        if len(nums) != 1:
            raise ValueError("MODEL.ANCHOR_GENERATOR: every level needs the same number of anchors per position")
        self.num_anchors = nums.pop()

    @staticmethod
    def _cell_anchors(sizes: list[float], ratios: list[float]) -> Tensor:
        anchors = []
        for size in sizes:
            area = size**2.0
            for ratio in ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(anchors)

    def forward(self, grid_sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Anchors (Tensor[H*W*A, 4] xyxy, ordered (y, x, a)) for each level's (H, W)."""
        out = []
        for (h, w), stride, cell in zip(grid_sizes, self.strides, self.cell_anchors):
            xs = torch.arange(self.offset * stride, w * stride, step=stride, dtype=torch.float32, device=device)
            ys = torch.arange(self.offset * stride, h * stride, step=stride, dtype=torch.float32, device=device)
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            out.append((shifts.view(-1, 1, 4) + cell.to(device).view(1, -1, 4)).reshape(-1, 4))
        return out


class RPN(nn.Module):
    """Objectness and box deltas per anchor; proposals per image sorted by objectness logit."""

    def __init__(
        self,
        *,
        in_features: list[str],
        in_channels: int,
        anchor_generator: AnchorGenerator,
        pre_nms_topk: tuple[int, int] = (12000, 6000),
        post_nms_topk: tuple[int, int] = (2000, 1000),
        nms_thresh: float = 0.7,
        min_size: float = 0.0,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        iou_thresholds: tuple[float, float] = (0.3, 0.7),
        bbox_reg_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
        smooth_l1_beta: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = list(in_features)
        self.anchor_generator = anchor_generator
        self.head = RPNHead(in_channels, anchor_generator.num_anchors)
        self.pre_nms_topk = {True: pre_nms_topk[0], False: pre_nms_topk[1]}
        self.post_nms_topk = {True: post_nms_topk[0], False: post_nms_topk[1]}
        self.nms_thresh, self.min_size = nms_thresh, min_size
        self.box_coder = BoxCoder(bbox_reg_weights, bbox_xform_clip=BBOX_CLAMP)
        self.matcher = Matcher(iou_thresholds[1], iou_thresholds[0], allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.batch_size_per_image = batch_size_per_image
        self.smooth_l1_beta = smooth_l1_beta

    def forward(
        self, features: dict[str, Tensor], image_sizes: list[tuple[int, int]], gt: list[Instances] | None = None
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Proposals (fields ``proposal_boxes`` xyxy, ``objectness_logits``) per image; losses when ``gt`` is given.

        features: name -> Tensor[B, C, H, W]; image_sizes: (h, w) of each image before padding.
        """
        anchors, logits, deltas = self.predictions(features)
        proposals = self.select_proposals(anchors, logits, deltas, image_sizes, training=gt is not None)
        losses = {}
        if gt is not None:
            losses = self.losses(torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1), gt)
        return proposals, losses

    def predictions(self, features: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: anchors Tensor[HWA, 4], objectness logits Tensor[B, HWA], deltas Tensor[B, HWA, 4],
        flattened in the anchors' (y, x, a) order."""
        feats = [features[f] for f in self.in_features]
        logits, deltas = self.head(feats)
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in feats], feats[0].device)
        b = feats[0].shape[0]
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [x.view(b, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in deltas]
        return anchors, logits, deltas

    @torch.no_grad()
    def level_topk(
        self, anchors: list[Tensor], logits: list[Tensor], deltas: list[Tensor], *, training: bool
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per level, the pre-NMS top-k: (anchor indices Tensor[B, k], logits Tensor[B, k], decoded boxes
        Tensor[B, k, 4]), sorted by logit."""
        out = []
        for a, lg, dl in zip(anchors, logits, deltas):
            # _topk_min: min(k, anchors) that the ONNX tracer keeps dynamic (the anchor count follows the image size)
            b, k = lg.shape[0], _topk_min(lg, self.pre_nms_topk[training], 1)
            lg, idx = lg.topk(k, dim=1)
            dl = dl[torch.arange(b, device=lg.device)[:, None], idx]
            boxes = self.box_coder.decode_single(dl.reshape(-1, 4), a[idx.reshape(-1)]).view(b, k, 4)
            out.append((idx, lg, boxes))
        return out

    @torch.no_grad()
    def select_proposals(
        self,
        anchors: list[Tensor],
        logits: list[Tensor],
        deltas: list[Tensor],
        image_sizes: list[tuple[int, int]],
        *,
        training: bool,
    ) -> list[Instances]:
        """detectron2's find_top_rpn_proposals: top-k per level, clip, drop empty boxes, NMS per level, top-k."""
        top = self.level_topk(anchors, logits, deltas, training=training)
        top_logits = torch.cat([t[1] for t in top], 1)
        top_boxes = torch.cat([t[2] for t in top], 1)
        level_ids = torch.cat([torch.full((t[1].shape[1],), i, dtype=torch.int64, device=top_logits.device)
                               for i, t in enumerate(top)])
        out = []
        for i, size in enumerate(image_sizes):
            boxes, scores, lvl = top_boxes[i], top_logits[i], level_ids
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            if training and not valid.all():
                raise FloatingPointError("RPN predicted non-finite boxes or logits; training has diverged")
            # always selected at inference (a few thousand rows): no branch on data for the ONNX tracer to freeze
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
            boxes = clip_boxes(boxes, size)
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = (wh > self.min_size).all(dim=1)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_topk[training]]
            out.append(Instances(size, proposal_boxes=boxes[keep], objectness_logits=scores[keep]))
        return out

    def losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor, gt: list[Instances]) -> dict[str, Tensor]:
        """Objectness BCE and box regression over sampled anchors, normalised as detectron2 does.

        anchors: Tensor[A, 4]; logits: Tensor[B, A]; deltas: Tensor[B, A, 4].
        """
        labels, target_deltas = [], []
        for g in gt:
            if len(g) == 0:
                matched = torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
                lab = torch.zeros(len(anchors), dtype=torch.float32, device=anchors.device)
                tgt = torch.zeros_like(anchors)
            else:
                matched = self.matcher(box_iou(g.gt_boxes, anchors))
                lab = (matched >= 0).to(torch.float32)
                lab[matched == Matcher.BETWEEN_THRESHOLDS] = -1.0
                tgt = self.box_coder.encode_single(g.gt_boxes[matched.clamp(min=0)], anchors)
            labels.append(lab)
            target_deltas.append(tgt)
        labels_t = torch.stack(labels)
        pos, neg = self.sampler([(lab.to(torch.int64)) for lab in labels])
        pos, neg = torch.stack(pos).bool(), torch.stack(neg).bool()
        sampled = pos | neg
        normalizer = self.batch_size_per_image * len(gt)
        loss_cls = F.binary_cross_entropy_with_logits(logits[sampled], labels_t[sampled], reduction="sum")
        loss_loc = smooth_l1_sum(deltas[pos], torch.stack(target_deltas)[pos], self.smooth_l1_beta)
        return {"loss_rpn_cls": loss_cls / normalizer, "loss_rpn_loc": loss_loc / normalizer}

