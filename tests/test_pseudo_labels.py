"""Pseudo-box mining (PIS, offline): the score, the choice of box, thresholds, bad input, import, precision, and the
whole pipeline on a tiny shapes world."""

import json
from pathlib import Path

import numpy as np
import pytest
from tools_loader import load_tool

from ovd.clip import encode_text, load_clip, save_text_embeddings
from ovd.data.catalog import DatasetSpec
from ovd.data.datasets import DetectionDataset, ImageRecord, load_image_labels
from ovd.data.proposals import make_oracle_proposals, save_proposals
from ovd.clip.region_extraction import extract_region_embeddings
from ovd.data.region_store import RegionStoreWriter
from ovd.data.shapes import make_shapes_world
from ovd.pseudo_labels.miner import (
    ImageRegions,
    StoreRegions,
    import_pseudo_boxes,
    mine_pseudo_boxes,
    open_store_regions,
    pseudo_box_precision,
    save_pseudo_boxes,
    score_regions,
)

# Vocabulary: category ids 10 (A), 20 (B), 30 (C) with orthonormal text embeddings in 4-d.
CATEGORY_IDS = [10, 20, 30]
TEXT = np.eye(4, dtype=np.float32)[:3]
BOXES = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 70, 60]], np.float32)


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


# Region 0 looks like B, region 1 like A or B (p(A) = 0.66 at logit scale 10), region 2 clearly like A.
EMBEDS = np.stack([unit([0.1, 1, 0, 0.1]), unit([0.5, 0.43, 0, 0.75]), unit([1, 0, 0.1, 0.1])])


def record(image_id, labels, size=(100, 100)):
    return ImageRecord(image_id=image_id, file_name=Path(f"{image_id}.png"), height=size[0], width=size[1],
                       boxes=np.zeros((0, 4), np.float32), category_ids=np.zeros(0, np.int64),
                       image_labels=np.array(labels, np.int64))


def source(regions_by_image):
    empty = ImageRegions(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    return lambda r: regions_by_image.get(r.image_id, empty)


def mine(records, regions_by_image, **kwargs):
    kwargs = {"threshold": 0.0, "alpha": 0.0, "logit_scale": 10.0, **kwargs}
    return mine_pseudo_boxes(records, category_ids=CATEGORY_IDS, text_embeds=TEXT, regions=source(regions_by_image),
                             **kwargs)


def test_score_is_softmax_over_vocabulary_mixed_with_objectness():
    objectness = np.array([0.9, 0.5, 0.2], np.float32)
    scores = score_regions(EMBEDS, TEXT, np.array([0, 1]), objectness, logit_scale=10.0, alpha=0.3)
    logits = 10.0 * EMBEDS.astype(np.float64) @ TEXT.T
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scores, p[:, [0, 1]] ** 0.7 * objectness[:, None] ** 0.3, rtol=1e-6)
    np.testing.assert_allclose(score_regions(EMBEDS, TEXT, np.array([2]), None, logit_scale=10.0, alpha=0.0),
                               p[:, [2]], rtol=1e-6)
    assert score_regions(EMBEDS, TEXT, np.array([0]), np.array([0, 1, 1.0]), alpha=0.5)[0, 0] == 0.0
    with pytest.raises(ValueError, match="objectness"):
        score_regions(EMBEDS, TEXT, np.array([0]), None, alpha=0.3)


def test_picks_the_region_closest_to_each_label():
    regions = {1: ImageRegions(BOXES, EMBEDS, np.ones(3, np.float32))}
    anns, stats = mine([record(1, [10, 20])], regions)
    assert [(a["category_id"], a["bbox"]) for a in anns] == [(10, [50.0, 50.0, 20.0, 10.0]),
                                                              (20, [0.0, 0.0, 10.0, 10.0])]
    assert [a["id"] for a in anns] == [1, 2] and all(a["iscrowd"] == 0 for a in anns)
    assert anns[0]["area"] == 200.0 and 0.99 < anns[0]["score"] <= 1.0
    assert (stats.images, stats.images_kept, stats.labels, stats.labels_kept) == (1, 1, 2, 2)


def test_objectness_changes_the_choice_when_alpha_is_large():
    # The clear A (region 2) is a less likely object than the doubtful one (region 1): objectness 0.3 vs 0.9. Region
    # 2 wins while (p2 / p1)^(1 - α) > (o1 / o2)^α, i.e. for α below ~0.27.
    regions = {1: ImageRegions(BOXES, EMBEDS, np.array([0.9, 0.9, 0.3], np.float32))}
    chosen = {alpha: mine([record(1, [10])], regions, alpha=alpha)[0][0]["bbox"][0] for alpha in (0.0, 0.2, 0.5, 0.9)}
    assert chosen == {0.0: 50.0, 0.2: 50.0, 0.5: 20.0, 0.9: 20.0}


