"""Every shipped config loads, builds its detector with the real vocabulary size, and runs a training forward pass
(box batch; image-label batch where it mixes sources; RKD regions where it distils; masks for LVIS) and inference
on a tiny input. The COCO/LVIS ones keep the paper's hyper-parameters (DESIGN §2)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.config import load_config
from ovd.data.build import train_ann_types
from ovd.modeling.build import build_model
from ovd.structures import ImageSample, Instances, PolygonMasks

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml"))
NUM_CLASSES = {"coco": 65, "lvis": 1203}


def _vocabulary_size(path: str) -> int:
    return NUM_CLASSES.get(Path(path).parts[1], 16)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """Random 512-d text embeddings of 16, 65 and 1203 classes; LVIS-style image counts for 1203."""
    root = tmp_path_factory.mktemp("vocab")
    rng = np.random.default_rng(0)
    files = {}
    for n in (16, 65, 1203):
        emb = rng.standard_normal((n, 512)).astype(np.float32)
        np.save(root / f"{n}.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
        files[n] = str(root / f"{n}.npy")
    counts = [{"id": i + 1, "image_count": int(c)} for i, c in enumerate(rng.integers(0, 500, 1203))]
    (root / "cat_info.json").write_text(__import__("json").dumps(counts))
    return files, str(root / "cat_info.json")


def test_every_directory_has_configs():
    assert {Path(c).parts[1] for c in CONFIGS} >= {"coco", "lvis", "shapes"}
    for family, suffix in (("coco", "r50_c4"), ("lvis", "r50_fpn")):
        for stage in ("base", "rkd", "pis", "rkd_pis", "rkd_pis_wt", "rkd_pis_wt_8x"):
            assert f"configs/{family}/{stage}_{suffix}.yaml" in CONFIGS
        assert f"configs/{family}/proposals_oln_r50_fpn.yaml" in CONFIGS
    for kind in ("rpn", "oln"):
        assert f"configs/shapes/proposals_{kind}.yaml" in CONFIGS


@pytest.mark.parametrize("family,suffix,l1,irm", [("coco", "r50_c4", 0.15, 0.15), ("lvis", "r50_fpn", 0.25, 0.13)])
def test_paper_hyper_parameters(family, suffix, l1, irm):
    cfgs = {s: load_config(f"configs/{family}/{s}_{suffix}.yaml")
            for s in ("base", "rkd", "pis", "rkd_pis", "rkd_pis_wt", "rkd_pis_wt_8x")}
    for stage, cfg in cfgs.items():
        s = cfg.SOLVER
        assert (s.BASE_LR, s.IMS_PER_BATCH, s.WARMUP_ITERS, cfg.MODEL.ROI_BOX_HEAD.NORM_TEMP) == (0.02, 16, 1000, 50.0)
        expected = (720000, [480000, 640000]) if stage.endswith("8x") else (90000, [60000, 80000])
        assert (s.MAX_ITER, list(s.STEPS)) == expected, stage
        assert cfg.MODEL.DISTILLATION == ("rkd" in stage), stage
        assert cfg.MODEL.ROI_BOX_HEAD.WEIGHT_TRANSFER == ("wt" in stage), stage
        assert (cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS, cfg.MODEL.MASK_ON) == ((family == "lvis",) * 2), stage
        if cfg.MODEL.DISTILLATION:
            assert (cfg.MODEL.DISTIL_L1_LOSS_WEIGHT, cfg.MODEL.IRM_LOSS_WEIGHT, cfg.MODEL.NUM_DISTIL_PROP) == (l1, irm, 5)
            assert not cfg.MODEL.IRM_LOSS_NORMALIZE  # the paper's summed IRM
        if "pis" in stage:
            d = cfg.DATALOADER
            assert (list(d.DATASET_ANN), list(d.DATASET_RATIO), list(d.DATASET_BS)) == (["box", "image"], [1, 4], [2, 8])
            assert list(d.DATASET_MAX_SIZES) == [1333, 667] and d.DATASET_MIN_SIZES[1] == [400]
            assert cfg.MODEL.ROI_BOX_HEAD.PMS_LOSS_WEIGHT == 0.1 and cfg.MODEL.PIS_PROP_PATH
    if family == "lvis":
        b = cfgs["base"]
        assert (b.DATALOADER.SAMPLER_TRAIN, b.DATALOADER.REPEAT_THRESHOLD) == ("RepeatFactorTrainingSampler", 0.001)
        assert (b.MODEL.ROI_BOX_HEAD.USE_BIAS, b.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CAT) == (-4.6, 50)
        assert (b.TEST.DETECTIONS_PER_IMAGE, b.MODEL.ROI_HEADS.SCORE_THRESH_TEST) == (300, 1e-4)
    # the initialisation chain: base from ImageNet, RKD / PIS / RKD+PIS from base, WT from RKD
    assert cfgs["base"].MODEL.BACKBONE.WEIGHTS.endswith("R-50.pkl") and not cfgs["base"].MODEL.WEIGHTS
    for stage in ("rkd", "pis", "rkd_pis"):
        assert cfgs[stage].MODEL.WEIGHTS == f"./output/{family}/base_{suffix}/model_final.pth"
    for stage in ("rkd_pis_wt", "rkd_pis_wt_8x"):
        assert cfgs[stage].MODEL.WEIGHTS == f"./output/{family}/rkd_{suffix}/model_final.pth"
    assert len({c.OUTPUT_DIR for c in cfgs.values()}) == len(cfgs)


def _box_sample(h, w, num_classes, *, masks, regions, dim):
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]])
    gt = Instances((h, w), gt_boxes=boxes, gt_classes=torch.tensor([0, num_classes - 1]))
    if masks:
        gt.gt_masks = PolygonMasks([[np.array([4.0, 6.0, 40.0, 6.0, 22.0, 50.0])], [np.array([30.0, 10, 90, 10, 90, 60])]])
    sample = ImageSample(image=torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=gen), image_id=1,
                         orig_size=(h, w), gt=gt)
    if regions:
        sample.regions = Instances((h, w), boxes=boxes.clone(), embeds=torch.randn(2, dim, generator=gen))
    return sample


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_and_runs_forward(path, embeddings):
    files, cat_info = embeddings
    n = _vocabulary_size(path)
    overrides = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.BACKBONE.WEIGHTS", "",
                 "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", files[n], "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM", "512",
                 "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
    cfg = load_config(path, overrides)
    if cfg.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH:
        cfg = load_config(path, overrides + ["MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH", cat_info])
    torch.manual_seed(0)
    model = build_model(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork":
        _check_proposal_model(model, cfg)
        return
    assert model.roi_heads.box_predictor.cls_score.text_embeds.shape == (n, 512)
    model.train()
    sample = _box_sample(64, 96, n, masks=cfg.MODEL.MASK_ON, regions=cfg.MODEL.DISTILLATION, dim=512)
    losses = model.forward_train([sample])
    expected = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    expected |= {"loss_mask"} if cfg.MODEL.MASK_ON else set()
    expected |= {"loss_distil_l1", "loss_irm"} if cfg.MODEL.DISTILLATION else set()
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    if "image" in train_ann_types(cfg):
        labelled = ImageSample(image=sample.image, image_id=2, orig_size=(64, 96), regions=sample.regions,
                               image_labels=Instances((64, 96), boxes=sample.gt.gt_boxes, classes=torch.tensor([3, n - 2])))
        pis = model.forward_train([labelled])
        assert torch.isfinite(pis["loss_pms"]) and "loss_cls" not in pis
    model.eval()
    (result,) = model.predict([ImageSample(image=sample.image, image_id=1, orig_size=(64, 96))])
    assert len(result) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert result.pred_classes.max().item() < n if len(result) else True


def _check_proposal_model(model, cfg):
    """A proposal model trains on a box batch with the losses of its kind and predicts scored boxes."""
    model.train()
    sample = _box_sample(64, 96, 2, masks=False, regions=False, dim=0)
    losses = model([sample])
    first = "loss_rpn_ctr" if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "OLN" else "loss_rpn_cls"
    second = "loss_box_iou" if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "OLN" else "loss_objectness"
    assert set(losses) == {first, "loss_rpn_loc", "loss_box_reg", second}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    (result,) = model.predict([ImageSample(image=sample.image, image_id=1, orig_size=(64, 96))])
    assert len(result) <= cfg.TEST.DETECTIONS_PER_IMAGE
    # a random R-50 with frozen identity BN may score every box non-finite; the small trainable-BN ones may not
    assert len(result) > 0 or cfg.MODEL.RESNETS.NORM == "FrozenBN"
    assert (result.scores[:-1] >= result.scores[1:]).all() and ((result.scores >= 0) & (result.scores <= 1)).all()


@pytest.mark.parametrize("path", [c for c in CONFIGS if "/shapes/" not in c])
def test_config_datasets_are_catalogued(path, tmp_path, monkeypatch):
    """Every dataset a COCO/LVIS config names is a catalogue entry or declared in the config (DATASETS.CUSTOM);
    without the files, the error names the file (and, for the catalogue's, says how to make it)."""
    import re

    from ovd.data.catalog import get_dataset, register_config_datasets

    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    cfg = load_config(path)
    register_config_datasets(cfg.DATASETS.CUSTOM)
    declared = {e.NAME: e.JSON for e in cfg.DATASETS.CUSTOM}
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        where = re.escape(declared[name]) if name in declared else rf"{tmp_path}/\S+\.json"
        with pytest.raises(FileNotFoundError, match=where):
            get_dataset(name)
