"""OLN's first stage (Kim et al., "Learning Open-World Object Proposals without Learning to Classify", RA-L 2022):
an RPN whose objectness is the *localisation quality* of each anchor, never a classification.

A classifier of object vs background learns that everything unboxed is background, novel objects included; a
regressor of how well an anchor sits on *some* object does not, which is why OLN finds unseen classes far better.
Following the paper: the objectness branch regresses the centerness (FCOS) of the anchor's centre inside its
matched box, trained with L1 on anchors overlapping a box (IoU > 0.3) only — no negatives are sampled; the box
branch is the RPN's. Proposals are ranked by the predicted centerness. Ours differs from the paper in one place:
box regression keeps our RPN's deltas and L1 loss instead of OLN's distance (tblr) coding with an IoU loss.
The RoI stage that rescores by predicted IoU is `ovd.modeling.proposal_network.BoxStage` with ``score="iou"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import box_iou

from ovd.modeling.losses import smooth_l1_sum
from ovd.modeling.rpn import RPN
from ovd.structures import Instances


def centerness(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centerness of ``points`` (Tensor[N, 2], x y) in ``boxes`` (Tensor[N, 4] xyxy):
    ``sqrt(min(l, r) / max(l, r) · min(t, b) / max(t, b))`` in [0, 1]; 0 for a point outside its box."""
    left, top = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    right, bottom = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    lr = torch.stack([left, right], 1).clamp(min=0)
    tb = torch.stack([top, bottom], 1).clamp(min=0)
    ratio = lr.min(1).values / lr.max(1).values.clamp(min=1e-6) * tb.min(1).values / tb.max(1).values.clamp(min=1e-6)
    return ratio.sqrt()


class OLNRPN(RPN):
    """The RPN with centerness in place of objectness classification: same head, anchors, box coder, proposal
    selection (by the centerness logit) and box-regression loss; the objectness loss is ``loss_rpn_ctr``."""

    def __init__(self, *, centerness_iou_threshold: float = 0.3, centerness_batch_size_per_image: int = 256,
                 **rpn_kwargs) -> None:
        super().__init__(**rpn_kwargs)
        # anchors with IoU >= 0.3 learn centerness, those below 0.1 nothing, none are sampled as background (paper)
        self.centerness_matcher = Matcher(centerness_iou_threshold, 0.1, allow_low_quality_matches=False)
        self.centerness_sampler = BalancedPositiveNegativeSampler(centerness_batch_size_per_image, 1.0)

    def losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor, gt: list[Instances]) -> dict[str, Tensor]:
        """``loss_rpn_ctr``: L1 between sigmoid(logit) and the anchor centre's centerness in its matched box, mean
        over the sampled anchors; ``loss_rpn_loc``: the RPN's box regression (positives at IoU 0.7, detectron2's
        normalisation).

        anchors: Tensor[A, 4]; logits: Tensor[B, A]; deltas: Tensor[B, A, 4].
        """
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        ctr_pred, ctr_target, loc_labels, target_deltas = [], [], [], []
        for i, g in enumerate(gt):
            if len(g) == 0:
                loc_labels.append(torch.zeros(len(anchors), dtype=torch.int64, device=anchors.device))
                target_deltas.append(torch.zeros_like(anchors))
                continue
            iou = box_iou(g.gt_boxes, anchors)
            matched = self.matcher(iou)
            lab = (matched >= 0).to(torch.int64)
            lab[matched == Matcher.BETWEEN_THRESHOLDS] = -1
            loc_labels.append(lab)
            target_deltas.append(self.box_coder.encode_single(g.gt_boxes[matched.clamp(min=0)], anchors))
            ctr_matched = self.centerness_matcher(iou)
            (pos,), _ = self.centerness_sampler([torch.where(ctr_matched >= 0, 1, -1)])
            idx = torch.nonzero(pos.bool(), as_tuple=True)[0]
            ctr_pred.append(logits[i, idx])
            ctr_target.append(centerness(centres[idx], g.gt_boxes[ctr_matched[idx]]))
        pos, _ = self.sampler(loc_labels)
        pos = torch.stack(pos).bool()
        normalizer = self.batch_size_per_image * len(gt)
        loss_loc = smooth_l1_sum(deltas[pos], torch.stack(target_deltas)[pos], self.smooth_l1_beta) / normalizer
        if ctr_pred and sum(len(p) for p in ctr_pred):
            loss_ctr = F.l1_loss(torch.cat(ctr_pred).sigmoid(), torch.cat(ctr_target).to(logits.dtype))
        else:
            loss_ctr = logits.sum() * 0.0
        return {"loss_rpn_ctr": loss_ctr, "loss_rpn_loc": loss_loc}
