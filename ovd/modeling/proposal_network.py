"""Class-agnostic proposal models (DESIGN §2, "where the proposals come from"): trained on base-class boxes only,
they find the regions that RKD distils and PIS mines — without the novel boxes an oracle or MAVL would have seen.

``ProposalNetwork`` = backbone → first stage (`RPN`, or `OLNRPN` whose objectness is centerness) → optionally a
class-agnostic RoI stage (`BoxStage`) that refines each box and rescores it. ``score="objectness"`` is the box head
of a box-supervised detector reduced to object vs background (ViLD's proposals); ``score="iou"`` is OLN's box stage,
which regresses the IoU of the proposal with its object and scores a box by the geometric mean of the first
stage's centerness and that IoU (Kim et al., 2022). No classification of *which* object anywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from ovd.modeling.backbone import Backbone
from ovd.modeling.detector import ImageModel, rescale
from ovd.modeling.losses import box_reg_loss
from ovd.modeling.poolers import ROIPooler
from ovd.modeling.rpn import BBOX_CLAMP, RPN
from ovd.structures import ImageSample, Instances


class BoxStage(nn.Module):
    """Class-agnostic RoI stage: pooled features → box head → box deltas (Tensor[N, 4]) and one score logit."""

    def __init__(
        self,
        *,
        in_features: list[str],
        pooler: ROIPooler,
        box_head: nn.Module,
        score: Literal["objectness", "iou"],
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
        proposal_append_gt: bool = True,
        bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta: float = 0.0,
        nms_thresh: float = 0.7,
        detections_per_image: int = 100,
    ) -> None:
        super().__init__()
        if score not in ("objectness", "iou"):
            raise ValueError(f"BoxStage score must be 'objectness' or 'iou', got {score!r}")
        self.in_features, self.pooler, self.box_head, self.score = list(in_features), pooler, box_head, score
        self.bbox_pred = nn.Linear(box_head.out_dim, 4)
        self.score_pred = nn.Linear(box_head.out_dim, 1)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.normal_(self.score_pred.weight, std=0.01)
        for layer in (self.bbox_pred, self.score_pred):
            nn.init.zeros_(layer.bias)
        self.matcher = Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.proposal_append_gt = proposal_append_gt
        self.box_coder = BoxCoder(bbox_reg_weights, bbox_xform_clip=BBOX_CLAMP)
        self.smooth_l1_beta, self.nms_thresh, self.detections_per_image = smooth_l1_beta, nms_thresh, detections_per_image

    def forward_boxes(self, features: dict[str, Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Box deltas Tensor[sum(len(b)), 4] and score logits Tensor[sum(len(b))] of xyxy ``boxes`` per image."""
        x = self.box_head(self.pooler([features[f] for f in self.in_features], boxes))
        return self.bbox_pred(x), self.score_pred(x)[:, 0]

    def losses(self, features: dict[str, Tensor], proposals: list[Instances], gt: list[Instances]) -> dict[str, Tensor]:
        """``loss_box_reg`` on the foreground samples (detectron2's normalisation) and the score loss: ``loss_box_iou``
        (L1 between sigmoid(logit) and the proposal's IoU with its object, foreground only, OLN) or
        ``loss_objectness`` (BCE of object vs background over all samples)."""
        boxes, gt_boxes, ious, fg = [], [], [], []
        for props, g in zip(proposals, gt):
            b = props.proposal_boxes
            if self.proposal_append_gt:
                b = torch.cat([b, g.gt_boxes.to(b.dtype)])
            if len(g):
                iou = box_iou(g.gt_boxes, b)
                matched = self.matcher(iou)
                best = iou.max(dim=0).values
            else:
                matched = torch.full((len(b),), -1, dtype=torch.int64, device=b.device)
                best = torch.zeros(len(b), device=b.device)
            pos, neg = self.sampler([(matched >= 0).to(torch.int64)])
            idx = torch.nonzero(pos[0].bool() | neg[0].bool(), as_tuple=True)[0]
            boxes.append(b[idx])
            gt_boxes.append(g.gt_boxes[matched[idx].clamp(min=0)] if len(g) else torch.zeros_like(b[idx]))
            ious.append(best[idx])
            fg.append(matched[idx] >= 0)
        deltas, logits = self.forward_boxes(features, boxes)
        boxes_t, fg_t, ious_t = torch.cat(boxes), torch.cat(fg), torch.cat(ious)
        gt_deltas = self.box_coder.encode_single(torch.cat(gt_boxes), boxes_t)
        losses = {"loss_box_reg": box_reg_loss(deltas, gt_deltas, fg_t, beta=self.smooth_l1_beta)}
        if self.score == "iou":
            losses["loss_box_iou"] = (F.l1_loss(logits[fg_t].sigmoid(), ious_t[fg_t].to(logits.dtype))
                                      if fg_t.any() else logits.sum() * 0.0)
        else:
            losses["loss_objectness"] = (F.binary_cross_entropy_with_logits(logits, fg_t.to(logits.dtype))
                                         if len(logits) else logits.sum() * 0.0)
        return losses

    @torch.no_grad()
    def predict(self, features: dict[str, Tensor], proposals: list[Instances]) -> list[Instances]:
        """Refined proposals per image (``pred_boxes`` xyxy in the resized image, ``scores`` in [0, 1], descending)."""
        boxes = [p.proposal_boxes for p in proposals]
        deltas, logits = self.forward_boxes(features, boxes)
        out = []
        for props, d, lg in zip(proposals, deltas.split([len(b) for b in boxes]), logits.split([len(b) for b in boxes])):
            pred = clip_boxes_to_image(self.box_coder.decode_single(d, props.proposal_boxes), props.image_size)
            scores = lg.sigmoid()
            if self.score == "iou":  # OLN: geometric mean of the first stage's centerness and the predicted IoU
                scores = (scores * props.objectness_logits.sigmoid()).sqrt()
            keep = torch.isfinite(pred).all(dim=1) & (pred[:, 2] > pred[:, 0]) & (pred[:, 3] > pred[:, 1])
            pred, scores = pred[keep], scores[keep]
            keep = batched_nms(pred, scores, torch.zeros_like(scores, dtype=torch.int64), self.nms_thresh)
            keep = keep[: self.detections_per_image]
            out.append(Instances(props.image_size, pred_boxes=pred[keep], scores=scores[keep]))
        return out


