"""Distillation fidelity (beyond the paper): does the student's region embedding agree with the CLIP teacher's?"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def distillation_fidelity(
    student: Tensor, teacher: Tensor, text_embeds: Tensor, region_classes: Tensor, novel: Tensor
) -> dict[str, float]:
    """Mean student–teacher cosine and zero-shot agreement, for regions of base and of novel classes.

    student, teacher: Tensor[N, D] embeddings of the same N regions; text_embeds: Tensor[C, D] of the vocabulary;
    region_classes: Tensor[N] class index of the object each region covers (-1: none, such regions are ignored);
    novel: Tensor[C] bool. Agreement = how often argmax over the vocabulary is the same class for both.
    Returns ``cosine_{base,novel}``, ``agreement_{base,novel}``, ``regions_{base,novel}`` (NaN where no region).
    """
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    text = F.normalize(text_embeds.float(), dim=1)
    cosine = (s * t).sum(dim=1)
    agree = ((s @ text.t()).argmax(dim=1) == (t @ text.t()).argmax(dim=1)).float()
    out: dict[str, float] = {}
    covered = region_classes >= 0
    is_novel = torch.zeros_like(covered)
    is_novel[covered] = novel[region_classes[covered]]
    for split, mask in (("base", covered & ~is_novel), ("novel", covered & is_novel)):
        n = int(mask.sum())
        out[f"cosine_{split}"] = cosine[mask].mean().item() if n else float("nan")
        out[f"agreement_{split}"] = agree[mask].mean().item() if n else float("nan")
        out[f"regions_{split}"] = float(n)
    return out
