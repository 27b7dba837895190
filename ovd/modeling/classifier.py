"""The open-vocabulary classifier: region features scored against text embeddings of class names (DESIGN §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ZeroShotClassifier(nn.Module):
    """``logits = τ · normalize(W x) · Tᵀ`` plus a zero background column (and an optional learnable bias).

    The vocabulary is the buffer ``text_embeds`` (Tensor[C, D], L2-normalised); `set_vocabulary` swaps it.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        text_embeds: Tensor,
        temperature: float = 50.0,
        bias_init: float | None = None,
    ) -> None:
        super().__init__()
        embed_dim = text_embeds.shape[1]
        self.linear = nn.Linear(in_dim, embed_dim)
        self.temperature = temperature
        self.register_buffer("text_embeds", F.normalize(text_embeds.float(), dim=1))
        self.cls_bias = nn.Parameter(torch.tensor([float(bias_init)])) if bias_init is not None else None

    @property
    def num_classes(self) -> int:
        return self.text_embeds.shape[0]

    def set_vocabulary(self, text_embeds: Tensor) -> None:
        """Replace the vocabulary with ``text_embeds`` (Tensor[C', D]); the projection is kept."""
        if text_embeds.ndim != 2 or text_embeds.shape[1] != self.text_embeds.shape[1]:
            raise ValueError(
                f"vocabulary embeddings must be [C, {self.text_embeds.shape[1]}], got {list(text_embeds.shape)}"
            )
        self.text_embeds = F.normalize(text_embeds.float(), dim=1).to(self.text_embeds.device)

    def region_embeds(self, x: Tensor) -> Tensor:
        """Projected region features ``W x`` (Tensor[N, D]), unnormalised; RKD distils these."""
        return self.linear(x)

    def project(self, x: Tensor) -> Tensor:
        """The embedding the classifier scores (Tensor[N, D]); here the same as `region_embeds`."""
        return self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits Tensor[N, C + 1] for region features ``x`` (Tensor[N, in_dim]); the last column is background."""
        z = F.normalize(self.project(x), dim=1)
        logits = self.temperature * z @ self.text_embeds.t().to(z.dtype)
        logits = F.pad(logits, (0, 1))
        if self.cls_bias is not None:
            logits = logits + self.cls_bias
        return logits

    def fuse(self) -> FusedClassifier:
        """The deployment form of this classifier: same logits, no per-call text normalisation, padding or bias add
        (see `FusedClassifier`); it shares the projection's parameters with this one."""
        return FusedClassifier(projection=self.linear, **self._fused_vocabulary())

    def _fused_vocabulary(self) -> dict:
        bias = 0.0 if self.cls_bias is None else float(self.cls_bias.detach())
        return {"text_embeds": self.text_embeds, "temperature": self.temperature, "bias": bias}


