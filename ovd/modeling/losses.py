"""Loss functions of the detector: pure, unweighted (the trainer applies the weights, DESIGN §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_ce_loss(logits: Tensor, gt_classes: Tensor, class_weight: Tensor | None = None) -> Tensor:
    """Binary cross-entropy over the C foreground columns, summed and divided by the number of proposals.

    logits: Tensor[N, C + 1] (last column background, dropped); gt_classes: Tensor[N] in [0, C], C = background
    (an all-zero target row); class_weight: Tensor[C] per-column weight (0 for classes without training boxes).
    """
    n, c = logits.shape[0], logits.shape[1] - 1
    if n == 0:
        return logits.sum() * 0.0
    target = F.one_hot(gt_classes, c + 1)[:, :c].to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits[:, :c], target, reduction="none")
    if class_weight is not None:
        loss = loss * class_weight.to(loss.dtype)[None, :]
    return loss.sum() / n


def softmax_ce_loss(logits: Tensor, gt_classes: Tensor, class_weight: Tensor | None = None) -> Tensor:
    """Cross-entropy over the C + 1 columns, mean over proposals; ``class_weight`` (Tensor[C]) masks columns
    of classes without training boxes out of the softmax (their logits set to -inf), background always kept."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if class_weight is not None:
        keep = torch.cat([class_weight > 0, class_weight.new_ones(1, dtype=torch.bool)])
        logits = logits.masked_fill(~keep[None, :], float("-inf"))
    return F.cross_entropy(logits, gt_classes, reduction="mean")


def smooth_l1_sum(input: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1; beta < 1e-5 is plain L1 (detectron2's convention)."""
    if beta < 1e-5:
        return (input - target).abs().sum()
    return F.smooth_l1_loss(input, target, beta=beta, reduction="sum")


def box_reg_loss(pred_deltas: Tensor, gt_deltas: Tensor, fg_mask: Tensor, *, beta: float = 0.0) -> Tensor:
    """Class-agnostic smooth-L1 (beta 0: L1) over foreground proposals, divided by all proposals (detectron2).

    pred_deltas, gt_deltas: Tensor[N, 4]; fg_mask: Tensor[N] bool.
    """
    n = max(pred_deltas.shape[0], 1)
    return smooth_l1_sum(pred_deltas[fg_mask], gt_deltas[fg_mask], beta) / n
