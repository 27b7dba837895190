"""Region embeddings for RKD: cropping, CLIP preprocessing, and the resumable, shardable extractor."""

import dataclasses
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from ovd.clip import load_clip
from ovd.clip.regions import RegionPreprocessor, crop_regions, encode_regions, select_regions
from ovd.data.images import read_image
from ovd.data.proposals import save_proposals
from ovd.clip.region_extraction import extract_region_embeddings
from ovd.data.region_store import RegionStore

TOOL = Path(__file__).resolve().parents[1] / "tools" / "extract_region_embeddings.py"
STORE_FILES = ("embeddings.npy", "boxes.npy", "index.npy", "meta.json")


@pytest.fixture(scope="module")
def toy():
    return load_clip("ovd-toy-vit", seed=0)


@pytest.fixture(scope="module")
def world(oracle_world):
    return oracle_world


def extract(toy, world, out, **kwargs):
    root, proposals = world
    kwargs = {"chunk_size": 3, "batch_size": 7, "progress": False, "proposals_file": proposals, **kwargs}
    return extract_region_embeddings(toy, dataset_json=root / "annotations" / "train_all.json",
                                     image_root=root / "images" / "train", out_dir=out, **kwargs)


def assert_same_store(a, b):
    for name in STORE_FILES:
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference(toy, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    return extract(toy, world, out), out


def test_crop_regions_is_the_exact_box():
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    crops = crop_regions(image, np.array([[1.2, 2.0, 4.0, 5.5], [-3, -3, 30, 30], [11.5, 9.5, 11.6, 9.6]]))
    np.testing.assert_array_equal(crops[0], image[2:6, 1:4])  # floor the low edges, ceil the high ones
    np.testing.assert_array_equal(crops[1], image)  # clipped to the image
    np.testing.assert_array_equal(crops[2], image[9:10, 11:12])  # at least one pixel
    assert crop_regions(image, np.zeros((0, 4))) == []


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_preprocessor_equals_clip_preprocess(toy, resize_mode):
    # "shortest" (every CLIP's) takes the direct PIL path; anything else runs the bundle's own transforms.
    cfg = {**toy.model.visual.preprocess_cfg, "resize_mode": resize_mode}
    bundle = dataclasses.replace(toy, preprocess=image_transform_v2(PreprocessCfg(**cfg), is_train=False))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    sizes = [(1, 1), (1, 40), (63, 64), (64, 64), (65, 64), (33, 97), (150, 200), (7, 5)]
    sizes += [tuple(s) for s in rng.integers(1, 150, (40, 2)).tolist()]
    crops = [image[:h, :w] for h, w in sizes] + [image[10:50, 20:31]]  # views, as crop_regions returns
    preprocessor = RegionPreprocessor(bundle)
    assert (preprocessor._resize_crop is not None) == (resize_mode == "shortest")
    expected = torch.stack([bundle.preprocess(Image.fromarray(np.ascontiguousarray(c))) for c in crops])
    assert torch.equal(preprocessor(crops), expected)
    buffer = torch.full((len(crops) + 2, 3, 64, 64), float("nan"))
    assert torch.equal(preprocessor.normalize(preprocessor.geometry(crops), out=buffer[: len(crops)]), expected)
    assert preprocessor([]).shape == (0, 3, 64, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_preprocessor_normalizes_on_cuda_as_on_cpu(toy):
    preprocessor = RegionPreprocessor(toy)
    crops = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    assert torch.equal(preprocessor.normalize(crops.cuda()).cpu(), preprocessor.normalize(crops))


def test_select_regions_nms_then_top_k():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [40, 40, 50, 50], [21, 20, 30, 30]], np.float32)
    scores = np.array([0.9, 0.95, 0.5, 0.7, 0.6], np.float32)
    assert select_regions(boxes, scores, top_k=5, nms_thresh=0.5).tolist() == [1, 3, 4]
    assert select_regions(boxes, scores, top_k=2, nms_thresh=0.5).tolist() == [1, 3]
    assert select_regions(boxes, scores, top_k=5, nms_thresh=1.0).tolist() == [1, 0, 3, 4, 2]
    assert select_regions(boxes[:0], scores[:0], top_k=5, nms_thresh=0.5).tolist() == []


def test_deterministic_and_consistent(toy, world, reference, tmp_path):
    summary, ref = reference
    assert (summary.images, summary.images_without_proposals, summary.images_resumed) == (12, 0, 0)
    again = extract(toy, world, tmp_path / "again", num_workers=1)  # workers do not change a byte
    assert_same_store(ref, tmp_path / "again")
    assert again.regions == summary.regions == RegionStore.open(ref).num_regions

    store = RegionStore.open(ref, expected_model="ovd-toy-vit", expected_dim=128)
    assert store.meta["top_k"] == 5 and store.meta["shard"] is None and store.meta["preprocess"]["size"] == [64, 64]
    # Rerunning on a finished store does nothing.
    assert extract(toy, world, ref).images_resumed == 12


