"""ovd.clip.train_toy: the shapes world's CLIP teacher — loss, zero-shot accuracy, crops, training runs, the CLI."""

import math
import runpy
import shutil
from pathlib import Path

import numpy as np
import open_clip.loss
import pytest
import torch
import torch.nn.functional as F

from ovd.clip import load_clip
from ovd.clip.train_toy import (
    crop_box,
    evaluate_zero_shot,
    load_box_crops,
    multi_positive_clip_loss,
    train_toy_clip,
    zero_shot_accuracy,
)
from ovd.utils.io import read_json

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_toy_clip.py"
TINY = dict(steps=30, batch_size=16, lr=2e-3, seed=0)


def _quiet(_: str) -> None:
    pass


def test_multi_positive_clip_loss_by_hand():
    # Images 0 and 2 both match text 0 (a repeated caption), image 1 matches text 1; logit scale 1.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[True, False], [False, True], [True, False]])
    e = math.e
    image_to_text = math.log(1 + 1 / e)  # every image: its text at logit 1, the other at 0
    text_to_image = (math.log(2 + 1 / e) + math.log(1 + 2 / e)) / 2  # text 0: target 1/2 on images 0 and 2
    loss = multi_positive_clip_loss(images, texts, positives, torch.tensor(1.0))
    assert loss.item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)

    # An image without a positive text only adds a negative to the text-to-image side.
    with_stranger = multi_positive_clip_loss(
        torch.cat([images, torch.tensor([[-1.0, 0.0]])]), texts,
        torch.cat([positives, torch.tensor([[False, False]])]), torch.tensor(1.0))
    stranger_t2i = (math.log(2 + 1 / e + 1 / e**2) + math.log(1 + 3 / e)) / 2
    assert with_stranger.item() == pytest.approx((image_to_text + stranger_t2i) / 2, rel=1e-6)


def test_multi_positive_clip_loss_with_one_positive_each_is_clip_loss():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    expected = open_clip.loss.ClipLoss()(images, texts, scale)
    assert torch.allclose(multi_positive_clip_loss(images, texts, torch.eye(6, dtype=torch.bool), scale), expected)


def test_multi_positive_clip_loss_rejects_degenerate_input():
    x = torch.eye(3)
    with pytest.raises(ValueError, match="at least one positive"):
        multi_positive_clip_loss(x, x, torch.zeros(3, 3, dtype=torch.bool), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"positives must be \[B, T\]"):
        multi_positive_clip_loss(x, x[:2], torch.eye(3, dtype=torch.bool), torch.tensor(1.0))


def test_zero_shot_accuracy_on_constructed_embeddings():
    names = ["red circle", "blue star", "green square", "white cross"]
    texts = torch.eye(4, 3)  # "white cross" has no direction of its own and no crops
    # Predictions (nearest text) 0, 1, 2, 2, 0; truths 0, 1, 1, 2, 2.
    images = F.normalize(torch.tensor([[1.0, 0.1, 0], [0, 1, 0], [0, 0.2, 1], [0.1, 0, 1], [1, 0, 0.5]]), dim=-1)
    labels = torch.tensor([0, 1, 1, 2, 2])
    acc = zero_shot_accuracy(images, texts, labels, names, groups={"base": [0, 1], "novel": [2, 3]})
    assert acc["all"] == pytest.approx(3 / 5)
    assert acc["base"] == pytest.approx(2 / 3) and acc["novel"] == pytest.approx(1 / 2)
    expected = {"red circle": 1.0, "blue star": 0.5, "green square": 0.5, "white cross": None}
    assert acc["per_class"] == pytest.approx(expected)
    assert acc["num_crops"] == 5 and acc["num_crops_per_class"]["white cross"] == 0
    assert zero_shot_accuracy(images, texts, labels, names, groups={"none": [3]})["none"] is None
    with pytest.raises(ValueError, match="4 text embeddings for 3 names"):
        zero_shot_accuracy(images, texts, labels, names[:3])
    with pytest.raises(ValueError, match="one label per image"):
        zero_shot_accuracy(images, texts, labels[:4], names)


def test_crop_box_rounds_outwards_and_clips():
    image = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    crop = crop_box(image, [1.2, 2.5, 4.0, 7.1])
    assert crop.size == (3, 6)  # x 1..3, y 2..7 (PIL sizes are w, h)
    assert np.array_equal(np.asarray(crop), image[2:8, 1:4])
    assert np.array_equal(np.asarray(crop_box(image, [-5.0, 8.0, 30.0, 40.0])), image[8:, :])
    assert crop_box(image, [9.5, 11.9, 9.6, 11.95]).size == (1, 1)


