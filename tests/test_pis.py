"""Pseudo image-level supervision and weight transfer (DESIGN §2), and multi-source batches."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from ovd.data.samplers import MultiSourceBatchSampler
from ovd.modeling.classifier import WeightTransferClassifier
from ovd.modeling.losses import pis_loss


def bce(x, t):
    return math.log1p(math.exp(-x)) if t else math.log1p(math.exp(x))


def test_pis_loss_by_hand():
    # C = 2 classes + background; image 0 has two labels, image 1 one
    logits = torch.tensor([[1.0, -1.0, 0.0], [0.0, 2.0, 0.5], [3.0, 0.0, -2.0]])
    classes = torch.tensor([0, 1, 0])
    image = torch.tensor([0, 0, 1])
    per_label = [bce(1, 1) + bce(-1, 0) + bce(0, 0), bce(0, 0) + bce(2, 1) + bce(0.5, 0), bce(3, 1) + bce(0, 0) + bce(-2, 0)]
    expected = ((per_label[0] + per_label[1]) / 2 + per_label[2]) / 2  # labels, then images
    assert pis_loss(logits, classes, image).item() == pytest.approx(expected, rel=1e-6)
    assert pis_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)).item() == 0


def test_weight_transfer_paths_and_gradients():
    torch.manual_seed(0)
    clf = WeightTransferClassifier(in_dim=6, text_embeds=torch.randn(4, 8), temperature=50.0)
    x = torch.randn(5, 6)
    # z = fc4(LeakyReLU(fc3 x)) + W_T x with W_T = fc2(LeakyReLU(fc1 W_rkd))
    lrelu = torch.nn.functional.leaky_relu
    w_t = clf.fc2(lrelu(clf.fc1(clf.linear.weight), 0.1))
    z = clf.fc4(lrelu(clf.fc3(x), 0.1)) + x @ w_t.t()
    expected = 50.0 * torch.nn.functional.normalize(z, dim=1) @ clf.text_embeds.t()
    logits = clf(x)
    assert torch.allclose(logits[:, :4], expected, atol=1e-5) and torch.all(logits[:, 4] == 0)
    # RKD keeps using the frozen W_rkd x
    assert torch.allclose(clf.region_embeds(x), clf.linear(x))
    (logits.sum() + clf.region_embeds(x).sum()).backward()
    assert clf.linear.weight.grad is None and not clf.linear.weight.requires_grad
    assert all(getattr(clf, f"fc{i}").weight.grad is not None for i in (1, 2, 3, 4))


def test_multi_source_ratio_single_source_batches_and_resume():
    sampler = MultiSourceBatchSampler([10, 30], ratios=[1, 4], batch_sizes=[2, 8], seed=5)
    batches = [b for _, b in zip(range(2000), iter(sampler))]
    sources = [{k for k, _, _ in b} for b in batches]
    assert all(len(s) == 1 for s in sources)  # every batch from one source
    counts = Counter(next(iter(s)) for s in sources)
    # images 1:4 at 2 and 8 per batch (the original's meaning): one batch of each, images in ratio 1:4
    assert counts[1] / len(batches) == pytest.approx(0.5, abs=0.03)
    images = Counter(k for b in batches for k, _, _ in b)
    assert images[1] / images[0] == pytest.approx(4.0, rel=0.1)
    assert all(len(b) == (2 if b[0][0] == 0 else 8) for b in batches)
    resumed = [b for _, b in zip(range(50), iter(MultiSourceBatchSampler([10, 30], ratios=[1, 4], batch_sizes=[2, 8],
                                                                          seed=5, start_iter=1000)))]
    assert resumed == batches[1000:1050]


def test_multi_source_ranks_agree_on_the_source_and_split_the_images():
    make = lambda r: MultiSourceBatchSampler([10, 30], ratios=[1, 1], batch_sizes=[1, 2], seed=1, rank=r, world_size=2)  # noqa: E731
    a = [b for _, b in zip(range(40), iter(make(0)))]
    b = [b for _, b in zip(range(40), iter(make(1)))]
    assert [x[0][0] for x in a] == [y[0][0] for y in b]
    for x, y in zip(a, b):
        # each rank takes its own part of the global batch: different stream positions (augmentation seeds)
        assert {s for *_, s in x}.isdisjoint({s for *_, s in y})


def test_multi_source_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="DATASET_RATIO has 1 entries and DATALOADER.DATASET_BS 2"):
        MultiSourceBatchSampler([10, 30], ratios=[1], batch_sizes=[2, 8], seed=0)
    with pytest.raises(ValueError, match="positive sum"):
        MultiSourceBatchSampler([10], ratios=[0], batch_sizes=[2], seed=0)


@pytest.mark.slow
def test_short_pis_wt_run_lowers_the_pis_loss(rkd_world, true_pseudo_boxes, tmp_path):
    """Box- and image-labelled batches 1:4 with RKD and weight transfer: the PIS loss falls (true boxes stand in for
    mined pseudo boxes here; the miner has its own tests)."""
    import json

    from ovd.config import load_config
    from ovd.engine.trainer import train

    _, overrides = rkd_world
    cfg = load_config("configs/shapes/rkd_pis_wt.yaml", overrides + [
        "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.WEIGHTS", "", "MODEL.PIS_PROP_PATH", str(true_pseudo_boxes),
        "DATALOADER.DATASET_BS", "[2, 2]", "SOLVER.MAX_ITER", "40", "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.CHECKPOINT_PERIOD", "0", "DATASETS.TEST", "[]", "TEST.RKD_FEAT_PATH", ""])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    pms = [r["loss_pms"] for r in rows if "loss_pms" in r]
    assert len(pms) > 20 and any("loss_cls" in r for r in rows)  # both kinds of batch ran
    third = len(pms) // 3
    assert sum(pms[-third:]) / third < 0.7 * sum(pms[:third]) / third, pms
