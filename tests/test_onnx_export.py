"""ONNX export (issues #8, #17): onnxruntime on CPU gives the final detections of eager PyTorch, on images of any
size, with the vocabulary folded in or given as an input."""

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
# original sizes; the test resize (min 128, max 128) makes inputs of 96x128, 128x128, 128x41 and 128x80 of them
SIZES = [SIZE, (128, 128), (300, 97), (400, 250)]


# `files` (a tiny trained-detector folder) and `cache` (a private OVD_CACHE) come from conftest.py
pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture(scope="module")
def photos():
    """Two photos at every size of SIZES (the graph was traced on one example size only)."""
    return [np.asarray(Image.fromarray(im).resize(hw[::-1])) for hw in SIZES
            for im in (skdata.astronaut(), skdata.coffee())]


def assert_same_detections(eager, exported):
    """The same detections, each exported one matched to an eager one of its class, score (1e-5) and box (1e-3 px);
    the order may differ where scores tie to float32 round-off (ONNX Runtime's kernels round unlike torch's)."""
    assert len(exported) == len(eager)
    left = list(range(len(exported)))
    for c, s, b in zip(eager.class_ids, eager.scores, eager.boxes):
        match = [j for j in left if exported.class_ids[j] == c and abs(exported.scores[j] - s) <= 1e-5
                 and np.abs(exported.boxes[j] - b).max() <= 1e-3]
        assert match, f"no exported detection of class {c}, score {s}, box {b}"
        left.remove(match[0])
    np.testing.assert_allclose(exported.scores, eager.scores, atol=1e-5)  # in the same score order


@pytest.mark.parametrize("extra", [[], ["MODEL.ROI_HEADS.TOPK_CANDIDATES_TEST", "0"]], ids=["topk", "threshold"])
def test_onnxruntime_equals_eager(files, photos, tmp_path, extra):
    det = Detector.from_config(CONFIG, files.weights, overrides=files.overrides + COOL + extra)
    det.set_vocabulary(["red circle", "blue star", "stapler"])
    path = export_onnx(det, tmp_path / "det.onnx")
    exported = OnnxDetector(path)
    assert exported.vocabulary.names == ("red circle", "blue star", "stapler")
    assert det.model.roi_heads.box_predictor.cls_score.__class__.__name__ == "ZeroShotClassifier"  # left unfused
    for photo in photos:
        eager = det(photo)
        assert len(eager) > 10
        found = exported(photo)
        assert found.image_size == photo.shape[:2]
        assert_same_detections(eager, found)
    with pytest.raises(ValueError, match="folded in"):
        exported.set_vocabulary(["x"], np.zeros((1, 128), np.float32))


def test_vocabulary_input(files, photos, tmp_path):
    """One graph, any vocabulary: its detections equal eager ones with that vocabulary set, for 1 to 300 classes."""
    det = Detector.from_config(CONFIG, files.weights, overrides=files.overrides + COOL)
    path = export_onnx(det, tmp_path / "det.onnx", vocabulary_input=True)
    exported = OnnxDetector(path)
    with pytest.raises(ValueError, match="set_vocabulary"):
        exported(photos[0])
    rng = np.random.default_rng(0)
    vocabularies = [["red circle", "blue star", "stapler"], ["stapler"],
                    [f"random {i}" for i in range(300)]]
    for names in vocabularies:
        if len(names) > 3:  # a large made-up vocabulary: random unit embeddings, set on both sides
            embeds = rng.standard_normal((len(names), 128)).astype(np.float32)
            embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
            np.save(tmp_path / "random.npy", embeds)
            det.set_vocabulary(str(tmp_path / "random.npy"))
            names = det.vocabulary.names
        else:
            det.set_vocabulary(names)
            embeds = det.model.roi_heads.box_predictor.cls_score.text_embeds.numpy()
        exported.set_vocabulary(names, embeds)
        for photo in photos[::3]:
            eager = det(photo)
            assert len(eager) > 0
            assert_same_detections(eager, exported(photo))
    with pytest.raises(ValueError, match=r"\[2, 128\]"):
        exported.set_vocabulary(["a", "b"], np.zeros((2, 64), np.float32))


def test_no_detection(files, photos, tmp_path):
    det = Detector.from_config(CONFIG, files.weights, overrides=files.overrides + COOL +
                               ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.9999"])
    exported = OnnxDetector(export_onnx(det, tmp_path / "det.onnx"))
    found = exported(photos[0])
    assert len(det(photos[0])) == 0 and len(found) == 0 and found.boxes.shape == (0, 4)


def test_cli_exports_and_checks(files, photos, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(photos[1]).save(image)
    out = tmp_path / "cli.onnx"
    rc = load_tool("export_onnx").main([
        "--config-file", CONFIG, "--weights", str(files.weights), "--vocabulary", "shapes",
        "--vocabulary-input", "--output", str(out), "--check", str(image), *files.overrides, *COOL])
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file(), printed
    assert "the vocabulary an input" in printed and "max |score difference|" in printed