def test_load_box_crops_matches_the_annotations(tiny_world):
    world = tiny_world[0] / "shapes"
    val = load_box_crops(world, "val")
    coco = read_json(world / "annotations" / "val.json")
    assert len(val) == len(coco["annotations"]) and len(val.images) == len(coco["images"])
    first = coco["annotations"][0]
    x, y, w, h = first["bbox"]
    assert np.allclose(val.boxes[0], [x, y, x + w, y + h])
    assert val.names[val.labels[0]] == next(c["name"] for c in coco["categories"] if c["id"] == first["category_id"])
    assert val.novel.sum() == 5 and len(val.names) == 16


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    """Two identical tiny runs (same seed) on the tiny world: (world, folder_a, metrics_a, folder_b, metrics_b)."""
    world = tiny_world[0] / "shapes"
    root = tmp_path_factory.mktemp("toy_clip")
    a = train_toy_clip(world, root / "a", **TINY, log=_quiet)
    b = train_toy_clip(world, root / "b", **TINY, log=_quiet)
    return world, root / "a", a, root / "b", b


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_reload_is_the_trained_model(runs):
    world, folder_a, metrics_a, folder_b, metrics_b = runs
    a, b = load_clip(f"local-dir:{folder_a}"), load_clip(f"local-dir:{folder_b}")
    for key, value in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[key], value), key
    assert metrics_a["losses"] == metrics_b["losses"] and len(metrics_a["losses"]) == TINY["steps"]
    assert read_json(folder_a / "metrics.json") == metrics_a
    assert metrics_a["params"]["steps"] == 30 and metrics_a["params"]["world"]["seed"] == 3
    assert metrics_a["num_train_crops"] == len(load_box_crops(world, "train_all"))
    # The zero-shot numbers were measured on the in-memory model; the reloaded one reproduces them exactly.
    assert evaluate_zero_shot(a, load_box_crops(world, "val")) == metrics_a["zero_shot"]
    # The seed matters.
    other = load_clip("ovd-toy-vit", seed=1).model.state_dict()
    assert not torch.equal(other["visual.conv1.weight"], a.model.state_dict()["visual.conv1.weight"])


@pytest.mark.slow
def test_loss_goes_down_and_the_model_learns_its_training_crops(runs):
    world, folder_a, metrics_a, _, _ = runs
    losses = metrics_a["losses"]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    train = load_box_crops(world, "train_all")
    trained = evaluate_zero_shot(load_clip(f"local-dir:{folder_a}"), train)
    untrained = evaluate_zero_shot(load_clip("ovd-toy-vit", seed=0), train)
    # Chance is 1/16.
    assert trained["all"] > 0.3 and trained["all"] > untrained["all"] + 0.2  # measured 0.48 vs 0.03


@pytest.mark.slow
def test_cli_skips_a_finished_run_and_overwrite_retrains(runs, tmp_path, capsys):
    world, folder_a, metrics_a, _, _ = runs
    out = tmp_path / "toy_clip"
    shutil.copytree(folder_a, out)
    weights = out / "open_clip_pytorch_model.bin"
    mtime = weights.stat().st_mtime_ns
    main = runpy.run_path(str(TOOL))["main"]
    args = ["--world", str(world), "--out", str(out), "--batch-size", "16", "--lr", "0.002", "--threads", "1"]

    assert main(args + ["--steps", "30"]) == metrics_a
    assert "skipped" in capsys.readouterr().out and weights.stat().st_mtime_ns == mtime

    with pytest.raises(FileExistsError, match=r"steps: 30 \(existing\) vs 2 \(requested\)"):
        main(args + ["--steps", "2"])
    assert weights.stat().st_mtime_ns == mtime

    retrained = main(args + ["--steps", "2", "--overwrite"])
    assert retrained["steps"] == 2 and read_json(out / "metrics.json")["params"]["steps"] == 2
    assert "zero-shot accuracy" in capsys.readouterr().out

    # A folder whose weights went missing is not complete: it is trained again.
    weights.unlink()
    assert main(args + ["--steps", "2"])["steps"] == 2 and weights.is_file()

