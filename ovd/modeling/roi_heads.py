"""RoI heads: proposal sampling, the box head (C4 res5 or FPN 2fc), the open-vocabulary box predictor,
the detection losses and post-processing (detectron2's semantics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher, _topk_min
from torchvision.ops import batched_nms, box_iou, nms

from ovd.modeling.classifier import ZeroShotClassifier
from ovd.modeling.losses import (
    box_reg_loss,
    federated_classes,
    pis_loss,
    rkd_irm_loss,
    rkd_l1_loss,
    sigmoid_ce_loss,
    softmax_ce_loss,
)
from ovd.modeling.mask_head import MaskHead, mask_loss, mask_targets
from ovd.modeling.poolers import ROIPooler
from ovd.modeling.rpn import BBOX_CLAMP, clip_boxes
from ovd.structures import Instances


class Res5Head(nn.Module):
    """C4 box head: the res5 stage on pooled res4 features, then the spatial mean (Tensor[N, C5])."""

    def __init__(self, res5: nn.Sequential, out_channels: int) -> None:
        super().__init__()
        self.res5 = res5
        self.out_dim = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.res5(x).mean(dim=(2, 3))


class FCHead(nn.Module):
    """FPN box head: flatten, then ``num_fc`` Linear+ReLU layers (named fc1, fc2, … as in detectron2)."""

    def __init__(self, *, in_channels: int, resolution: int, num_fc: int = 2, fc_dim: int = 1024) -> None:
        super().__init__()
        d = in_channels * resolution * resolution
        for i in range(num_fc):
            fc = nn.Linear(d, fc_dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            self.add_module(f"fc{i + 1}", fc)
            d = fc_dim
        self.num_fc, self.out_dim = num_fc, d

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for i in range(self.num_fc):
            x = F.relu(getattr(self, f"fc{i + 1}")(x))
        return x


class BoxPredictor(nn.Module):
    """Class logits from the zero-shot classifier and class-agnostic box deltas from an MLP (D→D→4).

    ``freq_weight`` (Tensor[C]) holds each training class's image count (to the power 0.5, as the original code);
    classes at zero get no classification loss when ``ignore_zero_cats``.
    """

    def __init__(self, *, cls_score: ZeroShotClassifier, in_dim: int, freq_weight: Tensor) -> None:
        super().__init__()
        self.cls_score = cls_score
        self.bbox_pred = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, 4))
        nn.init.normal_(self.bbox_pred[2].weight, std=0.001)
        nn.init.zeros_(self.bbox_pred[2].bias)
        self.register_buffer("freq_weight", freq_weight.float())

    def forward(self, x: Tensor, text_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits Tensor[N, C + 1] and deltas Tensor[N, 4] for box features Tensor[N, in_dim]; ``text_embeds``
        (Tensor[C', D]) scores another vocabulary than the classifier's own (fused classifiers only)."""
        logits = self.cls_score(x) if text_embeds is None else self.cls_score(x, text_embeds)
        return logits, self.bbox_pred(x)


