"""ONNX export (issue #8): onnxruntime on CPU gives the final detections of eager PyTorch."""

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ovd.inference import Detector
from ovd.inference.export import OnnxDetector, export_onnx

from inference_helpers import CONFIG
from tools_loader import load_tool

# τ = 10 keeps the random model's sigmoid scores off 1.0, where ties would make the NMS order arbitrary
COOL = ["MODEL.ROI_BOX_HEAD.NORM_TEMP", "10"]
SIZE = (180, 240)


# `files` (a tiny trained-detector folder) and `cache` (a private OVD_CACHE) come from conftest.py
pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture(scope="module")
def photos():
    return [np.asarray(Image.fromarray(im).resize(SIZE[::-1])) for im in (skdata.astronaut(), skdata.coffee())]


def assert_same_detections(eager, exported):
    """The same detections, each exported one matched to an eager one of its class, score (1e-5) and box (1e-2 px);
    the order may differ where scores tie to float32 round-off (ONNX Runtime's kernels round unlike torch's)."""
    assert len(exported) == len(eager)
    left = list(range(len(exported)))
    for c, s, b in zip(eager.class_ids, eager.scores, eager.boxes):
        match = [j for j in left if exported.class_ids[j] == c and abs(exported.scores[j] - s) <= 1e-5
                 and np.abs(exported.boxes[j] - b).max() <= 1e-2]
        assert match, f"no exported detection of class {c}, score {s}, box {b}"
        left.remove(match[0])
    np.testing.assert_allclose(exported.scores, eager.scores, atol=1e-5)  # in the same score order


@pytest.mark.parametrize("extra", [[], ["MODEL.ROI_HEADS.TOPK_CANDIDATES_TEST", "0"]], ids=["topk", "threshold"])
def test_onnxruntime_equals_eager(files, photos, tmp_path, extra):
    det = Detector.from_config(CONFIG, files.weights, overrides=files.overrides + COOL + extra)
    det.set_vocabulary(["red circle", "blue star", "stapler"])
    path = export_onnx(det, tmp_path / "det.onnx", image_size=SIZE)
    exported = OnnxDetector(path)
    assert exported.meta["class_names"] == ["red circle", "blue star", "stapler"]
    assert det.model.roi_heads.box_predictor.cls_score.__class__.__name__ == "ZeroShotClassifier"  # left unfused
    for photo in photos:
        eager = det(photo)
        assert len(eager) > 10
        assert_same_detections(eager, exported(photo))
    with pytest.raises(ValueError, match="exported for 180x240"):
        exported(photos[0][:100])


def test_no_detection(files, photos, tmp_path):
    det = Detector.from_config(CONFIG, files.weights, overrides=files.overrides + COOL +
                               ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.9999"])
    exported = OnnxDetector(export_onnx(det, tmp_path / "det.onnx", image_size=SIZE))
    found = exported(photos[0])
    assert len(det(photos[0])) == 0 and len(found) == 0 and found.boxes.shape == (0, 4)


def test_cli_exports_and_checks(files, photos, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(photos[1]).save(image)
    out = tmp_path / "cli.onnx"
    rc = load_tool("export_onnx").main([
        "--config-file", CONFIG, "--weights", str(files.weights), "--vocabulary", "shapes",
        "--image-size", *map(str, SIZE), "--output", str(out), "--check", str(image), *files.overrides, *COOL])
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file(), printed
    assert "16 classes" in printed and "max |score difference|" in printed