class WeightTransferClassifier(ZeroShotClassifier):
    """Weight transfer (DESIGN §2): classification scores ``z = fc4(LeakyReLU(fc3(x))) + W_T x`` with
    ``W_T = fc2(LeakyReLU(fc1(W_rkd)))``, where ``W_rkd`` (``linear``, from the RKD model) is frozen.

    RKD keeps distilling ``W_rkd x`` (`region_embeds`), so distillation trains the backbone and RoI head while the
    classification and PIS losses train the transfer path. ``hidden_dim`` is the original code's fixed 1024.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        text_embeds: Tensor,
        temperature: float = 50.0,
        bias_init: float | None = None,
        hidden_dim: int = 1024,
    ) -> None:
        super().__init__(in_dim=in_dim, text_embeds=text_embeds, temperature=temperature, bias_init=bias_init)
        embed_dim = text_embeds.shape[1]
        self.linear.requires_grad_(False)
        self.fc1 = nn.Linear(in_dim, embed_dim)
        self.fc2 = nn.Linear(embed_dim, in_dim)
        self.fc3 = nn.Linear(in_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, embed_dim)

    def transfer_weight(self) -> Tensor:
        """``W_T`` (Tensor[D, in_dim]) computed from the frozen RKD projection."""
        return self.fc2(F.leaky_relu(self.fc1(self.linear.weight), 0.1))

    def project(self, x: Tensor) -> Tensor:
        return self.fc4(F.leaky_relu(self.fc3(x), 0.1)) + x @ self.transfer_weight().t()

    @torch.no_grad()
    def fuse(self) -> FusedClassifier:
        """As `ZeroShotClassifier.fuse`, with ``W_T`` computed once instead of on every call."""
        projection = TransferProjection(fc3=self.fc3, fc4=self.fc4, transfer_weight=self.transfer_weight())
        return FusedClassifier(projection=projection, **self._fused_vocabulary())


class TransferProjection(nn.Module):
    """The weight-transfer projection ``z = fc4(LeakyReLU(fc3(x))) + W_T x`` with ``W_T`` (Tensor[D, in_dim]) fixed."""

    def __init__(self, *, fc3: nn.Linear, fc4: nn.Linear, transfer_weight: Tensor) -> None:
        super().__init__()
        self.fc3, self.fc4 = fc3, fc4
        self.register_buffer("transfer_weight", transfer_weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.fc4(F.leaky_relu(self.fc3(x), 0.1)) + F.linear(x, self.transfer_weight)


class FusedClassifier(nn.Module):
    """A trained classifier folded for deployment (YOLO-World's ``fuse()``): ``logits = normalize(P x) · Aᵀ + b``.

    ``P`` is the classifier's projection (weight transfer precomputed), ``A`` (Tensor[C + 1, D]) is τ·T with a zero
    background row and ``b`` (Tensor[C + 1]) the logit bias, so scoring is one matrix product: the same logits as the
    unfused classifier, without the text normalisation, background padding and bias add on every call. Inference only
    (no `region_embeds` for RKD). `set_vocabulary` refolds new text embeddings.
    """

    def __init__(self, *, projection: nn.Module, text_embeds: Tensor, temperature: float, bias: float = 0.0) -> None:
        super().__init__()
        self.projection = projection
        self.temperature, self.bias = temperature, bias
        num_classes, embed_dim = text_embeds.shape
        self.register_buffer("logit_weight", text_embeds.new_zeros((num_classes + 1, embed_dim), dtype=torch.float32))
        self.register_buffer("logit_bias", text_embeds.new_zeros(num_classes + 1, dtype=torch.float32))
        self.set_vocabulary(text_embeds)

    @property
    def num_classes(self) -> int:
        return self.logit_weight.shape[0] - 1

    @property
    def text_embeds(self) -> Tensor:
        """The vocabulary (Tensor[C, D], L2-normalised), recovered from the folded weight."""
        return self.logit_weight[:-1] / self.temperature

    def set_vocabulary(self, text_embeds: Tensor) -> None:
        """Fold ``text_embeds`` (Tensor[C', D]) in place of the current vocabulary."""
        embed_dim = self.logit_weight.shape[1]
        if text_embeds.ndim != 2 or text_embeds.shape[1] != embed_dim:
            raise ValueError(f"vocabulary embeddings must be [C, {embed_dim}], got {list(text_embeds.shape)}")
        device = self.logit_weight.device
        weight, bias = self.fold(text_embeds.float().to(device))
        self.logit_weight, self.logit_bias = weight, bias

    def fold(self, text_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """The logit weight Tensor[C + 1, D] (τ·T, zero background row) and bias Tensor[C + 1] of a vocabulary
        (Tensor[C, D]; normalised here). Trace-safe: a graph whose vocabulary is an input folds it on each run."""
        weight = F.pad(self.temperature * F.normalize(text_embeds, dim=1), (0, 0, 0, 1))
        return weight, torch.full_like(weight[:, 0], self.bias)

    def project(self, x: Tensor) -> Tensor:
        """The embedding scored (Tensor[N, D]), as the unfused classifier's `project`."""
        return self.projection(x)

    def fuse(self) -> FusedClassifier:
        return self

    def forward(self, x: Tensor, text_embeds: Tensor | None = None) -> Tensor:
        """Logits Tensor[N, C + 1] for region features ``x`` (Tensor[N, in_dim]); the last column is background.
        ``text_embeds`` (Tensor[C', D]): score against this vocabulary instead of the folded one."""
        weight, bias = (self.logit_weight, self.logit_bias) if text_embeds is None else self.fold(text_embeds)
        z = F.normalize(self.projection(x), dim=1)
        return F.linear(z, weight.to(z.dtype), bias.to(z.dtype))
