"""The class-agnostic proposal models: OLN's centerness RPN and IoU-scored RoI stage, the RPN with an
object/background RoI stage, the leak guard, and training + recall evaluation end to end on a tiny world."""

import json
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from ovd.config import load_config
from ovd.engine.trainer import evaluate_only, train
from ovd.modeling.backbone import Backbone
from ovd.modeling.build import build_model
from ovd.modeling.oln import OLNRPN, centerness
from ovd.modeling.poolers import ROIPooler
from ovd.modeling.proposal_network import BoxStage, ProposalNetwork
from ovd.modeling.roi_heads import FCHead
from ovd.modeling.rpn import BBOX_CLAMP, AnchorGenerator
from ovd.structures import ImageSample, Instances


def test_centerness_by_hand():
    points = torch.tensor([[5.0, 5.0], [5.0, 10.0], [-1.0, 5.0], [10.0, 5.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]]).expand(4, 4)
    # l r t b = 5 5 5 15 -> sqrt(1 * 5/15); the centre -> 1; outside -> 0; on the edge -> 0
    assert centerness(points, boxes).tolist() == pytest.approx([math.sqrt(1 / 3), 1.0, 0.0, 0.0])


def _oln_rpn():
    anchors = AnchorGenerator(sizes=[[32.0]], aspect_ratios=[[1.0]], strides=[16])
    return OLNRPN(in_features=["p"], in_channels=8, anchor_generator=anchors, batch_size_per_image=256)


def test_oln_losses_by_hand():
    rpn = _oln_rpn()
    gt_box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    anchors = torch.tensor([
        [12.0, 10.0, 52.0, 50.0],  # IoU 0.905: box regression and centerness
        [30.0, 10.0, 70.0, 50.0],  # IoU 1/3: centerness only (>= 0.3), no box regression (< 0.7)
        [100.0, 100.0, 140.0, 140.0],  # IoU 0: nothing (OLN samples no background)
    ])
    logits = torch.zeros(1, 3)
    deltas = torch.zeros(1, 3, 4)
    losses = rpn.losses(anchors, logits, deltas, [Instances((200, 200), gt_boxes=gt_box)])
    # anchor centres (32, 30) and (50, 30) in the box: centerness sqrt(18/22 * 1) and 0 (on the right edge)
    expected_ctr = (abs(0.5 - math.sqrt(18 / 22)) + abs(0.5 - 0.0)) / 2
    assert losses["loss_rpn_ctr"].item() == pytest.approx(expected_ctr, rel=1e-6)
    target = BoxCoder((1.0, 1.0, 1.0, 1.0), bbox_xform_clip=BBOX_CLAMP).encode_single(gt_box, anchors[:1])
    assert losses["loss_rpn_loc"].item() == pytest.approx(target.abs().sum().item() / 256, rel=1e-6)
    assert set(losses) == {"loss_rpn_ctr", "loss_rpn_loc"}


def test_oln_losses_without_boxes_are_zero_and_differentiable():
    rpn = _oln_rpn()
    logits = torch.zeros(2, 3, requires_grad=True)
    deltas = torch.zeros(2, 3, 4, requires_grad=True)
    anchors = torch.tensor([[0.0, 0, 8, 8], [4.0, 4, 12, 12], [20.0, 20, 40, 40]])
    empty = Instances((64, 64), gt_boxes=torch.zeros(0, 4))
    losses = rpn.losses(anchors, logits, deltas, [empty, empty])
    assert all(v.item() == 0 for v in losses.values())
    sum(losses.values()).backward()


def _box_stage(score):
    torch.manual_seed(0)
    head = FCHead(in_channels=4, resolution=2, num_fc=1, fc_dim=8)
    stage = BoxStage(in_features=["p"], pooler=ROIPooler(output_size=2, strides=[4]), box_head=head, score=score,
                     proposal_append_gt=False, batch_size_per_image=64)
    torch.nn.init.zeros_(stage.score_pred.weight)  # sigmoid 0.5 everywhere
    return stage


@pytest.mark.parametrize("score", ["iou", "objectness"])
def test_box_stage_score_losses_by_hand(score):
    stage = _box_stage(score)
    features = {"p": torch.randn(1, 4, 16, 16)}
    gt = Instances((64, 64), gt_boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [12.0, 8.0, 44.0, 40.0], [30.0, 30.0, 60.0, 60.0]])
    props = Instances((64, 64), proposal_boxes=boxes, objectness_logits=torch.zeros(3))
    losses = stage.losses(features, [props], [gt])
    iou = box_iou(gt.gt_boxes, boxes)[0]
    fg = iou >= 0.5  # the first two
    if score == "iou":  # L1 to the IoU with the matched box, on the foreground only
        expected = (0.5 - iou[fg]).abs().mean().item()
        assert losses["loss_box_iou"].item() == pytest.approx(expected, rel=1e-6)
    else:  # object vs background BCE over all samples at p = 0.5
        assert losses["loss_objectness"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert losses["loss_box_reg"].item() >= 0


def test_oln_box_stage_scores_are_the_geometric_mean():
    stage = _box_stage("iou").eval()
    torch.nn.init.normal_(stage.score_pred.weight)
    features = {"p": torch.randn(1, 4, 16, 16)}
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [40.0, 0.0, 60.0, 20.0]])
    ctr = torch.tensor([1.5, -0.5])
    (out,) = stage.predict(features, [Instances((64, 64), proposal_boxes=boxes, objectness_logits=ctr)])
    _, logits = stage.forward_boxes(features, [boxes])
    expected = (logits.sigmoid() * ctr.sigmoid()).sqrt().sort(descending=True).values
    assert out.scores.tolist() == pytest.approx(expected.tolist(), rel=1e-6)