def test_threshold_drops_labels_and_images():
    regions = {1: ImageRegions(BOXES, EMBEDS, np.ones(3, np.float32)),
               2: ImageRegions(BOXES[:1], EMBEDS[:1], np.ones(1, np.float32))}
    # Image 2's only region looks like B: its label A scores ~0 and is dropped, and the image with it.
    anns, stats = mine([record(1, [10, 20]), record(2, [10])], regions, threshold=0.5)
    assert [(a["image_id"], a["category_id"]) for a in anns] == [(1, 10), (1, 20)]
    assert (stats.labels, stats.labels_below_threshold, stats.labels_kept) == (3, 1, 2)
    assert (stats.images_kept, stats.images_dropped) == (1, 1)
    anns, stats = mine([record(1, [10, 20]), record(2, [10])], regions, threshold=1.01)
    assert anns == [] and stats.images_dropped == 2 and stats.labels_below_threshold == 3


def test_images_without_regions_are_skipped_and_counted():
    regions = {1: ImageRegions(BOXES, EMBEDS, np.ones(3, np.float32))}
    anns, stats = mine([record(2, [10, 30]), record(1, [30])], regions)
    assert [a["image_id"] for a in anns] == [1]
    assert (stats.images_without_regions, stats.labels_without_regions, stats.images_dropped) == (1, 2, 1)


def test_bad_input():
    regions = {1: ImageRegions(BOXES, EMBEDS, np.ones(3, np.float32))}
    with pytest.raises(ValueError, match=r"image 5 is labelled with category ids \[99\]"):
        mine([record(1, [10]), record(5, [10, 99])], regions)
    with pytest.raises(ValueError, match="dim 3"):
        mine([record(1, [10])], {1: ImageRegions(BOXES, EMBEDS[:, :3], None)})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mine([record(1, [10])], {1: ImageRegions(BOXES, EMBEDS, np.array([0.5, 2.0, 0.5]))}, alpha=0.3)
    with pytest.raises(ValueError, match="objectness"):
        mine([record(1, [10])], {1: ImageRegions(BOXES, EMBEDS, None)}, alpha=0.3)
    with pytest.raises(ValueError, match="alpha"):
        mine([record(1, [10])], regions, alpha=1.5)
    with pytest.raises(ValueError, match="C = 3"):
        mine_pseudo_boxes([record(1, [10])], category_ids=CATEGORY_IDS, text_embeds=TEXT[:2], regions=source(regions))


@pytest.fixture
def image_label_file(tmp_path):
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 100, "width": 100, "pos_category_ids": labels}
                   for i, labels in ((1, [10, 20]), (2, [10]), (3, [30]))],
        "annotations": [],
        "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, "ABC")],
    }
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    return path, data


def test_output_loads_as_pseudo_boxes(image_label_file, tmp_path):
    path, data = image_label_file
    dataset = load_image_labels(DatasetSpec("labels", path, tmp_path))
    regions = {1: ImageRegions(BOXES, EMBEDS, np.ones(3, np.float32)),
               2: ImageRegions(BOXES[:1], EMBEDS[:1], np.ones(1, np.float32))}
    anns, stats = mine(dataset.records, regions, threshold=0.5)
    out = save_pseudo_boxes(tmp_path / "pseudo.json", image_labels=data, annotations=anns,
                            info={"stats": stats.as_dict()})
    written = json.loads(out.read_text())
    assert [img["id"] for img in written["images"]] == [1]
    assert written["categories"] == data["categories"] and written["info"]["stats"]["labels_kept"] == 2
    loaded = load_image_labels(DatasetSpec("labels", path, tmp_path), pseudo_boxes=out)
    assert [r.image_id for r in loaded.records] == [1]
    np.testing.assert_array_equal(loaded.records[0].boxes, BOXES[[2, 0]])
    np.testing.assert_array_equal(loaded.records[0].category_ids, [10, 20])


