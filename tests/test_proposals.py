"""Class-agnostic proposals: the file format and the noisy oracle of the shapes world."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from ovd.data.proposals import (
    load_proposals,
    make_oracle_proposals,
    oracle_proposals_for_image,
    save_proposals,
)
from ovd.data.shapes import make_shapes_world

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_oracle_proposals.py"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_shapes_world(tmp_path_factory.mktemp("world"), num_train=12, num_val=6, image_size=128, seed=3)


def test_round_trip(tmp_path):
    proposals = {
        7: (np.array([[1.5, 2.25, 30.0, 40.5], [0.0, 0.0, 5.0, 5.0]], np.float32), np.array([0.9, 0.1], np.float32)),
        3: (np.array([[10.0, 10.0, 20.0, 12.0]], np.float32), np.array([0.5], np.float32)),
    }
    path = save_proposals(tmp_path / "p.json", proposals)
    entries = json.loads(path.read_text())
    assert [e["image_id"] for e in entries] == [3, 7, 7]
    assert entries[1]["bbox"] == [1.5, 2.25, 28.5, 38.25]  # xywh on disk

    loaded, stats = load_proposals(path, image_sizes={3: (50, 50), 7: (50, 50), 9: (50, 50)})
    assert sorted(loaded) == [3, 7]  # image 9 has none: absent, the caller counts it
    for image_id, (boxes, scores) in proposals.items():
        got_boxes, got_scores = loaded[image_id]
        assert got_boxes.dtype == np.float32 and got_scores.dtype == np.float32
        np.testing.assert_allclose(got_boxes, boxes, atol=1e-5)  # file order kept
        np.testing.assert_allclose(got_scores, scores, atol=1e-5)
    assert (stats.num_read, stats.num_kept, stats.num_clipped, stats.num_zero_area, stats.num_images) == (3, 3, 0, 0, 2)


def test_clipping_and_zero_area_are_counted(tmp_path, caplog):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([
        {"image_id": 1, "bbox": [-5, 2, 10, 10], "score": 0.9, "category_id": 1},  # clipped to x >= 0
        {"image_id": 1, "bbox": [4, 4, 0, 10], "score": 0.8},  # zero width
        {"image_id": 1, "bbox": [25, 25, 10, 10], "score": 0.7},  # entirely outside the 20x30 image: empty after clipping
        {"image_id": 2, "bbox": [1, 1, 2, 2], "score": 0.6},
    ]))
    loaded, stats = load_proposals(path, image_sizes={1: (20, 30), 2: (20, 30)})
    np.testing.assert_array_equal(loaded[1][0], [[0, 2, 5, 12]])
    assert (stats.num_read, stats.num_kept, stats.num_clipped, stats.num_zero_area) == (4, 2, 1, 2)
    assert "1 proposals clipped" in caplog.text and "2 of zero area dropped" in caplog.text

    unclipped, stats = load_proposals(path)  # without image sizes: no clipping, only empty boxes dropped
    np.testing.assert_array_equal(unclipped[1][0], [[-5, 2, 5, 12], [25, 25, 35, 35]])
    assert (stats.num_clipped, stats.num_zero_area) == (0, 1)


def test_unknown_image_ids(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"image_id": i, "bbox": [0, 0, 4, 4], "score": 0.5} for i in (1, 5, 6, 5)]))
    with pytest.raises(ValueError, match=r"p\.json.*2 image ids not in the dataset \(first: \[5, 6\]\)"):
        load_proposals(path, image_sizes={1: (10, 10)})
    loaded, stats = load_proposals(path, image_sizes={1: (10, 10)}, unknown="skip")
    assert list(loaded) == [1] and stats.num_unknown == 3 and stats.unknown_image_ids == [5, 6]


@pytest.mark.parametrize("entry, message", [
    ({"image_id": 1, "bbox": [0, 0, 4], "score": 0.5}, "entry 1"),
    ({"image_id": 1, "bbox": [0, 0, 4, 4]}, "entry 1"),
    ({"image_id": "1", "bbox": [0, 0, 4, 4], "score": 0.5}, "entry 1"),
    ({"image_id": 1, "bbox": [0, 0, 4, float("nan")], "score": 0.5}, "entry 1 .* non-finite"),
])
def test_malformed_entries_are_named(tmp_path, entry, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5}, entry]))
    with pytest.raises(ValueError, match=message):
        load_proposals(path)
    path.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        load_proposals(path)


def test_oracle_is_deterministic_and_per_image(world, tmp_path):
    ann = world / "annotations" / "train_all.json"
    stats = make_oracle_proposals(ann, tmp_path / "a.json", seed=5)
    make_oracle_proposals(ann, tmp_path / "b.json", seed=5)
    make_oracle_proposals(ann, tmp_path / "c.json", seed=6)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "c.json").read_bytes()
    assert stats["images"] == 12 and stats["images_without_proposals"] == 0

    # Image i's proposals come from its own generator, whatever the other images are.
    data = json.loads(ann.read_text())
    image = data["images"][4]
    gt = np.array([a["bbox"] for a in data["annotations"] if a["image_id"] == image["id"]], np.float64)
    gt[:, 2:] += gt[:, :2]
    boxes, scores = oracle_proposals_for_image(gt, (image["height"], image["width"]),
                                               np.random.default_rng([5, image["id"]]))
    loaded, _ = load_proposals(tmp_path / "a.json")
    np.testing.assert_allclose(loaded[image["id"]][0], boxes, atol=0.006)
    np.testing.assert_allclose(loaded[image["id"]][1], scores, atol=1e-5)
    assert (scores[:-3] >= 0.5).all() and (scores[-3:] <= 0.6).all()  # kept true boxes first, then 3 random


def test_oracle_recall_and_scores(tmp_path):
    # 400 images x 4 boxes in JSON only (the oracle never reads pixels).
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.png", "height": 160, "width": 160} for i in range(1, 401)]
    annotations = []
    for image in images:
        for q in range(4):  # one box per quadrant, 15-60 px: no two true boxes overlap
            x, y = 80 * (q % 2) + rng.uniform(0, 10), 80 * (q // 2) + rng.uniform(0, 10)
            w, h = rng.uniform(15, 60, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": 1,
                                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    ann = tmp_path / "all.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}))

    stats = make_oracle_proposals(ann, tmp_path / "p.json", recall=0.7, num_random=0)
    # 1600 boxes: binomial std 0.011; a kept box with 10 % jitter always has IoU >= 0.5.
    assert abs(stats["recall_achieved"] - 0.7) < 0.04
    assert stats["proposals"] == round(stats["recall_achieved"] * stats["gt_boxes"])

    stats = make_oracle_proposals(ann, tmp_path / "p.json", recall=0.9, num_random=3)
    assert 0.86 < stats["recall_achieved"] < 0.96
    loaded, load_stats = load_proposals(tmp_path / "p.json", image_sizes={i["id"]: (160, 160) for i in images})
    assert load_stats.num_clipped == load_stats.num_zero_area == 0  # the oracle writes boxes inside the image
    scores = np.concatenate([s for _, s in loaded.values()])
    assert scores.min() >= 0 and scores.max() <= 1
    # True boxes (listed first) outscore random ones on average, but not always.
    true_scores = np.concatenate([s[:-3] for _, s in loaded.values()])
    random_scores = np.concatenate([s[-3:] for _, s in loaded.values()])
    assert true_scores.mean() > random_scores.mean() + 0.3 and true_scores.min() < random_scores.max()

    assert make_oracle_proposals(ann, tmp_path / "p.json", recall=1.0, jitter=0.0)["recall_achieved"] == 1.0


def test_cli(world, tmp_path, capsys):
    out = tmp_path / "props.json"
    main = runpy.run_path(str(TOOL))["main"]
    main(["--dataset-json", str(world / "annotations" / "val.json"), "--out", str(out), "--recall", "0.8"])
    assert "recall at IoU 0.5" in capsys.readouterr().out
    loaded, _ = load_proposals(out)
    assert sorted(loaded) == list(range(1, 7))