@pytest.fixture(scope="module")
def oln_config(tiny_world):
    _, overrides = tiny_world
    return load_config("configs/shapes/proposals_oln.yaml", overrides)


def _image(h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    return ImageSample(image=torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=gen), image_id=seed,
                       orig_size=(2 * h, 2 * w))


def test_proposal_network_predicts_sorted_boxes_in_original_pixels_batched_as_alone(oln_config):
    torch.manual_seed(0)
    model = build_model(oln_config)
    assert isinstance(model, ProposalNetwork) and isinstance(model.rpn, OLNRPN) and model.box_stage.score == "iou"
    model.eval()
    samples = [_image(96, 128, 1), _image(96, 128, 2)]  # one size: padding would change the features
    together = model.predict(samples)
    for sample, res in zip(samples, together):
        (alone,) = model.predict([sample])
        assert len(res) == len(alone) <= oln_config.TEST.DETECTIONS_PER_IMAGE
        assert torch.allclose(res.scores, alone.scores, atol=1e-5)
        assert torch.allclose(res.pred_boxes, alone.pred_boxes, atol=1e-3)
        oh, ow = sample.orig_size
        assert res.image_size == (oh, ow)
        assert (res.pred_boxes[:, 2] <= ow).all() and (res.pred_boxes[:, 3] <= oh).all() and (res.pred_boxes >= 0).all()
        assert (res.scores[:-1] >= res.scores[1:]).all()


def test_rpn_proposal_model_without_refinement_uses_the_rpn_scores(tiny_world):
    _, overrides = tiny_world
    cfg = load_config("configs/shapes/proposals_rpn.yaml", overrides + ["MODEL.PROPOSAL_GENERATOR.REFINE_BOXES", "false"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.box_stage is None and type(model.rpn).__name__ == "RPN"
    sample = _image(96, 96, 3)
    (res,) = model.predict([sample])
    images, sizes = model.preprocess([sample])
    proposals, _ = model.rpn(model.backbone(images), sizes)
    n = len(res)
    assert n == min(len(proposals[0]), cfg.TEST.DETECTIONS_PER_IMAGE)
    assert res.scores.tolist() == pytest.approx(proposals[0].objectness_logits[:n].sigmoid().tolist())


def test_unknown_proposal_generator_and_architecture_are_named(tiny_world):
    _, overrides = tiny_world
    with pytest.raises(ValueError, match=r"MODEL.PROPOSAL_GENERATOR.NAME: unknown proposal generator 'OLNN'"):
        build_model(load_config("configs/shapes/proposals_oln.yaml", overrides + ["MODEL.PROPOSAL_GENERATOR.NAME", "OLNN"]))
    with pytest.raises(ValueError, match=r"MODEL.META_ARCHITECTURE: unknown model 'RCNN'"):
        build_model(load_config("configs/shapes/proposals_oln.yaml", overrides + ["MODEL.META_ARCHITECTURE", "RCNN"]))


def test_leak_guard_refuses_novel_boxes_and_names_them(tiny_world, tmp_path):
    _, overrides = tiny_world
    cfg = load_config("configs/shapes/proposals_oln.yaml", overrides + [
        "OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", "[shapes_train_all]", "SOLVER.MAX_ITER", "1"])
    with pytest.raises(ValueError, match=r"dataset shapes_train_all .* novel .*'\w+ \w+' \(id \d+, \d+ boxes\).*"
                                         r"MODEL.PROPOSAL_GENERATOR.ALLOW_NOVEL_BOXES"):
        train(cfg)
    assert not (tmp_path / "model_final.pth").exists()


@pytest.mark.slow
def test_proposal_model_trains_evaluates_recall_and_reloads(tiny_world, tmp_path):
    _, overrides = tiny_world
    cfg = load_config("configs/shapes/proposals_oln.yaml", overrides + [
        "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "0"])
    results = train(cfg)["shapes_val"]
    for k in ("AR@10", "AR@20_base", "AR@20_novel", "AR@100", "recall@0.5_novel"):
        assert 0.0 <= results[k] <= 1.0, k
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_rpn_ctr", "loss_rpn_loc", "loss_box_reg", "loss_box_iou"} <= set(rows[0])
    assert any("shapes_val/AR@20_novel" in r for r in rows)
    written = json.loads((tmp_path / "inference" / "shapes_val" / "proposals.json").read_text())
    assert written and {"image_id", "bbox", "score"} <= set(written[0])
    again = evaluate_only(load_config("configs/shapes/proposals_oln.yaml", overrides + [
        "OUTPUT_DIR", str(tmp_path / "eval"), "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")]))
    assert again["shapes_val"]["AR@100"] == pytest.approx(results["AR@100"], abs=1e-12)
    # the same model with the allowance may train on the novel boxes (a labelled upper bound)
    cfg = load_config("configs/shapes/proposals_oln.yaml", overrides + [
        "OUTPUT_DIR", str(tmp_path / "all"), "SOLVER.MAX_ITER", "2", "DATASETS.TRAIN", "[shapes_train_all]",
        "MODEL.PROPOSAL_GENERATOR.ALLOW_NOVEL_BOXES", "true", "DATASETS.TEST", "[]"])
    train(cfg)
    assert (tmp_path / "all" / "model_final.pth").is_file()


def test_backbone_builder_checks_feature_names(tiny_world):
    _, overrides = tiny_world
    cfg = load_config("configs/shapes/proposals_oln.yaml", overrides + ["MODEL.RPN.IN_FEATURES", "[p9]"])
    with pytest.raises(ValueError, match=r"name \['p9'\], which the backbone resnet_fpn does not produce"):
        build_model(cfg)
    assert Backbone  # the builder returns this type
