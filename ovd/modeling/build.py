"""`build_model`: the one place that reads the model config and wires the detector's parts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ovd.clip.text import load_text_embeddings
from ovd.config import Config
from ovd.modeling.backbone import Backbone, ResNet, init_weights
from ovd.modeling.classifier import WeightTransferClassifier, ZeroShotClassifier
from ovd.modeling.detector import OVDetector
from ovd.modeling.mask_head import MaskHead
from ovd.modeling.poolers import ROIPooler
from ovd.modeling.pretrained import check_input_conventions, load_pretrained_resnet, read_pretrained_resnet
from ovd.modeling.roi_heads import BoxPredictor, FCHead, Res5Head, ROIHeads
from ovd.modeling.rpn import RPN, AnchorGenerator

BACKBONES = ("resnet_c4", "resnet_fpn")


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


def build_model(cfg: Config, *, text_embeds: Tensor | None = None, class_image_counts: Tensor | None = None) -> OVDetector:
    """The detector of ``cfg``, on CPU, with random weights (no checkpoint is loaded here).

    text_embeds: Tensor[C, D] training vocabulary; default: read from MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH.
    class_image_counts: Tensor[C] images per class in the training data (classes at 0 get no classification
    loss); default: MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH, or all ones.
    """
    m = cfg.MODEL
    if m.BACKBONE.NAME not in BACKBONES:
        raise ValueError(f"MODEL.BACKBONE.NAME: unknown backbone {m.BACKBONE.NAME!r}; expected one of {BACKBONES}")
    fpn = m.BACKBONE.NAME == "resnet_fpn"
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

    r = m.RESNETS
    body_features = tuple(cfg.MODEL.FPN.IN_FEATURES) if fpn else tuple(r.OUT_FEATURES)
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
    backbone = Backbone(body, cfg.MODEL.FPN.OUT_CHANNELS if fpn else 0, body_features)

    rpn_in = list(m.RPN.IN_FEATURES)
    missing = [f for f in rpn_in + list(m.ROI_HEADS.IN_FEATURES) if f not in backbone.out_channels]
    if missing:
        raise ValueError(
            f"MODEL.RPN.IN_FEATURES / MODEL.ROI_HEADS.IN_FEATURES name {missing}, which the backbone "
            f"{m.BACKBONE.NAME} does not produce (it gives {list(backbone.out_channels)})"
        )
    anchors = AnchorGenerator(
        sizes=m.ANCHOR_GENERATOR.SIZES,
        aspect_ratios=m.ANCHOR_GENERATOR.ASPECT_RATIOS,
        strides=[backbone.strides[f] for f in rpn_in],
        offset=m.ANCHOR_GENERATOR.OFFSET,
    )
    rpn = RPN(
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

    bh = m.ROI_BOX_HEAD
    roi_in = list(m.ROI_HEADS.IN_FEATURES)
    pooler = ROIPooler(
        output_size=bh.POOLER_RESOLUTION,
        strides=[backbone.strides[f] for f in roi_in],
        sampling_ratio=bh.POOLER_SAMPLING_RATIO,
        aligned=bh.POOLER_ALIGNED,
    )
    if fpn:
        box_head = FCHead(
            in_channels=backbone.out_channels[roi_in[0]], resolution=bh.POOLER_RESOLUTION, num_fc=bh.NUM_FC, fc_dim=bh.FC_DIM
        )
    else:
        res5 = body.build_stage(3, body.channels["res4"])
        box_head = Res5Head(res5, body.res2_out_channels * 8)
    init_weights(backbone.body)
    if not fpn:
        init_weights(box_head)
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
    roi_heads = ROIHeads(
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
    model = OVDetector(
        backbone=backbone,
        rpn=rpn,
        roi_heads=roi_heads,
        pixel_mean=m.PIXEL_MEAN,
        pixel_std=m.PIXEL_STD,
        input_format=cfg.INPUT.FORMAT,
        size_divisibility=cfg.INPUT.SIZE_DIVISIBILITY,
    )
    if m.BACKBONE.WEIGHTS:
        weights = read_pretrained_resnet(m.BACKBONE.WEIGHTS)
        check_input_conventions(weights, stride_in_1x1=r.STRIDE_IN_1X1, input_format=cfg.INPUT.FORMAT,
                                pixel_mean=m.PIXEL_MEAN, pixel_std=m.PIXEL_STD)
        load_pretrained_resnet(weights, body=body, res5=None if fpn else box_head.res5)
    body.freeze(m.BACKBONE.FREEZE_AT)
    return model
