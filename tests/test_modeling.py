import math

import numpy as np
import pytest
import torch

from ovd.config import load_config
from ovd.modeling.build import build_model
from ovd.modeling.classifier import ZeroShotClassifier
from ovd.modeling.detector import rescale
from ovd.modeling.losses import box_reg_loss, sigmoid_ce_loss, softmax_ce_loss
from ovd.modeling.rpn import AnchorGenerator
from ovd.structures import ImageSample, Instances

from conftest import TINY_OVERRIDES


def bce(x, t):
    return math.log1p(math.exp(-x)) if t else math.log1p(math.exp(x))


def test_classifier_logits_by_hand():
    clf = ZeroShotClassifier(in_dim=2, text_embeds=torch.tensor([[2.0, 0.0], [0.0, 3.0]]), temperature=50.0)
    with torch.no_grad():
        clf.linear.weight.copy_(torch.eye(2))
        clf.linear.bias.zero_()
    logits = clf(torch.tensor([[3.0, 4.0]]))
    # normalize([3, 4]) = [0.6, 0.8]; text embeddings are normalised; background column is 0
    assert torch.allclose(logits, torch.tensor([[30.0, 40.0, 0.0]]))
    biased = ZeroShotClassifier(in_dim=2, text_embeds=torch.eye(2), temperature=50.0, bias_init=-4.6)
    with torch.no_grad():
        biased.linear.weight.copy_(torch.eye(2))
        biased.linear.bias.zero_()
    assert torch.allclose(biased(torch.tensor([[3.0, 4.0]])), torch.tensor([[25.4, 35.4, -4.6]]))


def test_set_vocabulary_swaps_classes_and_checks_dim():
    clf = ZeroShotClassifier(in_dim=4, text_embeds=torch.randn(3, 8))
    clf.set_vocabulary(torch.randn(7, 8))
    assert clf(torch.randn(5, 4)).shape == (5, 8)
    with pytest.raises(ValueError, match=r"\[C, 8\]"):
        clf.set_vocabulary(torch.randn(7, 9))


def test_sigmoid_ce_by_hand():
    logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]])
    gt = torch.tensor([1, 2])  # second proposal is background (C = 2)
    expected = (bce(0, 0) + bce(2, 1) + bce(1, 0) + bce(-1, 0)) / 2
    assert sigmoid_ce_loss(logits, gt).item() == pytest.approx(expected, rel=1e-6)
    # class 0 has no training boxes: its column carries no loss
    weighted = sigmoid_ce_loss(logits, gt, torch.tensor([0.0, 1.0])).item()
    assert weighted == pytest.approx((bce(2, 1) + bce(-1, 0)) / 2, rel=1e-6)


def test_softmax_ce_by_hand_and_masking():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    lse = math.log(math.exp(1) + math.exp(2) + 1)
    assert softmax_ce_loss(logits, torch.tensor([1])).item() == pytest.approx(lse - 2, rel=1e-6)
    masked = softmax_ce_loss(logits, torch.tensor([1]), torch.tensor([0.0, 1.0])).item()
    assert masked == pytest.approx(math.log(math.exp(2) + 1) - 2, rel=1e-6)


def test_losses_on_empty_input_are_zero_and_differentiable():
    logits = torch.zeros(0, 3, requires_grad=True)
    for fn in (sigmoid_ce_loss, softmax_ce_loss):
        loss = fn(logits, torch.zeros(0, dtype=torch.int64))
        loss.backward()
        assert loss.item() == 0.0


def test_box_reg_loss_by_hand():
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    gt = torch.zeros(2, 4)
    fg = torch.tensor([True, False])
    assert box_reg_loss(pred, gt, fg).item() == pytest.approx(4 / 2)  # L1 over fg, divided by all proposals
    assert box_reg_loss(pred, gt, fg, beta=2.0).item() == pytest.approx(4 * 0.5 * 1 / 2 / 2)


