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


def federated_classes(gt_classes: Tensor, num_classes: int, *, num_sample: int, weight: Tensor) -> Tensor:
    """The federated loss's class mask (Tensor[C] of 0/1): classes present in ``gt_classes`` (Tensor[N], C =
    background) plus classes drawn without replacement with probability ∝ ``weight`` (Tensor[C]) up to ``num_sample``
    (Zhou et al., "Probabilistic two-stage detection"; the original code's get_fed_loss_inds)."""
    appeared = torch.unique(gt_classes)
    if len(appeared) < num_sample:
        prob = weight.float().clone()
        prob = torch.cat([prob, prob.new_zeros(1)])
        prob[appeared] = 0
        more = torch.multinomial(prob, num_sample - len(appeared), replacement=False)
        appeared = torch.cat([appeared, more])
    mask = gt_classes.new_zeros(num_classes + 1, dtype=torch.float32)
    mask[appeared] = 1
    return mask[:num_classes]


def rkd_l1_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD point-wise loss ``mean |ŝ − t̂|`` over all regions and dimensions (DESIGN §2).

    student: Tensor[N, D] region embeddings ``W x``; teacher: Tensor[N, D] CLIP image embeddings; both are
    L2-normalised here.
    """
    if student.shape[0] == 0:
        return student.sum() * 0.0
    return (F.normalize(student, dim=1) - F.normalize(teacher.to(student.dtype), dim=1)).abs().mean()


def rkd_irm_loss(student: Tensor, teacher: Tensor, *, normalize: bool = False) -> Tensor:
    """RKD inter-embedding relationship loss ``‖rownorm(ŝŝᵀ) − rownorm(t̂t̂ᵀ)‖_F²`` over the N regions of the batch
    (each row of the N×N similarity matrices divided by its L1 norm, as the original code does). ``normalize`` divides by the N² entries, which keeps the
    term's scale independent of the batch (off in the paper)."""
    n = student.shape[0]
    if n == 0:
        return student.sum() * 0.0
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher.to(student.dtype), dim=1)
    diff = F.normalize(s @ s.t(), p=1, dim=1) - F.normalize(t @ t.t(), p=1, dim=1)
    loss = (diff**2).sum()
    return loss / (n * n) if normalize else loss


def pis_loss(logits: Tensor, classes: Tensor, image_index: Tensor) -> Tensor:
    """Pseudo image-level supervision (DESIGN §2): for each image label, BCE of its pseudo box's logits against the
    one-hot label, summed over the C + 1 columns, averaged over the image's labels, then over images.

    logits: Tensor[L, C + 1]; classes: Tensor[L] in [0, C); image_index: Tensor[L] which image each label is of.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    target = F.one_hot(classes, logits.shape[1]).to(logits.dtype)
    per_label = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)
    images, inverse = torch.unique(image_index, return_inverse=True)
    per_image = torch.zeros(len(images), dtype=logits.dtype, device=logits.device).index_add_(0, inverse, per_label)
    counts = torch.bincount(inverse, minlength=len(images)).to(logits.dtype)
    return (per_image / counts).mean()
