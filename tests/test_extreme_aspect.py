"""Images of any size >= 1x1 are detected: under the long-side cap an extreme aspect ratio used to round
the short side to 0 px, and the resize refused the image. Every path that resizes is covered: the size rule itself,
`ovd.Detector`, `tools/demo.py`, the ONNX exporter and the training mapper."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovd.config import load_config
from ovd.data.datasets import ImageRecord
from ovd.data.images import shortest_edge_size
from ovd.data.mapper import DatasetMapper
from ovd.inference import Detector
from ovd.modeling.build import build_model

from inference_helpers import CONFIG
from tools_loader import load_tool

# `files` (a tiny trained-detector folder) and `cache` (a private OVD_CACHE) come from conftest.py
pytestmark = pytest.mark.usefixtures("cache")

# the random tiny detector scores the few pixels of a 1 px high input low: keep every candidate
ALL_SCORES = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0"]
SIZES = [(20, 20000), (20000, 20), (1, 1), (1, 5000), (3, 2)]  # (H, W); the tiny config resizes to 128 / 128


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("h", "w", "short", "max_size", "expected"), [
    (20, 20000, 128, 128, (1, 128)),  # 0.128 px high before the clamp
    (20000, 20, 128, 128, (128, 1)),
    (20, 20000, 800, 1333, (1, 1333)),  # detectron2's sizes already give 1 px here
    (1, 1, 800, 1333, (800, 800)),
    (1, 100000, 800, 1333, (1, 1333)),
    (320, 480, 320, 640, (320, 480)),  # ordinary sizes are detectron2's
    (400, 300, 320, 640, (427, 320)),
])
def test_resized_sides_are_at_least_one_pixel(h, w, short, max_size, expected):
    assert shortest_edge_size(h, w, short, max_size) == expected


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_detector(files, h, w):
    det = Detector.from_config(CONFIG, files.weights, overrides=files.overrides + ALL_SCORES)
    found = det(noise(h, w))
    assert len(found) > 0 and found.image_size == (h, w)
    assert (found.boxes >= 0).all() and (found.boxes[:, [0, 2]] <= w).all() and (found.boxes[:, [1, 3]] <= h).all()


def test_demo_tool(files, tmp_path, capsys):
    """The reported case: a 20000x20 PNG used to be skipped with "height and width must be > 0"."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(noise(20, 20000)).save(inputs / "wide.png")
    Image.fromarray(noise(1, 1)).save(inputs / "dot.png")
    rc = load_tool("demo").main(["--config-file", CONFIG, "--weights", str(files.weights), "--input", str(inputs),
                                 "--output", str(tmp_path / "out"), *files.overrides, *ALL_SCORES])
    captured = capsys.readouterr()
    assert rc == 0 and "skipped" not in captured.err, captured.err
    result = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {(i["height"], i["width"]) for i in result["images"]} == {(20, 20000), (1, 1)}
    with Image.open(tmp_path / "out" / "wide.png") as im:
        assert im.size == (20000, 20)


def test_exporter(files):
    """The graph's module runs on the clamped 1x128 input of a 20x20000 image and maps boxes back into it (the
    ONNX round trip itself is tests/test_onnx_export.py's)."""
    from ovd.inference.detector_api import resize_for_model
    from ovd.inference.export import ExportableDetector

    det = Detector.from_config(CONFIG, files.weights, overrides=files.overrides + ALL_SCORES)
    module = ExportableDetector(det.model.eval())
    chw = resize_for_model(noise(20, 20000), min_size=det.min_size, max_size=det.max_size,
                           model_format=det.model.input_format)
    assert chw.shape[1:] == (1, 128)
    with torch.no_grad():
        boxes, scores, classes = module(torch.from_numpy(chw), torch.tensor([20, 20000]))
    assert len(boxes) > 0 and (boxes[:, [0, 2]] <= 20000).all() and (boxes[:, [1, 3]] <= 20).all()


def test_training_mapper_and_step(files, tmp_path):
    """A 20x20000 training image with a box keeps 1 px of height after the resize, and trains (finite losses)."""
    path = tmp_path / "wide.png"
    Image.fromarray(noise(20, 20000)).save(path)
    record = ImageRecord(0, path, 20, 20000, np.array([[100.0, 2.0, 5000.0, 18.0]], np.float32), np.array([1]))
    mapper = DatasetMapper(is_train=True, min_sizes=[128], max_size=128, random_flip=True, category_ids=[1, 2],
                           input_format="BGR")
    sample = mapper(record, np.random.default_rng(0))
    assert tuple(sample.image.shape) == (3, 1, 128) and sample.gt.image_size == (1, 128)
    np.testing.assert_allclose(sample.gt.gt_boxes[0, [1, 3]].numpy(), [0.1, 0.9], rtol=1e-5)
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG, files.overrides))
    model.train()
    losses = model.forward_train([sample])
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