def test_precision_against_true_boxes():
    gt = DetectionDataset(
        name="gt", json_file=Path("gt.json"), novel_category_ids=(30,),
        categories=[{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, "ABC")],
        records=[ImageRecord(1, Path("1.png"), 100, 100, boxes=np.array([[0, 0, 10, 10], [50, 50, 70, 60]], np.float32),
                             category_ids=np.array([10, 30]))],
    )
    anns = [
        {"image_id": 1, "category_id": 10, "bbox": [1, 0, 10, 10]},   # IoU 9/11 with the A box: correct
        {"image_id": 1, "category_id": 30, "bbox": [50, 50, 10, 10]},  # IoU 0.5 with the C box: correct (>=)
        {"image_id": 1, "category_id": 30, "bbox": [60, 50, 10, 10]},  # IoU 0.5 too
        {"image_id": 1, "category_id": 20, "bbox": [0, 0, 10, 10]},    # on the A box, but labelled B
        {"image_id": 1, "category_id": 10, "bbox": [5, 0, 10, 10]},    # IoU 1/3
    ]
    p = pseudo_box_precision(anns, gt, novel_category_ids=(30,))
    assert p["all"] == {"boxes": 5, "correct": 3, "precision": 0.6}
    assert p["novel"] == {"boxes": 2, "correct": 2, "precision": 1.0}
    assert p["base"] == {"boxes": 3, "correct": 1, "precision": 1 / 3}
    assert p["per_class"]["B"] == {"split": "base", "boxes": 1, "correct": 0, "precision": 0.0}
    assert np.isnan(pseudo_box_precision([], gt)["all"]["precision"])
    with pytest.raises(ValueError, match="image 7"):
        pseudo_box_precision([{"id": 1, "image_id": 7, "category_id": 10, "bbox": [0, 0, 1, 1]}], gt)


def test_import_validates_and_converts(image_label_file, tmp_path):
    path, data = image_label_file
    dataset = load_image_labels(DatasetSpec("labels", path, tmp_path))
    boxes = [
        {"image_id": 1, "category_id": 10, "bbox": [90, 90, 20, 20], "score": 0.9},  # clipped to the image
        {"image_id": 1, "category_id": 10, "bbox": [0, 0, 5, 5], "score": 0.95},     # same label, higher: kept
        {"image_id": 1, "category_id": 30, "bbox": [0, 0, 5, 5], "score": 0.9},      # not a label of image 1
        {"image_id": 1, "category_id": 20, "bbox": [200, 0, 5, 5], "score": 0.9},    # outside: zero area
        {"image_id": 2, "category_id": 10, "bbox": [90, 90, 20, 20]},                # no score: 1, clipped
        {"image_id": 3, "category_id": 30, "bbox": [0, 0, 5, 5], "score": 0.1},      # below the threshold
    ]
    (tmp_path / "other.json").write_text(json.dumps({"annotations": boxes}))
    anns, stats = import_pseudo_boxes(tmp_path / "other.json", dataset.records, threshold=0.5)
    assert [(a["image_id"], a["category_id"], a["bbox"], a["score"]) for a in anns] == [
        (1, 10, [0.0, 0.0, 5.0, 5.0], 0.95), (2, 10, [90.0, 90.0, 10.0, 10.0], 1.0)]
    assert stats.as_dict() == {
        "boxes_read": 6, "boxes_not_image_label": 1, "boxes_zero_area": 1, "boxes_clipped": 1,
        "boxes_below_threshold": 1, "boxes_duplicate": 1, "boxes_without_score": 1, "labels_kept": 2,
        "images_kept": 2, "images_dropped": 1,
    }

    (tmp_path / "unknown.json").write_text(json.dumps({"annotations": [
        {"image_id": 8, "category_id": 10, "bbox": [0, 0, 5, 5]},
        {"image_id": 4, "category_id": 10, "bbox": [0, 0, 5, 5]}]}))
    with pytest.raises(ValueError, match=r"unknown.json has boxes for 2 image ids .*\[4, 8\]"):
        import_pseudo_boxes(tmp_path / "unknown.json", dataset.records)
    (tmp_path / "malformed.json").write_text(json.dumps({"annotations": [{"image_id": 1, "bbox": [0, 0, 5, 5]}]}))
    with pytest.raises(ValueError, match="malformed.json: annotation 0"):
        import_pseudo_boxes(tmp_path / "malformed.json", dataset.records)


def write_store(path, proposals_file, boxes_by_image, dim=4):
    ids = sorted(boxes_by_image)
    writer = RegionStoreWriter(path, job={"model_name": "m", "dim": dim, "proposals_file": str(proposals_file)})
    boxes = np.concatenate([boxes_by_image[i] for i in ids])
    writer.write_chunk(0, image_ids=np.array(ids), counts=np.array([len(boxes_by_image[i]) for i in ids]),
                       boxes=boxes, embeds=np.tile(EMBEDS[:1], (len(boxes), 1)))
    writer.finalize([0])