class ROIHeads(nn.Module):
    def __init__(
        self,
        *,
        in_features: list[str],
        pooler: ROIPooler,
        box_head: nn.Module,
        box_predictor: BoxPredictor,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
        proposal_append_gt: bool = True,
        use_sigmoid_ce: bool = True,
        ignore_zero_cats: bool = True,
        bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta: float = 0.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        topk_candidates: int = 0,
        detections_per_image: int = 100,
        use_fed_loss: bool = False,
        fed_loss_num_classes: int = 50,
        mask_pooler: ROIPooler | None = None,
        mask_head: MaskHead | None = None,
        irm_normalize: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = list(in_features)
        self.pooler, self.box_head, self.box_predictor = pooler, box_head, box_predictor
        self.mask_pooler, self.mask_head = mask_pooler, mask_head
        self.use_fed_loss, self.fed_loss_num_classes = use_fed_loss, fed_loss_num_classes
        self.irm_normalize = irm_normalize
        self.matcher = Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.proposal_append_gt = proposal_append_gt
        self.use_sigmoid_ce, self.ignore_zero_cats = use_sigmoid_ce, ignore_zero_cats
        self.box_coder = BoxCoder(bbox_reg_weights, bbox_xform_clip=BBOX_CLAMP)
        self.smooth_l1_beta = smooth_l1_beta
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.topk_candidates, self.detections_per_image = topk_candidates, detections_per_image

    @property
    def num_classes(self) -> int:
        return self.box_predictor.cls_score.num_classes

    def box_features(self, features: dict[str, Tensor], boxes: list[Tensor]) -> Tensor:
        """Box-head features Tensor[sum(len(b)), D] of xyxy ``boxes`` per image (proposals or any regions)."""
        return self.box_head(self.pooler([features[f] for f in self.in_features], boxes))

    @torch.no_grad()
    def label_and_sample(self, proposals: list[Instances], gt: list[Instances]) -> list[Instances]:
        """Sampled proposals with ``gt_classes`` (C = background) and matched ``gt_boxes`` (detectron2)."""
        c = self.num_classes
        out = []
        for props, g in zip(proposals, gt):
            boxes = props.proposal_boxes
            if self.proposal_append_gt:
                boxes = torch.cat([boxes, g.gt_boxes.to(boxes.dtype)])
            if len(g) == 0:
                matched = torch.full((len(boxes),), -1, dtype=torch.int64, device=boxes.device)
                classes = torch.full((len(boxes),), c, dtype=torch.int64, device=boxes.device)
                matched_boxes = torch.zeros_like(boxes)
            else:
                matched = self.matcher(box_iou(g.gt_boxes, boxes))
                classes = g.gt_classes[matched.clamp(min=0)].clone()
                classes[matched < 0] = c
                matched_boxes = g.gt_boxes[matched.clamp(min=0)]
            pos, neg = self.sampler([(classes != c).to(torch.int64)])
            idx = torch.nonzero(pos[0].bool() | neg[0].bool(), as_tuple=True)[0]
            out.append(Instances(g.image_size, proposal_boxes=boxes[idx], gt_classes=classes[idx],
                                 gt_boxes=matched_boxes[idx], gt_index=matched[idx]))
        return out

    def class_loss_weight(self, gt_classes: Tensor) -> Tensor | None:
        """Per-class weight Tensor[C] of the classification loss: zero for classes without training images
        (IGNORE_ZERO_CATS) and, with the federated loss, for classes outside this batch's sample."""
        freq = self.box_predictor.freq_weight
        weight = (freq > 1e-4).float() if self.ignore_zero_cats else None
        if self.use_fed_loss:
            fed = federated_classes(gt_classes, self.num_classes, num_sample=self.fed_loss_num_classes, weight=freq)
            weight = fed if weight is None else weight * fed
        return weight

    def losses(self, features: dict[str, Tensor], proposals: list[Instances], gt: list[Instances]) -> dict[str, Tensor]:
        """Classification and box-regression losses on the sampled proposals."""
        sampled = self.label_and_sample(proposals, gt)
        x = self.box_features(features, [s.proposal_boxes for s in sampled])
        logits, deltas = self.box_predictor(x)
        gt_classes = torch.cat([s.gt_classes for s in sampled])
        boxes = torch.cat([s.proposal_boxes for s in sampled])
        gt_deltas = self.box_coder.encode_single(torch.cat([s.gt_boxes for s in sampled]), boxes)
        loss_fn = sigmoid_ce_loss if self.use_sigmoid_ce else softmax_ce_loss
        fg = gt_classes < self.num_classes
        losses = {
            "loss_cls": loss_fn(logits, gt_classes, self.class_loss_weight(gt_classes)),
            "loss_box_reg": box_reg_loss(deltas, gt_deltas, fg, beta=self.smooth_l1_beta),
        }
        if self.mask_head is not None:
            losses["loss_mask"] = self.mask_losses(features, sampled, gt)
        return losses

    def region_embeds(self, features: dict[str, Tensor], boxes: list[Tensor]) -> Tensor:
        """Student embeddings ``W x`` (Tensor[sum(len(b)), D], unnormalised) of arbitrary regions: the same RoI path
        and projection as proposals (C4: res5 + mean pool; FPN: the box head), the RKD projection under WT."""
        return self.box_predictor.cls_score.region_embeds(self.box_features(features, boxes))

    def distillation_losses(self, features: dict[str, Tensor], regions: list[Instances]) -> dict[str, Tensor]:
        """RKD (DESIGN §2): point-wise L1 and inter-embedding relationship losses over all regions of the batch."""
        student = self.region_embeds(features, [r.boxes for r in regions])
        teacher = torch.cat([r.embeds for r in regions]).to(student.dtype)
        return {
            "loss_distil_l1": rkd_l1_loss(student, teacher),
            "loss_irm": rkd_irm_loss(student, teacher, normalize=self.irm_normalize),
        }

    def pis_losses(self, features: dict[str, Tensor], image_labels: list[Instances]) -> dict[str, Tensor]:
        """PIS on an image-labelled batch: the pseudo boxes take the place of the proposals (DESIGN §2)."""
        logits, _ = self.box_predictor(self.box_features(features, [il.boxes for il in image_labels]))
        classes = torch.cat([il.classes for il in image_labels])
        image_index = torch.cat([torch.full((len(il),), i, device=classes.device) for i, il in enumerate(image_labels)])
        return {"loss_pms": pis_loss(logits, classes, image_index)}

    def mask_losses(self, features: dict[str, Tensor], sampled: list[Instances], gt: list[Instances]) -> Tensor:
        """Mask BCE on the foreground proposals, against each matched gt mask cut out by the proposal box."""
        c = self.num_classes
        fg = [s[s.gt_classes < c] for s in sampled]
        logits = self.mask_head(self.mask_pooler([features[f] for f in self.in_features], [f.proposal_boxes for f in fg]))
        size = logits.shape[-1]
        targets = [mask_targets(g.gt_masks[f.gt_index], f.proposal_boxes, size) for f, g in zip(fg, gt) if len(f)]
        if not targets:
            return logits.sum() * 0.0
        return mask_loss(logits, torch.cat(targets))

    @torch.no_grad()
    def predict(self, features: dict[str, Tensor], proposals: list[Instances]) -> list[Instances]:
        """Detections per image (``pred_boxes`` xyxy in the resized image, ``scores``, ``pred_classes``)."""
        boxes = [p.proposal_boxes for p in proposals]
        logits, deltas = self.box_predictor(self.box_features(features, boxes))
        sizes = [len(b) for b in boxes]
        out = [self.detections(lg, d, props.proposal_boxes, props.image_size)
               for props, lg, d in zip(proposals, logits.split(sizes), deltas.split(sizes))]
        if self.mask_head is not None:
            feats = [features[f] for f in self.in_features]
            probs = self.mask_head(self.mask_pooler(feats, [r.pred_boxes for r in out])).sigmoid()[:, 0]
            for r, p in zip(out, probs.split([len(r) for r in out])):
                r.pred_mask_probs = p
        return out

    def detections(self, logits: Tensor, deltas: Tensor, proposal_boxes: Tensor,
                   image_size: tuple[int, int] | tuple[Tensor, Tensor]) -> Instances:
        """One image's detections from its box predictions: logits Tensor[N, C + 1], deltas Tensor[N, 4] of
        ``proposal_boxes`` Tensor[N, 4]. Trace-safe: the exported graph (`ovd.inference.export`) runs this too."""
        scores = torch.sigmoid(logits) if self.use_sigmoid_ce else torch.softmax(logits, dim=1)
        return self.postprocess(self.box_coder.decode_single(deltas, proposal_boxes), scores, image_size)

    def postprocess(
        self, boxes: Tensor, scores: Tensor, image_size: tuple[int, int] | tuple[Tensor, Tensor]
    ) -> Instances:
        """detectron2's fast_rcnn_inference for class-agnostic boxes: threshold, (top-k), per-class NMS, cap.

        boxes: Tensor[N, 4]; scores: Tensor[N, C + 1] (background last, dropped). The one post-processing of eager
        inference and of the ONNX graph, so it has no Python branch on data: the tracer would freeze it.
        """
        # one isfinite over the row sums: a per-element check costs more than the NMS at 21k classes
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores.sum(dim=1))
        # the row selection also drops the background column: one copy, which flattening the [:, :-1] view needs anyway
        boxes, scores = clip_boxes(boxes[valid], image_size), scores[valid, :-1]
        num_classes = scores.shape[1]
        flat_scores = scores.reshape(-1)
        if self.topk_candidates:
            # top-k of all (proposal, class) scores, then the threshold: the same candidates as threshold-then-top-k,
            # without materialising every candidate above the threshold; _topk_min keeps k dynamic in a trace
            cand_scores, flat = flat_scores.topk(_topk_min(flat_scores, self.topk_candidates, 0))
            keep = cand_scores > self.score_thresh
            cand_scores, flat = cand_scores[keep], flat[keep]
        else:
            flat = torch.nonzero(flat_scores > self.score_thresh)[:, 0]
            cand_scores = flat_scores[flat]
        rows, classes = flat // num_classes, flat % num_classes
        cand_boxes = boxes[rows]
        keep = class_nms(cand_boxes, cand_scores, classes, self.nms_thresh)[: self.detections_per_image]
        return Instances(image_size, pred_boxes=cand_boxes[keep], scores=cand_scores[keep], pred_classes=classes[keep])


