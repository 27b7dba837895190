"""The inference API: `ovd.Detector`, vocabularies and their text-embedding cache, fuse, drawing."""

import copy
import os
from pathlib import Path

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import ovd
from ovd.clip import encode_text, load_clip, save_clip, save_text_embeddings
from ovd.config import load_config
from ovd.engine.checkpoint import CheckpointError
from ovd.inference import Detections, Detector, TextEncoder, Vocabulary, parse_vocabulary, preset_vocabulary
from ovd.modeling.build import build_model
from ovd.modeling.classifier import FusedClassifier, WeightTransferClassifier, ZeroShotClassifier

from inference_helpers import CONFIG, SHAPES_NAMES


# `files` (a tiny trained-detector folder) and `cache` (a private OVD_CACHE) come from conftest.py
pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture
def det(files):
    return Detector.from_config(CONFIG, files.weights, overrides=files.overrides)


@pytest.fixture(scope="module")
def photo():
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((240, 180)))  # H 180, W 240, RGB


def test_lazy_export():
    assert ovd.Detector is Detector


def test_detect_on_every_input_kind(det, photo, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    from_array = det(photo)
    assert isinstance(from_array, Detections) and len(from_array) > 0
    assert from_array.image_size == (180, 240)
    assert (from_array.boxes[:, [0, 2]] <= 240).all() and (from_array.boxes[:, [1, 3]] <= 180).all()
    assert (np.diff(from_array.scores) <= 0).all()
    assert set(from_array.class_names) <= set(SHAPES_NAMES)
    assert from_array.class_names == [SHAPES_NAMES[i] for i in from_array.class_ids]
    assert from_array.masks is None
    bgr = photo[:, :, ::-1].copy()
    for other in (det(str(path)), det(path), det(Image.fromarray(photo)), det(bgr, input_format="BGR")):
        np.testing.assert_array_equal(other.boxes, from_array.boxes)
        np.testing.assert_array_equal(other.class_ids, from_array.class_ids)
    grey = det(photo[:, :, 0])
    assert grey.image_size == (180, 240)
    both = det([photo, path])
    assert isinstance(both, list) and len(both) == 2
    np.testing.assert_array_equal(both[1].scores, from_array.scores)
    assert len(det(photo, score_threshold=0.5)) == int((from_array.scores >= 0.5).sum())


def test_bad_images(det, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        det(tmp_path / "missing.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(OSError, match="broken.jpg"):
        det(broken)
    with pytest.raises(ValueError, match="uint8"):
        det(np.zeros((20, 20, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="PIL image"):
        det(torch.zeros(3, 20, 20))


def test_vocabulary_swap_changes_classes_without_reloading(det, photo):
    model, backbone_weight = det.model, next(det.model.backbone.parameters())
    before = det(photo)
    det.set_vocabulary(["red mug", "stapler"])
    after = det(photo)
    assert det.model is model and next(det.model.backbone.parameters()) is backbone_weight
    assert det.model.roi_heads.num_classes == 2 and det.vocabulary.names == ("red mug", "stapler")
    assert len(after) > 0 and set(after.class_names) <= {"red mug", "stapler"}
    assert set(after.class_ids.tolist()) <= {0, 1}
    assert after.category_ids.tolist() == (after.class_ids + 1).tolist()
    det.set_vocabulary("shapes")
    again = det(photo)
    np.testing.assert_allclose(again.scores, before.scores, rtol=1e-5)
    assert again.class_names == before.class_names


def test_training_names_need_no_text_tower(det, files):
    det.set_vocabulary(["blue circle", "red circle"])
    assert det.text_encoder._bundle is None
    train = det.text_encoder.known.embeds
    cls_embeds = det.model.roi_heads.box_predictor.cls_score.text_embeds
    np.testing.assert_allclose(cls_embeds.numpy(), train[[1, 0]], atol=1e-6)


def test_cache_miss_then_hit(files, cache):
    names = ["red mug", "stapler", "green circle"]
    encoder = TextEncoder(f"local-dir:{files.clip_dir}")
    path = encoder.cache_path(names, ["a photo of a {}"])
    assert not path.exists()
    first = encoder.encode(names)
    assert path.is_file() and path.with_suffix(".json").is_file() and encoder._bundle is not None
    fresh = TextEncoder(f"local-dir:{files.clip_dir}")
    again = fresh.encode(names)
    assert fresh._bundle is None  # served from disk, the tower never loaded
    torch.testing.assert_close(again, first)
    direct = encode_text(load_clip(f"local-dir:{files.clip_dir}"), names)
    torch.testing.assert_close(first, direct)
    # the key covers the prompts, the names and their order
    assert encoder.cache_path(names, ["a {}"]) != path
    assert encoder.cache_path(names[::-1], ["a photo of a {}"]) != path
    ensemble = fresh.encode(names, ["a photo of a {}", "a drawing of a {}"])
    assert not torch.allclose(ensemble, first)


def test_cache_misses_when_the_weights_change(files, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for f in files.clip_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    encoder = TextEncoder(f"local-dir:{folder}")
    before = encoder.cache_path(["stapler"], ["{}"])
    weights = next(folder.glob("*.bin"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert encoder.cache_path(["stapler"], ["{}"]) != before


def test_bad_vocabularies(det):
    with pytest.raises(ValueError, match="empty"):
        det.set_vocabulary([])
    with pytest.raises(ValueError, match="duplicate class names: \\['stapler'\\]"):
        det.set_vocabulary(["stapler", "mug", "stapler"])
    with pytest.raises(ValueError, match="blank"):
        det.set_vocabulary(["mug", " "])
    # the toy CLIP's context is 16 tokens
    with pytest.raises(ValueError, match="exceed the text tower's 16 tokens"):
        det.set_vocabulary(["a very long name " * 4])
    with pytest.raises(ValueError, match="preset"):
        det.set_vocabulary("stapler")
    with pytest.raises(ValueError, match="unknown vocabulary preset"):
        preset_vocabulary("imagenet")
    assert det.vocabulary.names == tuple(SHAPES_NAMES)  # a refused vocabulary leaves the old one in place


def test_text_model_unknown(files, tmp_path, photo):
    # training embeddings with names but without the text model that made them
    plain = tmp_path / "plain.npy"
    np.save(plain, np.load(files.overrides[-1]))
    (tmp_path / "plain.json").write_text('{"names": ' + str(SHAPES_NAMES).replace("'", '"') + "}")
    overrides = files.overrides[:-1] + [str(plain)]
    det = Detector.from_config(CONFIG, files.weights, overrides=overrides)
    with pytest.raises(ValueError, match="text_encoder="):
        det.set_vocabulary(["stapler"])
    det.set_vocabulary(["green ring", "white cross"])  # training names still work
    ready = tmp_path / "ready.npy"
    save_text_embeddings(ready, torch.nn.functional.normalize(torch.randn(3, 128), dim=1), names=["a", "b", "c"],
                         templates=["{}"], model_name="elsewhere", pretrained=None)
    det.set_vocabulary(ready)
    assert det.vocabulary.names == ("a", "b", "c")
    assert set(det(photo).class_names) <= {"a", "b", "c"}
    explicit = Detector.from_config(CONFIG, files.weights, overrides=overrides,
                                    text_encoder=f"local-dir:{files.clip_dir}")
    explicit.set_vocabulary(["stapler"])
    with pytest.raises(ValueError, match="text_encoder_weights"):
        Detector.from_config(CONFIG, files.weights, overrides=overrides, text_encoder="ViT-B-32")


def test_another_text_tower_embeds_training_names_too(files, tmp_path):
    other = save_clip(load_clip("ovd-toy-vit", seed=1), tmp_path / "other_clip")
    det = Detector.from_config(CONFIG, files.weights, overrides=files.overrides, text_encoder=f"local-dir:{other}")
    det.set_vocabulary(["red circle"])  # a training name, but the training row is the other tower's
    expected = encode_text(load_clip(f"local-dir:{other}"), ["red circle"])
    torch.testing.assert_close(det.model.roi_heads.box_predictor.cls_score.text_embeds, expected)


def test_test_vocabulary_from_config(files, tmp_path):
    ready = tmp_path / "test_vocab.npy"
    save_text_embeddings(ready, torch.nn.functional.normalize(torch.randn(2, 128), dim=1), names=["x", "y"],
                         templates=["{}"], model_name="elsewhere", pretrained=None)
    det = Detector.from_config(CONFIG, files.weights,
                               overrides=files.overrides + ["MODEL.TEST_ZEROSHOT_WEIGHT_PATH", str(ready)])
    assert det.vocabulary.names == ("x", "y") and det.model.roi_heads.num_classes == 2


def test_random_text_tower_without_seed(files, tmp_path):
    emb = tmp_path / "random.npy"
    save_text_embeddings(emb, np.load(files.overrides[-1]), names=SHAPES_NAMES, templates=["a photo of a {}"],
                         model_name="ovd-toy-vit", pretrained=None)
    det = Detector.from_config(CONFIG, files.weights, overrides=files.overrides[:-1] + [str(emb)])
    with pytest.raises(ValueError, match="seed was not recorded"):
        det.set_vocabulary(["stapler"])


def test_checkpoint_of_another_architecture(files, tmp_path):
    state = torch.load(files.weights, weights_only=True)["model"]
    state = {k.replace("fc1", "fc_first"): v for k, v in state.items() if "rpn" not in k}
    other = tmp_path / "other.pth"
    torch.save({"model": state}, other)
    with pytest.raises(CheckpointError, match="(?s)missing keys.*rpn.head.*unexpected keys.*fc_first"):
        Detector.from_config(CONFIG, other, overrides=files.overrides)
    with pytest.raises(ValueError, match="no detector weights"):
        Detector.from_config(CONFIG, overrides=files.overrides)


@pytest.mark.parametrize("cls", [ZeroShotClassifier, WeightTransferClassifier])
@pytest.mark.parametrize("bias", [None, -4.6])
def test_fused_classifier_equals_unfused(cls, bias):
    torch.manual_seed(0)
    extra = {"hidden_dim": 48} if cls is WeightTransferClassifier else {}
    classifier = cls(in_dim=64, text_embeds=torch.randn(10, 32), bias_init=bias, **extra)
    x = torch.randn(7, 64)
    fused = classifier.fuse()
    assert isinstance(fused, FusedClassifier) and fused.num_classes == 10 and fused.fuse() is fused
    torch.testing.assert_close(fused(x), classifier(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.text_embeds, classifier.text_embeds)
    vocab = torch.randn(4, 32)
    classifier.set_vocabulary(vocab)
    fused.set_vocabulary(vocab)
    torch.testing.assert_close(fused(x), classifier(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[C, 32\]"):
        fused.set_vocabulary(torch.randn(4, 16))


def test_fused_detector_equals_unfused(det, photo):
    fused = copy.deepcopy(det).fuse()
    assert isinstance(fused.model.roi_heads.box_predictor.cls_score, FusedClassifier)
    norms = ("FrozenBatchNorm2d", "BatchNorm2d")
    assert any(type(m).__name__ in norms for m in det.model.modules())
    assert not any(type(m).__name__ in norms for m in fused.model.modules())  # folded into their convs
    a, b = det(photo), fused(photo)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    fused.set_vocabulary(["stapler", "red circle"])
    det.set_vocabulary(["stapler", "red circle"])
    np.testing.assert_allclose(det(photo).scores, fused(photo).scores, atol=1e-5)


def test_masks_draw_and_coco(files, photo, tmp_path):
    overrides = files.overrides + ["MODEL.MASK_ON", "true", "MODEL.ROI_MASK_HEAD.CONV_DIM", "8",
                                   "MODEL.ROI_MASK_HEAD.NUM_CONV", "1"]
    torch.manual_seed(0)
    weights = tmp_path / "mask_rcnn.pth"
    torch.save({"model": build_model(load_config(CONFIG, overrides)).state_dict()}, weights)
    det = Detector.from_config(CONFIG, weights, overrides=overrides)
    found = det(photo)[:5]
    assert found.masks.shape == (5, 180, 240) and found.masks.dtype == bool
    drawn = found.draw(photo)
    assert drawn.shape == photo.shape and drawn.dtype == np.uint8 and not np.array_equal(drawn, photo)
    with pytest.raises(ValueError, match="belong to a 180x240 image"):
        found.draw(photo[:100])
    coco = found.to_coco(image_id=7)
    x0, y0, x1, y1 = found.boxes[0].tolist()
    assert coco[0]["image_id"] == 7 and coco[0]["category_name"] == found.class_names[0]
    np.testing.assert_allclose(coco[0]["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=0.01)
    from pycocotools import mask as mask_utils

    assert (mask_utils.decode(coco[0]["segmentation"]).astype(bool) == found.masks[0]).all()
    nothing = found[found.scores > 2]
    assert len(nothing) == 0 and nothing.to_coco() == [] and nothing.draw(photo).shape == photo.shape


def test_presets_and_parsing(tmp_path, monkeypatch):
    coco = preset_vocabulary("coco")
    assert len(coco) == 80 and len(set(coco.names)) == 80 and coco.category_ids[-1] == 90
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"lvis_v1_val\.json"):
        preset_vocabulary("lvis")
    (tmp_path / "lvis").mkdir()
    cats = [{"id": 2, "name": "bat_(animal)", "synonyms": ["bat"]}, {"id": 1, "name": "aerosol_can", "synonyms": []}]
    (tmp_path / "lvis" / "lvis_v1_val.json").write_text(json.dumps({"categories": cats, "images": [], "annotations": []}))
    lvis = preset_vocabulary("lvis")
    assert lvis.names == ("aerosol can", "bat (animal)") and lvis.category_ids == (1, 2)
    assert preset_vocabulary("shapes").names == tuple(SHAPES_NAMES)
    assert parse_vocabulary("red mug, stapler") == Vocabulary(("red mug", "stapler"), (1, 2))
    names = tmp_path / "names.txt"
    names.write_text("red mug\n\nstapler\n")
    assert parse_vocabulary(str(names)).names == ("red mug", "stapler")
    assert parse_vocabulary("emb.npy") == Path("emb.npy")
    with pytest.raises(ValueError, match="duplicate"):
        parse_vocabulary("a,b,a")
    with pytest.raises(ValueError, match="blank"):
        parse_vocabulary("a,,b")
