import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovd.data.catalog import DatasetSpec, get_dataset
from ovd.data.datasets import load_coco_json
from ovd.data.images import ResizeFlip, shortest_edge_size
from ovd.data.mapper import DatasetMapper
from ovd.data.samplers import InferenceBatchSampler, TrainingBatchSampler


def test_shortest_edge_size_matches_detectron2():
    assert shortest_edge_size(400, 300, 320, 640) == (427, 320)  # the parity fixture's image 2
    assert shortest_edge_size(320, 480, 320, 640) == (320, 480)
    assert shortest_edge_size(100, 1000, 800, 1333) == (133, 1333)  # long side capped


def test_boxes_follow_resize_and_flip():
    tf = ResizeFlip((100, 200), (50, 100), flip=True)
    boxes = np.array([[10.0, 20.0, 50.0, 60.0]], dtype=np.float32)
    out = tf.apply_boxes(boxes)
    # scale by 0.5, then x -> W - x with W = 100
    np.testing.assert_allclose(out, [[100 - 25, 10, 100 - 5, 30]])
    img = np.zeros((100, 200, 3), np.uint8)
    img[20:60, 10:50] = 255
    warped = tf.apply_image(img)
    ys, xs = np.nonzero(warped[..., 0] > 127)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (75, 10, 95, 30)


def write_coco(tmp_path, images, annotations, categories=({"id": 1, "name": "a"}, {"id": 2, "name": "b"})):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return DatasetSpec("t", path, tmp_path / "img")


def test_dataset_clips_and_drops_boxes(tmp_path, caplog):
    spec = write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}], [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-5, 2, 10, 5]},    # clipped
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 2, 10, 5]},    # outside: dropped
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [3, 3, 0, 5]},      # zero area: dropped
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [3, 3, 4, 5]},
    ])
    ds = load_coco_json(spec)
    r = ds.records[0]
    np.testing.assert_allclose(r.boxes, [[0, 2, 5, 7], [3, 3, 7, 8]])
    assert r.category_ids.tolist() == [1, 2]
    assert "2 boxes clipped" in caplog.text and "2 of zero area dropped" in caplog.text
    assert ds.class_image_counts().tolist() == [1, 1]


@pytest.mark.parametrize("images,anns,match", [
    ([{"id": 1, "file_name": "a.png", "height": 2, "width": 2}],
     [{"id": 7, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}], "annotation 7 has category_id 9"),
    ([{"id": 1, "file_name": "a.png", "height": 2, "width": 2}],
     [{"id": 8, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1]}], "annotation 8 refers to image_id 5"),
    ([], [], "has no images"),
    ([{"id": 1, "file_name": "../../etc/passwd", "height": 2, "width": 2}], [], "outside the image folder"),
    ([{"id": 1, "file_name": "a.png"}], [], "needs id, file_name, height and width"),
])
def test_dataset_errors_name_the_culprit(tmp_path, images, anns, match):
    spec = write_coco(tmp_path, images, anns)
    with pytest.raises(ValueError, match=match) as e:
        load_coco_json(spec)
    assert "ann.json" in str(e.value) or "dataset t" in str(e.value)


def test_not_a_coco_file(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"x\.json is not a COCO annotation file"):
        load_coco_json(DatasetSpec("t", tmp_path / "x.json", tmp_path))


def test_mapper_missing_and_corrupt_image(tmp_path):
    spec = write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "height": 4, "width": 4},
                                 {"id": 2, "file_name": "b.png", "height": 4, "width": 4}], [])
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "b.png").write_bytes(b"not a png")
    ds = load_coco_json(spec)
    mapper = DatasetMapper(is_train=False, min_sizes=[4], max_size=4, category_ids=ds.category_ids)
    with pytest.raises(FileNotFoundError, match=r"image 1 not found: .*a\.png"):
        mapper(ds.records[0])
    with pytest.raises(OSError, match=r"cannot read image 2 .*b\.png"):
        mapper(ds.records[1])


def test_mapper_train_sample(tmp_path):
    spec = write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "height": 20, "width": 40}],
                      [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10]}])
    (tmp_path / "img").mkdir()
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[..., 0] = 200  # red
    Image.fromarray(rgb).save(tmp_path / "img" / "a.png")
    ds = load_coco_json(spec)
    mapper = DatasetMapper(is_train=True, min_sizes=[10], max_size=100, random_flip=True, input_format="BGR",
                           category_ids=ds.category_ids)
    flips = set()
    for seed in range(8):
        s = mapper(ds.records[0], np.random.default_rng(seed))
        assert s.image.shape == (3, 10, 20) and s.image.dtype == torch.uint8
        assert int(s.image[2].float().mean()) == 200 and int(s.image[0].max()) == 0  # BGR: red is the last channel
        assert s.gt.gt_classes.tolist() == [1]  # contiguous index of category id 2
        flips.add(tuple(s.gt.gt_boxes[0].tolist()))
    assert flips == {(0.0, 0.0, 5.0, 5.0), (15.0, 0.0, 20.0, 5.0)}


def test_training_sampler_is_deterministic_resumable_and_sharded():
    full = TrainingBatchSampler(10, batch_size=4, seed=3)
    stream = [b for _, b in zip(range(6), iter(full))]
    again = [b for _, b in zip(range(6), iter(TrainingBatchSampler(10, batch_size=4, seed=3)))]
    assert stream == again
    resumed = [b for _, b in zip(range(2), iter(TrainingBatchSampler(10, batch_size=4, seed=3, start_iter=4)))]
    assert resumed == stream[4:6]
    # every epoch visits each image once
    flat = [i for b in stream for i, _ in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    # two ranks split each global batch
    r0 = next(iter(TrainingBatchSampler(10, batch_size=4, seed=3, rank=0, world_size=2)))
    r1 = next(iter(TrainingBatchSampler(10, batch_size=4, seed=3, rank=1, world_size=2)))
    assert r0 + r1 == stream[0]
    assert len({seed for _, seed in r0 + r1}) == 4
    with pytest.raises(ValueError, match="not divisible"):
        TrainingBatchSampler(10, batch_size=3, seed=0, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        TrainingBatchSampler(0, batch_size=2, seed=0)


def test_inference_sampler_covers_every_image_once():
    parts = [[i for b in InferenceBatchSampler(7, batch_size=2, rank=r, world_size=3) for i, _ in b] for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(7))


def test_catalog_resolves_shapes_under_ovd_datasets(tiny_world):
    root, _ = tiny_world
    spec = get_dataset("shapes_val")
    assert spec.json_file == root / "shapes" / "annotations" / "val.json"
    assert spec.novel_category_ids == (12, 13, 14, 15, 16)
    with pytest.raises(KeyError, match="unknown dataset 'nope'.*shapes_val"):
        get_dataset("nope")
