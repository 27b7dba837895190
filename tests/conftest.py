"""Shared test set-up: offline hub, one thread, a tiny shapes world, the parity fixtures' folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def parity_fixtures_dir():
    """The recorded detectron2 outputs (DESIGN §7): tests/fixtures, or $OVD_PARITY_FIXTURES."""
    from detectron2_fixtures import fixtures_root

    return fixtures_root()


TINY_OVERRIDES = [
    # a quarter-width ResNet-18 FPN on 128 px images: ~0.1 s per iteration on one CPU thread
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM", "32",
    "INPUT.MIN_SIZE_TRAIN", "[128]",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "5",
    "DATALOADER.NUM_WORKERS", "0",
    "LOG_PERIOD", "1",
    "TEST.RKD_FEAT_PATH", "",
]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A 24 + 12 image shapes world at 128 px under a temporary OVD_DATASETS, with 32-d text embeddings.

    Returns (datasets_root, overrides) where overrides point a shapes config at this world.
    """
    import numpy as np

    from ovd.clip.text import save_text_embeddings
    from ovd.data.shapes import SHAPES_CATEGORIES, make_shapes_world

    root = tmp_path_factory.mktemp("datasets")
    make_shapes_world(root / "shapes", num_train=24, num_val=12, image_size=128, seed=3)
    emb = np.random.default_rng(0).standard_normal((len(SHAPES_CATEGORIES), 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    path = root / "shapes" / "text_embeddings" / "random32.npy"
    save_text_embeddings(path, emb, names=[c["name"] for c in SHAPES_CATEGORIES], templates=["{}"],
                         model_name="random", pretrained=None)
    old = os.environ.get("OVD_DATASETS")
    os.environ["OVD_DATASETS"] = str(root)
    yield root, TINY_OVERRIDES + ["MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", str(path)]
    if old is None:
        os.environ.pop("OVD_DATASETS", None)
    else:
        os.environ["OVD_DATASETS"] = old


@pytest.fixture(scope="session")
def rkd_world(tiny_world, tmp_path_factory):
    """The tiny world with a random-init toy CLIP as teacher: its text embeddings and a region store of the
    training images (oracle proposals, top 5)."""
    from ovd.clip import encode_text, load_clip, save_clip, save_text_embeddings
    from ovd.data.proposals import make_oracle_proposals
    from ovd.clip.region_extraction import extract_region_embeddings
    from ovd.data.shapes import SHAPES_CATEGORIES

    root, overrides = tiny_world
    work = tmp_path_factory.mktemp("rkd")
    teacher = save_clip(load_clip("ovd-toy-vit", seed=0), work / "teacher")
    bundle = load_clip(f"local-dir:{teacher}")
    shapes = root / "shapes"
    names = [c["name"] for c in SHAPES_CATEGORIES]
    text = save_text_embeddings(work / "text.npy", encode_text(bundle, names), names=names, templates=["a photo of a {}"],
                                model_name=f"local-dir:{teacher}", pretrained=None)
    make_oracle_proposals(shapes / "annotations" / "train_all.json", work / "proposals.json")
    extract_region_embeddings(bundle, dataset_json=shapes / "annotations" / "train_all.json",
                              image_root=shapes / "images" / "train", proposals_file=work / "proposals.json",
                              out_dir=work / "store", top_k=5, progress=False)
    cfg_overrides = overrides + ["MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM", "128", "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH",
                                 str(text), "MODEL.DISTILLATION", "true", "MODEL.RKD_FEAT_PATH", str(work / "store")]
    return work, cfg_overrides


@pytest.fixture(scope="session")
def true_pseudo_boxes(tiny_world, tmp_path_factory):
    """A pseudo-box file for the tiny world's image-labelled split whose boxes are the true ones (for training tests;
    the miner has its own)."""
    import json

    root, _ = tiny_world
    ann = root / "shapes" / "annotations"
    labels = json.loads((ann / "train_image_labels.json").read_text())
    boxes = json.loads((ann / "train_all.json").read_text())["annotations"]
    path = tmp_path_factory.mktemp("pseudo") / "pseudo.json"
    path.write_text(json.dumps({**labels, "annotations": [{**a, "score": 1.0} for a in boxes]}))
    return path


@pytest.fixture(scope="session")
def oracle_world(tmp_path_factory):
    """A 12 + 6 image shapes world at 128 px with noisy-oracle proposals of its training images: (root, proposals)."""
    from ovd.data.proposals import make_oracle_proposals
    from ovd.data.shapes import make_shapes_world

    root = make_shapes_world(tmp_path_factory.mktemp("world"), num_train=12, num_val=6, image_size=128, seed=3)
    proposals = root / "proposals.json"
    make_oracle_proposals(root / "annotations" / "train_all.json", proposals, seed=0)
    return root, proposals


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A tiny detector on disk, shared read-only by the inference tests: toy CLIP folder, its text embeddings of the
    16 shapes names and a random-init checkpoint (`inference_helpers.TinyDetectorFiles`)."""
    from inference_helpers import make_tiny_detector_files

    return make_tiny_detector_files(tmp_path_factory.mktemp("tiny_detector"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty text-embedding cache (OVD_CACHE) for one test."""
    monkeypatch.setenv("OVD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
