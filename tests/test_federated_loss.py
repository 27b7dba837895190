"""The LVIS federated loss (DESIGN §2: 50 sampled classes, frequency^0.5): which classes it scores, how often each
is drawn, and the loss value by hand."""

import json
import math

import pytest
import torch

from ovd.modeling.build import read_class_frequencies
from ovd.modeling.losses import federated_classes, sigmoid_ce_loss


def test_classes_of_the_batch_are_always_scored_and_the_sample_is_filled():
    c = 10
    weight = torch.ones(c)
    torch.manual_seed(0)
    mask = federated_classes(torch.tensor([2, 5, 5, c]), c, num_sample=6, weight=weight)
    # appeared: {2, 5, background}; 3 more drawn among the other 8 classes; background is not a column
    assert mask[2] == 1 and mask[5] == 1
    assert mask.sum().item() == 6 - 1
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # more classes in the batch than the sample size: exactly those, nothing drawn
    mask = federated_classes(torch.tensor([0, 1, 2, 3]), c, num_sample=2, weight=weight)
    assert mask.nonzero()[:, 0].tolist() == [0, 1, 2, 3]


def test_negatives_are_drawn_in_proportion_to_weight_and_never_at_zero_weight():
    # classes 0 and 1 can be drawn (weight 1 and 3 = sqrt(1) and sqrt(9) images); 2 is in the batch; 3 has no image
    weight = torch.tensor([1.0, 3.0, 5.0, 0.0])
    torch.manual_seed(0)
    drawn = torch.stack([federated_classes(torch.tensor([2]), 4, num_sample=2, weight=weight) for _ in range(4000)])
    assert (drawn[:, 2] == 1).all() and (drawn[:, 3] == 0).all()
    assert drawn[:, 1].mean().item() == pytest.approx(3 / 4, abs=0.03)
    assert (drawn[:, 0] + drawn[:, 1] == 1).all()


def test_frequency_weight_is_the_square_root_of_image_counts(tmp_path):
    path = tmp_path / "cat_info.json"
    path.write_text(json.dumps([{"id": 3, "image_count": 16}, {"id": 1, "image_count": 4}, {"id": 2, "image_count": 0}]))
    assert read_class_frequencies(str(path), 3).tolist() == [2.0, 0.0, 4.0]  # sorted by category id


def test_loss_value_by_hand_with_a_federated_mask():
    # 2 proposals, 3 classes + background; proposal 0 is class 1, proposal 1 is background
    logits = torch.tensor([[0.5, 2.0, -1.0, 9.0], [-0.5, 0.0, 3.0, 9.0]])
    mask = torch.tensor([1.0, 1.0, 0.0])  # class 2 not in the federated sample

    def bce(x, t):
        return math.log1p(math.exp(-x)) if t else math.log1p(math.exp(x))

    expected = (bce(0.5, 0) + bce(2.0, 1) + bce(-0.5, 0) + bce(0.0, 0)) / 2
    assert sigmoid_ce_loss(logits, torch.tensor([1, 3]), mask).item() == pytest.approx(expected, rel=1e-6)
    everything = expected + (bce(-1.0, 0) + bce(3.0, 0)) / 2
    assert sigmoid_ce_loss(logits, torch.tensor([1, 3])).item() == pytest.approx(everything, rel=1e-6)
