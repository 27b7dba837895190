"""The one place that reads the model config: `build_model` wires the parts that `build_backbone`,
`build_proposal_generator`, `build_box_head` and `build_roi_heads` make, each from its own part of the config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ovd.clip.text import load_text_embeddings
from ovd.config import Config
from ovd.modeling.backbone import Backbone, ResNet, init_weights
from ovd.modeling.classifier import WeightTransferClassifier, ZeroShotClassifier
from ovd.modeling.detector import ImageModel, OVDetector
from ovd.modeling.mask_head import MaskHead
from ovd.modeling.oln import OLNRPN
from ovd.modeling.poolers import ROIPooler
from ovd.modeling.proposal_network import BoxStage, ProposalNetwork
from ovd.modeling.pretrained import check_input_conventions, load_pretrained_resnet, read_pretrained_resnet
from ovd.modeling.roi_heads import BoxPredictor, FCHead, Res5Head, ROIHeads
from ovd.modeling.rpn import RPN, AnchorGenerator

BACKBONES = ("resnet_c4", "resnet_fpn")
META_ARCHITECTURES = ("GeneralizedRCNN", "ProposalNetwork")
PROPOSAL_GENERATORS = ("RPN", "OLN")


def read_class_frequencies(path: str, num_classes: int) -> Tensor:
    """``image_count ** 0.5`` per class, sorted by category id, from a ``[{"id", "image_count"}]`` file."""
    try:
        info = json.loads(Path(path).read_text())
        info = sorted(info, key=lambda r: r["id"])
        counts = torch.tensor([float(r["image_count"]) for r in info])
    except FileNotFoundError:
        raise FileNotFoundError(f"MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH: file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH {path}: expected [{{'id', 'image_count'}}, ...] ({e})") from None
    if len(counts) != num_classes:
        raise ValueError(f"MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH {path} lists {len(counts)} classes, the vocabulary has {num_classes}")
    return counts**0.5


def build_model(
    cfg: Config, *, text_embeds: Tensor | None = None, class_image_counts: Tensor | None = None
) -> OVDetector | ProposalNetwork:
    """The model of ``cfg`` (MODEL.META_ARCHITECTURE), on CPU, with random weights (no checkpoint is loaded here).

    For the detector: text_embeds: Tensor[C, D] training vocabulary; default: read from
    MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH. class_image_counts: Tensor[C] images per class in the training data
    (classes at 0 get no classification loss); default: MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH, or all ones.
    A proposal model ("ProposalNetwork") needs neither.
    """
    m = cfg.MODEL
    if m.META_ARCHITECTURE not in META_ARCHITECTURES:
        raise ValueError(f"MODEL.META_ARCHITECTURE: unknown model {m.META_ARCHITECTURE!r}; expected one of {META_ARCHITECTURES}")
    backbone = build_backbone(cfg)
    rpn = build_proposal_generator(cfg, backbone)
    pooler, box_head = build_box_head(cfg, backbone)
    # the ResNet parts are initialised here, after the RPN and box head exist: the order of the random draws, so a
    # seed gives the weights it always gave
    init_weights(backbone.body)
    if isinstance(box_head, Res5Head):
        init_weights(box_head)
    image = dict(pixel_mean=m.PIXEL_MEAN, pixel_std=m.PIXEL_STD, input_format=cfg.INPUT.FORMAT,
                 size_divisibility=cfg.INPUT.SIZE_DIVISIBILITY)
    model: ImageModel
    if m.META_ARCHITECTURE == "ProposalNetwork":
        box_stage = build_box_stage(cfg, pooler, box_head) if m.PROPOSAL_GENERATOR.REFINE_BOXES else None
        model = ProposalNetwork(backbone=backbone, rpn=rpn, box_stage=box_stage,
                                detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, **image)
    else:
        roi_heads = build_roi_heads(cfg, backbone, pooler, box_head, text_embeds=text_embeds,
                                    class_image_counts=class_image_counts)
        model = OVDetector(backbone=backbone, rpn=rpn, roi_heads=roi_heads, **image)
    if m.BACKBONE.WEIGHTS:
        r = m.RESNETS
        weights = read_pretrained_resnet(m.BACKBONE.WEIGHTS)
        check_input_conventions(weights, stride_in_1x1=r.STRIDE_IN_1X1, input_format=cfg.INPUT.FORMAT,
                                pixel_mean=m.PIXEL_MEAN, pixel_std=m.PIXEL_STD)
        load_pretrained_resnet(weights, body=backbone.body, res5=box_head.res5 if isinstance(box_head, Res5Head) else None)
    backbone.body.freeze(m.BACKBONE.FREEZE_AT)
    return model


def _is_fpn(cfg: Config) -> bool:
    if cfg.MODEL.BACKBONE.NAME not in BACKBONES:
        raise ValueError(f"MODEL.BACKBONE.NAME: unknown backbone {cfg.MODEL.BACKBONE.NAME!r}; expected one of {BACKBONES}")
    return cfg.MODEL.BACKBONE.NAME == "resnet_fpn"


def build_backbone(cfg: Config) -> Backbone:
    """MODEL.BACKBONE / RESNETS / FPN: a ResNet body (to res4 for C4, whose res5 is the box head; to res5 under an
    FPN; `init_weights` gives it the ResNet initialisation); the RPN's and RoI heads' input features are checked
    against its outputs."""
    m = cfg.MODEL
    fpn = _is_fpn(cfg)
    r = m.RESNETS
    body_features = tuple(m.FPN.IN_FEATURES) if fpn else tuple(r.OUT_FEATURES)
    body = ResNet(
        depth=r.DEPTH,
        norm=r.NORM,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
        width_per_group=r.WIDTH_PER_GROUP,
        num_groups=r.NUM_GROUPS,
        stride_in_1x1=r.STRIDE_IN_1X1,
        out_features=body_features,
        last_stage="res5" if fpn else "res4",
    )
    backbone = Backbone(body, m.FPN.OUT_CHANNELS if fpn else 0, body_features)
    missing = [f for f in list(m.RPN.IN_FEATURES) + list(m.ROI_HEADS.IN_FEATURES) if f not in backbone.out_channels]
    if missing:
        raise ValueError(
            f"MODEL.RPN.IN_FEATURES / MODEL.ROI_HEADS.IN_FEATURES name {missing}, which the backbone "
            f"{m.BACKBONE.NAME} does not produce (it gives {list(backbone.out_channels)})"
        )
    return backbone


def build_proposal_generator(cfg: Config, backbone: Backbone) -> RPN:
    """MODEL.PROPOSAL_GENERATOR.NAME over MODEL.ANCHOR_GENERATOR and MODEL.RPN: detectron2's RPN, or OLN's
    centerness RPN (`ovd.modeling.oln`)."""
    m = cfg.MODEL
    name = m.PROPOSAL_GENERATOR.NAME
    if name not in PROPOSAL_GENERATORS:
        raise ValueError(f"MODEL.PROPOSAL_GENERATOR.NAME: unknown proposal generator {name!r}; expected one of "
                         f"{PROPOSAL_GENERATORS}")
    rpn_in = list(m.RPN.IN_FEATURES)
    anchors = AnchorGenerator(
        sizes=m.ANCHOR_GENERATOR.SIZES,
        aspect_ratios=m.ANCHOR_GENERATOR.ASPECT_RATIOS,
        strides=[backbone.strides[f] for f in rpn_in],
        offset=m.ANCHOR_GENERATOR.OFFSET,
    )
    return (OLNRPN if name == "OLN" else RPN)(
        in_features=rpn_in,
        in_channels=backbone.out_channels[rpn_in[0]],
        anchor_generator=anchors,
        pre_nms_topk=(m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.PRE_NMS_TOPK_TEST),
        post_nms_topk=(m.RPN.POST_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TEST),
        nms_thresh=m.RPN.NMS_THRESH,
        min_size=m.RPN.MIN_SIZE,
        batch_size_per_image=m.RPN.BATCH_SIZE_PER_IMAGE,
        positive_fraction=m.RPN.POSITIVE_FRACTION,
        iou_thresholds=tuple(m.RPN.IOU_THRESHOLDS),
        bbox_reg_weights=tuple(m.RPN.BBOX_REG_WEIGHTS),
        smooth_l1_beta=m.RPN.SMOOTH_L1_BETA,
    )


def build_box_head(cfg: Config, backbone: Backbone) -> tuple[ROIPooler, FCHead | Res5Head]:
    """MODEL.ROI_BOX_HEAD's pooler over MODEL.ROI_HEADS.IN_FEATURES and the box head: FPN 2fc, or C4's res5."""
    bh = cfg.MODEL.ROI_BOX_HEAD
    roi_in = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    pooler = ROIPooler(
        output_size=bh.POOLER_RESOLUTION,
        strides=[backbone.strides[f] for f in roi_in],
        sampling_ratio=bh.POOLER_SAMPLING_RATIO,
        aligned=bh.POOLER_ALIGNED,
    )
    if _is_fpn(cfg):
        return pooler, FCHead(in_channels=backbone.out_channels[roi_in[0]], resolution=bh.POOLER_RESOLUTION,
                              num_fc=bh.NUM_FC, fc_dim=bh.FC_DIM)
    body = backbone.body
    return pooler, Res5Head(body.build_stage(3, body.channels["res4"]), body.res2_out_channels * 8)


def build_box_stage(cfg: Config, pooler: ROIPooler, box_head: FCHead | Res5Head) -> BoxStage:
    """The proposal model's class-agnostic RoI stage on `build_box_head`'s parts: rescored by predicted IoU for OLN,
    by object vs background for the RPN; sampling from MODEL.ROI_HEADS, NMS and the per-image cap from the test
    settings."""
    m = cfg.MODEL
    return BoxStage(
        in_features=list(m.ROI_HEADS.IN_FEATURES),
        pooler=pooler,
        box_head=box_head,
        score="iou" if m.PROPOSAL_GENERATOR.NAME == "OLN" else "objectness",
        batch_size_per_image=m.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
        positive_fraction=m.ROI_HEADS.POSITIVE_FRACTION,
        iou_threshold=m.ROI_HEADS.IOU_THRESHOLD,
        proposal_append_gt=m.ROI_HEADS.PROPOSAL_APPEND_GT,
        bbox_reg_weights=tuple(m.ROI_BOX_HEAD.BBOX_REG_WEIGHTS),
        smooth_l1_beta=m.ROI_BOX_HEAD.SMOOTH_L1_BETA,
        nms_thresh=m.ROI_HEADS.NMS_THRESH_TEST,
        detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


def build_roi_heads(
    cfg: Config,
    backbone: Backbone,
    pooler: ROIPooler,
    box_head: FCHead | Res5Head,
    *,
    text_embeds: Tensor | None = None,
    class_image_counts: Tensor | None = None,
) -> ROIHeads:
    """The detector's RoI heads on `build_box_head`'s parts: the open-vocabulary classifier (zero-shot or weight
    transfer) over the training vocabulary, class-agnostic box regression, and the mask head with MODEL.MASK_ON
    (``text_embeds`` and ``class_image_counts`` as in `build_model`)."""
    m = cfg.MODEL
    source = "the given text embeddings are"
    if text_embeds is None:
        if not m.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH:
            raise ValueError("MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH is empty: the classifier needs text embeddings")
        text_embeds = torch.from_numpy(load_text_embeddings(m.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH).embeds)
        source = f"MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH {m.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH} holds"
    if text_embeds.shape[1] != m.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM:
        raise ValueError(f"{source} {text_embeds.shape[1]}-d embeddings, but MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM "
                         f"is {m.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM}")
    num_classes = text_embeds.shape[0]
    if class_image_counts is not None:
        freq = class_image_counts.float() ** 0.5
    elif m.ROI_BOX_HEAD.CAT_FREQ_PATH:
        freq = read_class_frequencies(m.ROI_BOX_HEAD.CAT_FREQ_PATH, num_classes)
    else:
        freq = torch.ones(num_classes)

    bh = m.ROI_BOX_HEAD
    roi_in = list(m.ROI_HEADS.IN_FEATURES)
    classifier_cls = WeightTransferClassifier if bh.WEIGHT_TRANSFER else ZeroShotClassifier
    classifier = classifier_cls(
        in_dim=box_head.out_dim,
        text_embeds=text_embeds,
        temperature=bh.NORM_TEMP,
        bias_init=bh.USE_BIAS if bh.USE_BIAS < 0 else None,
    )
    predictor = BoxPredictor(cls_score=classifier, in_dim=box_head.out_dim, freq_weight=freq)
    mask_pooler = mask_head = None
    if m.MASK_ON:
        mh = m.ROI_MASK_HEAD
        mask_pooler = ROIPooler(
            output_size=mh.POOLER_RESOLUTION,
            strides=[backbone.strides[f] for f in roi_in],
            sampling_ratio=mh.POOLER_SAMPLING_RATIO,
            aligned=mh.POOLER_ALIGNED,
        )
        mask_head = MaskHead(in_channels=backbone.out_channels[roi_in[0]], conv_dim=mh.CONV_DIM, num_conv=mh.NUM_CONV)
    return ROIHeads(
        in_features=roi_in,
        pooler=pooler,
        box_head=box_head,
        box_predictor=predictor,
        batch_size_per_image=m.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
        positive_fraction=m.ROI_HEADS.POSITIVE_FRACTION,
        iou_threshold=m.ROI_HEADS.IOU_THRESHOLD,
        proposal_append_gt=m.ROI_HEADS.PROPOSAL_APPEND_GT,
        use_sigmoid_ce=bh.USE_SIGMOID_CE,
        ignore_zero_cats=bh.IGNORE_ZERO_CATS,
        bbox_reg_weights=tuple(bh.BBOX_REG_WEIGHTS),
        smooth_l1_beta=bh.SMOOTH_L1_BETA,
        score_thresh=m.ROI_HEADS.SCORE_THRESH_TEST,
        nms_thresh=m.ROI_HEADS.NMS_THRESH_TEST,
        topk_candidates=m.ROI_HEADS.TOPK_CANDIDATES_TEST,
        detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        use_fed_loss=bh.USE_FED_LOSS,
        fed_loss_num_classes=bh.FED_LOSS_NUM_CAT,
        mask_pooler=mask_pooler,
        mask_head=mask_head,
        irm_normalize=m.IRM_LOSS_NORMALIZE,
    )