def dense_ranks(classes: Tensor) -> Tensor:
    """Each class id's rank among the distinct ids present (Tensor[K] int64 → Tensor[K] in 0..K'-1), e.g.
    [7, 20999, 7, 3] → [1, 2, 1, 0]. A sort, so its cost follows the candidates, not the vocabulary."""
    sorted_ids, order = classes.sort()
    # 1 where a new id starts in sorted order; the first element always starts one (an empty input stays empty)
    starts = torch.cat([torch.ones_like(sorted_ids[:1]), (sorted_ids[1:] != sorted_ids[:-1]).to(sorted_ids.dtype)])
    return torch.empty_like(classes).scatter(0, order, starts.cumsum(0) - 1)


def class_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """Per-class NMS on the dense ranks of ``classes`` (`dense_ranks`): indices Tensor[K'] of the kept boxes, by
    decreasing score. boxes: Tensor[K, 4] xyxy, clipped to the image (≥ 0); scores: Tensor[K]; classes: Tensor[K].

    torchvision's batched_nms moves each class's boxes by id · (max coordinate + 1) so that classes never overlap
    (up to 1000 boxes on CPU; above, it runs one NMS per class: one NMS over N boxes is O(N²)). With raw ids at 21k
    classes the offsets reach ~3e7, where float32 spacing is 2 px and overlaps change; dense ranks stay below the
    candidate count. Under the ONNX tracer the same offsets are computed without torchvision's early return on no
    box, a branch the tracer would freeze.
    """
    ranks = dense_ranks(classes)
    if not torch.jit.is_tracing():
        return batched_nms(boxes, scores, ranks, iou_threshold)
    # boxes are clipped to ≥ 0, so the appended 0 changes no maximum and keeps max() defined on no box
    max_coordinate = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    offsets = ranks.to(boxes.dtype) * (max_coordinate + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)