class ProposalNetwork(ImageModel):
    """A class-agnostic proposal model: ``forward`` returns the unweighted losses of a box-labelled batch (class
    labels are ignored), `predict` the proposals of each image in original-image pixels."""

    def __init__(
        self,
        *,
        backbone: Backbone,
        rpn: RPN,
        box_stage: BoxStage | None = None,
        detections_per_image: int = 100,
        pixel_mean: list[float],
        pixel_std: list[float],
        input_format: str = "BGR",
        size_divisibility: int = 0,
    ) -> None:
        super().__init__(pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format,
                         size_divisibility=size_divisibility)
        self.backbone, self.rpn, self.box_stage = backbone, rpn, box_stage
        self.detections_per_image = detections_per_image

    def forward(self, samples: list[ImageSample]) -> dict[str, Tensor]:
        if any(s.gt is None for s in samples):
            raise ValueError("a proposal model trains on box-labelled images only (every ImageSample.gt set)")
        images, sizes = self.preprocess(samples)
        features = self.backbone(images)
        gt = [s.gt.to(self.device) for s in samples]
        proposals, losses = self.rpn(features, sizes, gt)
        if self.box_stage is not None:
            losses.update(self.box_stage.losses(features, proposals, gt))
        return losses

    @torch.no_grad()
    def predict(self, samples: list[ImageSample]) -> list[Instances]:
        """Proposals per image in original-image pixels: ``pred_boxes`` (Tensor[K, 4] xyxy) and ``scores``
        (Tensor[K] in [0, 1], descending), K ≤ ``detections_per_image``."""
        images, sizes = self.preprocess(samples)
        features = self.backbone(images)
        proposals, _ = self.rpn(features, sizes)
        if self.box_stage is not None:
            results = self.box_stage.predict(features, proposals)
        else:
            results = [Instances(p.image_size, pred_boxes=p.proposal_boxes, scores=p.objectness_logits.sigmoid())
                       for p in proposals]
        return [rescale(r[: self.detections_per_image], s.orig_size) for r, s in zip(results, samples)]