def test_store_regions_read_objectness_from_the_proposals(tmp_path):
    proposals = tmp_path / "proposals.json"
    # Proposals stick out of the 100 px image; the store holds them clipped, in another order, one left out.
    save_proposals(proposals, {1: (np.array([[0, 0, 120, 50], [10, 10, 20, 20], [5, 5, 50, 50]]),
                                   np.array([0.7, 0.2, 0.9]))})
    write_store(tmp_path / "store", proposals, {1: np.array([[5, 5, 50, 50], [0, 0, 100, 50]], np.float32),
                                                2: np.zeros((0, 4), np.float32)})
    regions = open_store_regions(tmp_path / "store", image_sizes={1: (100, 100), 2: (100, 100)})
    found = regions(record(1, [10]))
    np.testing.assert_array_equal(found.objectness, np.array([0.9, 0.7], np.float32))
    assert len(regions(record(2, [10])).boxes) == 0 and len(regions(record(3, [10])).boxes) == 0
    no_objectness = open_store_regions(tmp_path / "store", image_sizes={}, with_objectness=False)
    assert no_objectness(record(1, [10])).objectness is None

    write_store(tmp_path / "stranger", proposals, {1: np.array([[60, 60, 90, 90]], np.float32)})
    with pytest.raises(ValueError, match="image 1: region store .* another proposals file"):
        open_store_regions(tmp_path / "stranger", image_sizes={1: (100, 100)})(record(1, [10]))
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        open_store_regions(tmp_path / "store", image_sizes={1: (100, 100)}, proposals_file=tmp_path / "nowhere.json")


def test_store_regions_check_the_proposals_checksum(tmp_path):
    proposals = tmp_path / "proposals.json"
    save_proposals(proposals, {1: (np.array([[0, 0, 10, 10]]), np.array([0.5]))})
    writer = RegionStoreWriter(tmp_path / "store", job={"model_name": "m", "dim": 4, "proposals_file": str(proposals),
                                                         "proposals_sha256": "0" * 64})
    writer.write_chunk(0, image_ids=np.array([1]), counts=np.array([1]), boxes=np.array([[0, 0, 10, 10]]),
                       embeds=EMBEDS[:1])
    writer.finalize([0])
    with pytest.raises(ValueError, match="not the one region store"):
        open_store_regions(tmp_path / "store", image_sizes={1: (100, 100)})
    assert isinstance(open_store_regions(tmp_path / "store", image_sizes={}, with_objectness=False), StoreRegions)


def test_end_to_end_on_a_tiny_shapes_world(tmp_path):
    root = make_shapes_world(tmp_path / "shapes", num_train=12, num_val=4, image_size=128, seed=3)
    labels, images = root / "annotations" / "train_image_labels.json", root / "images" / "train"
    gt = root / "annotations" / "train_all.json"
    proposals = tmp_path / "proposals.json"
    make_oracle_proposals(gt, proposals, seed=0)
    toy = load_clip("ovd-toy-vit", seed=0)
    extract_region_embeddings(toy, dataset_json=labels, image_root=images, proposals_file=proposals,
                              out_dir=tmp_path / "store", top_k=20, progress=False)
    names = [c["name"] for c in json.loads(labels.read_text())["categories"]]
    text = save_text_embeddings(tmp_path / "text.npy", encode_text(toy, names), names=names,
                                templates=["a photo of a {}"], model_name="ovd-toy-vit", pretrained=None)
    tool = load_tool("mine_pseudo_labels")
    common = ["--image-labels", str(labels), "--gt", str(gt), "--threshold", "0", "--logit-scale", "100",
              "--no-progress"]
    info = tool.main([*common, "--region-store", str(tmp_path / "store"), "--text-embeddings", str(text),
                      "--out", str(tmp_path / "a.json")])
    tool.main([*common, "--region-store", str(tmp_path / "store"), "--text-embeddings", str(text),
               "--out", str(tmp_path / "b.json")])
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()

    num_labels = sum(len(i["pos_category_ids"]) for i in json.loads(labels.read_text())["images"])
    assert info["stats"]["labels"] == info["stats"]["labels_kept"] == num_labels  # threshold 0 keeps every label
    assert info["precision"]["all"]["boxes"] == num_labels
    assert set(info["precision"]) == {"all", "base", "novel", "per_class"}
    dataset = load_image_labels(DatasetSpec("l", labels, images), pseudo_boxes=tmp_path / "a.json")
    assert sum(len(r.boxes) for r in dataset.records) == num_labels

    # Encoding on the fly from the proposals chooses the same boxes (store embeddings are float16, so scores differ
    # in the last digits).
    tool.main([*common, "--proposals", str(proposals), "--model", "ovd-toy-vit", "--random-init", "--image-root",
               str(images), "--out", str(tmp_path / "c.json")])
    stored, fresh = (json.loads((tmp_path / f).read_text())["annotations"] for f in ("a.json", "c.json"))
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in stored] == [
        (a["image_id"], a["category_id"], a["bbox"]) for a in fresh]
    np.testing.assert_allclose([a["score"] for a in stored], [a["score"] for a in fresh], atol=1e-2)

    # Import mode re-writes the mined file as it is.
    tool.main(["--image-labels", str(labels), "--import", str(tmp_path / "a.json"), "--out", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["annotations"] == stored