def test_anchors_follow_detectron2():
    gen = AnchorGenerator(sizes=[[32, 64]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[16])
    (a,) = gen([(2, 3)], torch.device("cpu"))
    assert a.shape == (2 * 3 * 6, 4)
    w = math.sqrt(32**2 / 0.5)
    # size-major cell order, not rounded, offset 0
    assert torch.allclose(a[0], torch.tensor([-w / 2, -0.5 * w / 2, w / 2, 0.5 * w / 2]))
    assert torch.allclose(a[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    assert torch.allclose(a[3], torch.tensor([-math.sqrt(2 * 64**2) / 2, -math.sqrt(2 * 64**2) / 4,
                                              math.sqrt(2 * 64**2) / 2, math.sqrt(2 * 64**2) / 4]))
    # (y, x, a) order: the second position is x + 16
    assert torch.allclose(a[6], a[0] + torch.tensor([16.0, 0, 16.0, 0]))
    assert torch.allclose(a[18], a[0] + torch.tensor([0, 16.0, 0, 16.0]))


def test_anchors_match_recorded_detectron2_anchors(parity_fixtures_dir):
    rec = np.load(parity_fixtures_dir / "ocovd_c4_tiny" / "outputs.npz", allow_pickle=False)
    ref = torch.from_numpy(rec["img1_rpn_L0_anchors"])
    gen = AnchorGenerator(sizes=[[32, 64, 128, 256, 512]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[16])
    h, w = rec["img1_feat_res4"].shape[-2:]
    (a,) = gen([(h, w)], torch.device("cpu"))
    assert torch.equal(a, ref)


def test_instances_index_and_check_lengths():
    inst = Instances((10, 10), boxes=torch.zeros(3, 4), scores=torch.tensor([0.1, 0.5, 0.9]))
    assert len(inst[inst.scores > 0.3]) == 2 and len(inst[1]) == 1
    with pytest.raises(ValueError, match="length 2, expected 3"):
        inst.classes = torch.zeros(2)
    with pytest.raises(AttributeError, match="no field 'missing'"):
        inst.missing


def test_rescale_maps_to_original_and_clips():
    r = Instances((100, 200), pred_boxes=torch.tensor([[10.0, 10.0, 250.0, 50.0], [5.0, 5.0, 5.0, 9.0]]),
                  scores=torch.tensor([0.9, 0.8]), pred_classes=torch.tensor([1, 2]))
    out = rescale(r, (50, 100))
    assert out.image_size == (50, 100) and len(out) == 1  # the empty box is dropped
    assert torch.allclose(out.pred_boxes, torch.tensor([[5.0, 5.0, 100.0, 25.0]]))


def tiny_model(num_classes=5, extra=()):
    cfg = load_config("configs/shapes/base.yaml", TINY_OVERRIDES + list(extra))
    torch.manual_seed(0)
    return build_model(cfg, text_embeds=torch.randn(num_classes, 32)), cfg


def sample(seed, size=(96, 128), boxes=((10.0, 12.0, 50.0, 60.0),), classes=(1,)):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 255, (3, *size), dtype=torch.uint8, generator=g)
    gt = Instances(size, gt_boxes=torch.tensor(boxes).reshape(-1, 4), gt_classes=torch.tensor(classes, dtype=torch.int64))
    return ImageSample(image=img, image_id=seed, orig_size=size, gt=gt)


@pytest.mark.parametrize("backbone", ["resnet_fpn", "resnet_c4"])
def test_train_step_with_and_without_annotations(backbone):
    extra = [] if backbone == "resnet_fpn" else [
        "MODEL.BACKBONE.NAME", "resnet_c4", "MODEL.RPN.IN_FEATURES", "[res4]", "MODEL.ROI_HEADS.IN_FEATURES", "[res4]",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32, 64]]", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "14"]
    model, _ = tiny_model(extra=extra)
    model.train()
    empty = sample(1, boxes=(), classes=())
    losses = model([sample(0), empty])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.linear.weight.grad is not None
    only_empty = model([empty])  # an image with no annotations alone: background-only targets
    assert only_empty["loss_box_reg"].item() == 0.0 and only_empty["loss_rpn_loc"].item() == 0.0


def test_predict_batched_equals_one_by_one_and_vocabulary_swap():
    model, _ = tiny_model(extra=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    model.eval()
    a, b = sample(0), sample(1)
    batched = model.predict([a, b])
    for s, r in zip([a, b], batched):
        (single,) = model.predict([s])
        assert torch.allclose(single.pred_boxes, r.pred_boxes, atol=1e-4)
        assert torch.allclose(single.scores, r.scores, atol=1e-5)
        assert torch.equal(single.pred_classes, r.pred_classes)
    model.set_vocabulary(torch.randn(2, 32))
    (r,) = model.predict([a])
    assert len(r) > 0 and int(r.pred_classes.max()) < 2
    assert model.roi_heads.num_classes == 2


def test_predict_maps_to_original_size():
    model, _ = tiny_model()
    model.eval()
    s = sample(0)
    s.orig_size = (192, 256)
    (r,) = model.predict([s])
    assert r.image_size == (192, 256)
    assert float(r.pred_boxes[:, 2].max()) <= 256 and float(r.pred_boxes[:, 3].max()) <= 192


def test_build_rejects_wrong_embedding_dim_and_features():
    cfg = load_config("configs/shapes/base.yaml", TINY_OVERRIDES)
    with pytest.raises(ValueError, match="given text embeddings are 16-d embeddings, but MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM is 32"):
        build_model(cfg, text_embeds=torch.randn(4, 16))
    cfg = load_config("configs/shapes/base.yaml", TINY_OVERRIDES + ["MODEL.RPN.IN_FEATURES", "[res4]"])
    with pytest.raises(ValueError, match="res4.*does not produce"):
        build_model(cfg, text_embeds=torch.randn(4, 32))


def test_dense_ranks():
    from ovd.modeling.roi_heads import dense_ranks

    assert dense_ranks(torch.tensor([7, 20999, 7, 3])).tolist() == [1, 2, 1, 0]
    assert dense_ranks(torch.zeros(0, dtype=torch.int64)).tolist() == []


def test_class_nms_is_exact_per_class_nms_at_21k_classes():
    """Per-class NMS on dense ranks keeps what NMS run class by class keeps, where class ids in the 20k range would
    not: their coordinate offsets (~3e7) leave float32 a 2 px spacing, and overlaps change."""
    from torchvision.ops import nms
    from torchvision.ops.boxes import _batched_nms_coordinate_trick, _batched_nms_vanilla

    from ovd.modeling.roi_heads import class_nms

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(1000, 2, generator=g) * 100  # crowded: many overlaps near the threshold
    boxes = torch.cat([xy, xy + 8 + torch.rand(1000, 2, generator=g) * 40], dim=1)
    scores = torch.rand(1000, generator=g)
    classes = 20000 + torch.randint(0, 1000, (1000,), generator=g) // 50  # 20 classes of 50 boxes on average
    exact = _batched_nms_vanilla(boxes, scores, classes, 0.5)
    assert torch.equal(class_nms(boxes, scores, classes, 0.5), exact)
    # the same trick on the raw ids does differ here, so this test can see a regression to raw ids
    assert not torch.equal(_batched_nms_coordinate_trick(boxes, scores, classes, 0.5), exact)
    empty = class_nms(boxes[:0], scores[:0], classes[:0], 0.5)
    assert empty.shape == (0,) and torch.equal(nms(boxes[:0], scores[:0], 0.5), empty)


def _random_rois(g: torch.Generator, n: int, images: int) -> torch.Tensor:
    """RoIs (batch index, xyxy) on a 25x20 map at scale 1/4: small, large, elongated, partly or wholly outside."""
    xy = torch.rand(n, 2, generator=g) * 120 - 10
    wh = torch.rand(n, 2, generator=g) * 80
    wh[: n // 4, 0] *= 0.05  # thin and tall
    wh[n // 4: n // 2, 1] = wh[n // 4: n // 2, 1] * 0.05 + 1e-3  # wide and flat
    wh[n // 2: n // 2 + 5] = 0.0  # empty: no sampling point, zeros
    return torch.cat([torch.randint(0, images, (n, 1), generator=g).float(), xy, xy + wh], 1)


@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 0), (False, 0), (True, 2), (False, 3)])
def test_roi_align_cpu_forward_matches_torchvision(aligned, sampling_ratio):
    """Our CPU RoIAlign forward (`roi_align_cpu`: separable weights, one gather) gives torchvision's values up to
    float rounding, at several scales; no RoIs gives an empty result."""
    from torchvision.ops import roi_align

    from ovd.modeling.poolers import roi_align_cpu

    g = torch.Generator().manual_seed(0)
    feature = torch.randn(3, 16, 20, 25, generator=g)
    rois = _random_rois(g, 400, 3)
    for scale in (1.0, 0.25, 1 / 32):
        for size in (7, 2):
            ours = roi_align_cpu(feature, rois, size, scale, sampling_ratio, aligned)
            theirs = roi_align(feature, rois, size, scale, sampling_ratio, aligned)
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
    assert roi_align_cpu(feature, rois[:0], 7, 0.25, sampling_ratio, aligned).shape == (0, 16, 7, 7)


@pytest.mark.parametrize("aligned,sampling_ratio,threads", [(True, 0, 1), (False, 0, 1), (True, 2, 1), (True, 0, 2)])
def test_roi_align_backward_is_torchvisions_bit_for_bit(aligned, sampling_ratio, threads):
    """Our CPU RoIAlign backward (`roi_align_input_grad`, used by ROIPooler in training) gives exactly torchvision's
    gradient, so training numerics do not change; RoIs partly or wholly outside the map included."""
    from torchvision.ops import roi_align

    from ovd.modeling.poolers import _CPURoIAlign

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        feature = torch.randn(3, 16, 20, 25, generator=g, requires_grad=True)
        rois = _random_rois(g, 300, 3)
        args = (7, 0.25, sampling_ratio, aligned)
        ours = _CPURoIAlign.apply(feature, rois, *args)
        theirs = roi_align(feature, rois, *args)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
        grad_out = torch.randn(ours.shape, generator=g)
        (ours_grad,) = torch.autograd.grad(ours, feature, grad_out)
        (theirs_grad,) = torch.autograd.grad(theirs, feature, grad_out)
        assert torch.equal(ours_grad, theirs_grad)
        empty = _CPURoIAlign.apply(feature, rois[:0], *args)
        (empty_grad,) = torch.autograd.grad(empty.sum(), feature)
        assert empty.shape == (0, 16, 7, 7) and not empty_grad.any()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_fold_norms_keeps_the_function(norm):
    """`fold_norms` folds each frozen norm (non-trivial statistics) of a ResNet + FPN into its conv: the same
    features up to float rounding, no norm left; a BatchNorm2d still training is not folded."""
    from torch import nn
    from torchvision.ops import FrozenBatchNorm2d

    from ovd.modeling.backbone import Backbone, ResNet, fold_norms

    torch.manual_seed(0)
    body = ResNet(depth=18, norm=norm, stem_out_channels=8, res2_out_channels=8, out_features=("res2", "res3"),
                  last_stage="res3")
    backbone = Backbone(body, fpn_channels=8, fpn_in_features=("res2", "res3"))
    norms = [m for m in backbone.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))]
    for m in norms:
        m.weight.data.uniform_(0.5, 2.0)
        m.bias.data.normal_()
        m.running_mean.normal_()
        m.running_var.uniform_(0.2, 3.0)
    x = torch.randn(2, 3, 64, 96)
    if norm == "BN":
        assert fold_norms(backbone.train()) == 0  # batch statistics: nothing to fold
    backbone.eval()
    with torch.no_grad():
        before = backbone(x)
        assert fold_norms(backbone) == len(norms) == 1 + 2 * 4 + 1  # stem, 2 convs x 4 blocks, one downsample
        after = backbone(x)
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in backbone.modules())
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-4, atol=1e-4 * before[k].abs().max().item())