def test_embedding_is_of_the_box_without_context(toy, world, reference):
    root, _ = world
    store = RegionStore.open(reference[1])
    image = read_image(root / "images" / "train" / "000002.png")
    boxes, embeds = store.get(3)
    assert len(boxes) >= 2
    expected, with_context = [], []
    for x1, y1, x2, y2 in boxes.tolist():
        crop = image[int(np.floor(y1)) : int(np.ceil(y2)), int(np.floor(x1)) : int(np.ceil(x2))]
        expected.append(toy.preprocess(Image.fromarray(crop)))
        wider = image[max(int(y1) - 8, 0) : int(y2) + 8, max(int(x1) - 8, 0) : int(x2) + 8]
        with_context.append(toy.preprocess(Image.fromarray(wider)))
    expected = encode_regions(toy, torch.stack(expected)).numpy()
    with_context = encode_regions(toy, torch.stack(with_context)).numpy()
    np.testing.assert_allclose(embeds, expected, atol=2e-3)  # float16 storage
    assert np.abs(embeds - with_context).max() > 0.05


def test_resume_after_a_kill_gives_the_same_store(toy, world, reference, tmp_path):
    out = tmp_path / "store"

    def kill_after_two(chunk_id):
        if chunk_id == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(toy, world, out, on_chunk=kill_after_two)
    with pytest.raises(ValueError, match="incomplete"):
        RegionStore.open(out)
    summary = extract(toy, world, out)
    assert summary.images_resumed == 6 and summary.images == 12
    assert_same_store(reference[1], out)
    with pytest.raises(FileExistsError, match="batch_size: 7 .* vs 8"):
        extract(toy, world, out, batch_size=8)


def test_shards_merge_into_the_unsharded_store(toy, world, reference, tmp_path):
    main = runpy.run_path(str(TOOL))["main"]
    root, proposals = world
    common = ["--dataset-json", str(root / "annotations" / "train_all.json"),
              "--image-root", str(root / "images" / "train"),
              "--proposals", str(proposals), "--model", "ovd-toy-vit", "--random-init", "--chunk-size", "3",
              "--batch-size", "7", "--num-workers", "0", "--no-progress"]
    for i in range(2):
        main(common + ["--shard", f"{i}/2", "--out", str(tmp_path / f"shard{i}")])
    # Shard 0/2 has chunks 0 and 2: images 1-3 and 7-9.
    assert RegionStore.open(tmp_path / "shard0").image_ids.tolist() == [1, 2, 3, 7, 8, 9]
    main(["merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--out", str(tmp_path / "merged")])
    assert_same_store(reference[1], tmp_path / "merged")


def test_top_k_nms_and_bad_proposals(toy, world, tmp_path):
    root, _ = world
    proposals = {
        1: (np.array([[0, 0, 40, 40], [1, 1, 40, 40], [50, 50, 90, 90], [60, 0, 100, 30], [-10, 100, 20, 140]],
                     np.float32), np.array([0.9, 0.8, 0.7, 0.2, 0.6], np.float32)),
        2: (np.array([[5, 5, 30, 30]], np.float32), np.array([0.3], np.float32)),
    }  # images 3..12: no proposals
    path = save_proposals(tmp_path / "p.json", proposals)
    summary = extract(toy, world, tmp_path / "s", proposals_file=path, top_k=3)
    assert summary.images_without_proposals == 10 and summary.regions == 4 and summary.proposals_clipped == 1
    store = RegionStore.open(tmp_path / "s")
    # Box 1 is suppressed by box 0 (IoU 0.95); the clipped box 4 (score 0.6) beats box 3; top 3 kept.
    np.testing.assert_array_equal(store.get(1)[0], [[0, 0, 40, 40], [50, 50, 90, 90], [0, 100, 20, 128]])
    assert len(store) == 12 and store.get(5)[0].shape == (0, 4) and 5 in store
    assert store.meta["num_images_without_regions"] == 10

    entries = json.loads(path.read_text()) + [{"image_id": 99, "bbox": [0, 0, 5, 5], "score": 0.5}]
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"not in the dataset \(first: \[99\]\)"):
        extract(toy, world, tmp_path / "u", proposals_file=path)
    assert extract(toy, world, tmp_path / "u", proposals_file=path, unknown_images="skip").proposals_skipped == 1
