"""The shapes world generator: determinism, split contents, tight boxes, labels and captions, skip/overwrite, errors."""

from __future__ import annotations

import json
import math
import runpy
import sys
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from ovd.data.shapes import (
    SHAPES_CATEGORIES,
    SPLIT_CODES,
    base_category_ids,
    load_shapes_meta,
    make_captions,
    make_shapes_world,
    novel_category_ids,
    render_image,
    shapes_split_paths,
)

TINY = dict(num_train=12, num_val=6, image_size=128)
ANNOTATION_FILES = ["train_base.json", "train_all.json", "train_image_labels.json", "val.json"]


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.ndim == 3 and image.shape[2] == 3, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load(root: Path, name: str) -> dict:
    return json.loads(shapes_split_paths(root, name)[1].read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """40 train / 8 val images: enough for every category to appear in train."""
    return make_shapes_world(tmp_path_factory.mktemp("shapes"), num_train=40, num_val=8, image_size=128, seed=1)


def test_categories():
    assert [c["id"] for c in SHAPES_CATEGORIES] == list(range(1, 17))
    assert base_category_ids() == list(range(1, 12)) and novel_category_ids() == list(range(12, 17))
    names = [c["name"] for c in SHAPES_CATEGORIES]
    assert len(set(names)) == 16 and all(n == f"{c['colour']} {c['shape']}" for n, c in zip(names, SHAPES_CATEGORIES))
    assert names[0] == "red circle" and names[11] == "green circle" and names[15] == "white hexagon"
    base = [c for c in SHAPES_CATEGORIES if c["split"] == "base"]
    for novel in (c for c in SHAPES_CATEGORIES if c["split"] == "novel"):
        # A novel name is a new combination of a known shape and a known colour, never a new word.
        assert any(b["shape"] == novel["shape"] for b in base) and any(b["colour"] == novel["colour"] for b in base)


def test_deterministic_and_seed_dependent(tmp_path):
    a = make_shapes_world(tmp_path / "a", **TINY)
    b = make_shapes_world(tmp_path / "b", **TINY)
    c = make_shapes_world(tmp_path / "c", **TINY, seed=1)
    for name in ANNOTATION_FILES:
        assert (a / "annotations" / name).read_bytes() == (b / "annotations" / name).read_bytes(), name
    assert (a / "meta.json").read_bytes() == (b / "meta.json").read_bytes()
    for split, n in (("train", 12), ("val", 6)):
        files = sorted(p.name for p in (a / "images" / split).iterdir())
        assert files == [f"{i:06d}.png" for i in range(n)]
        for f in files:
            assert np.array_equal(read_rgb(a / "images" / split / f), read_rgb(b / "images" / split / f))
    assert (a / "annotations/train_all.json").read_bytes() != (c / "annotations/train_all.json").read_bytes()
    assert not np.array_equal(read_rgb(a / "images/train/000000.png"), read_rgb(c / "images/train/000000.png"))
    # Train and val come from different streams.
    assert not np.array_equal(read_rgb(a / "images/train/000000.png"), read_rgb(a / "images/val/000000.png"))


def test_png_is_the_rendered_rgb_image(world):
    params = load_shapes_meta(world)["params"]
    rng = np.random.default_rng([params["seed"], SPLIT_CODES["val"], 2])
    image, objects = render_image(
        rng, image_size=128, min_objects=params["min_objects"], max_objects=params["max_objects"]
    )
    assert np.array_equal(read_rgb(world / "images/val/000002.png"), image)
    val = load(world, "val")
    assert [(a["category_id"], a["bbox"]) for a in val["annotations"] if a["image_id"] == 3] == [
        (c, [round(v, 2) for v in box]) for c, box in objects
    ]


def test_image_does_not_depend_on_num_train_or_workers(tmp_path):
    small = make_shapes_world(tmp_path / "small", num_train=4, num_val=2, image_size=128)
    large = make_shapes_world(tmp_path / "large", num_train=8, num_val=2, image_size=128, workers=2)
    assert np.array_equal(read_rgb(small / "images/train/000003.png"), read_rgb(large / "images/train/000003.png"))

    def boxes_of(root: Path, image_id: int) -> list:
        annotations = load(root, "train_all")["annotations"]
        return [(a["category_id"], a["bbox"]) for a in annotations if a["image_id"] == image_id]

    assert boxes_of(small, 4) == boxes_of(large, 4)
    assert (small / "annotations/val.json").read_bytes() == (large / "annotations/val.json").read_bytes()


def test_split_contents(world):
    base, novel = set(base_category_ids()), set(novel_category_ids())
    files = {name: load(world, name) for name in ("train_base", "train_all", "train_image_labels", "val")}
    for name, data in files.items():
        assert data["categories"] == SHAPES_CATEGORIES, name
        assert data["info"]["description"] == "ovd shapes world"
    train_ids = [im["id"] for im in files["train_all"]["images"]]
    assert train_ids == list(range(1, 41))
    assert [im["id"] for im in files["train_base"]["images"]] == train_ids
    assert [im["id"] for im in files["train_image_labels"]["images"]] == train_ids
    assert files["train_image_labels"]["annotations"] == []

    all_train = files["train_all"]["annotations"]
    assert {a["category_id"] for a in all_train} == base | novel
    assert {a["category_id"] for a in files["train_base"]["annotations"]} <= base
    # train_base is exactly the base boxes of train_all, ids included.
    assert files["train_base"]["annotations"] == [a for a in all_train if a["category_id"] in base]
    assert {a["category_id"] for a in files["val"]["annotations"]} & novel
    for name in ("train_all", "val"):
        ids = [a["id"] for a in files[name]["annotations"]]
        assert ids == list(range(1, len(ids) + 1))

    meta = load_shapes_meta(world)
    assert meta["base_category_ids"] == sorted(base) and meta["novel_category_ids"] == sorted(novel)
    assert meta["params"]["num_train"] == 40 and meta["format_version"] == 1
    assert meta["counts"]["train"]["boxes"] == len(all_train)


def test_boxes_valid(world):
    for name in ("train_all", "val"):
        data = load(world, name)
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        counts = Counter(a["image_id"] for a in data["annotations"])
        assert set(counts) == set(sizes) and max(counts.values()) <= 5
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height, a
            assert a["area"] == pytest.approx(w * h) and a["iscrowd"] == 0
            assert all(v == round(v, 2) for v in a["bbox"])


@pytest.mark.parametrize("seed", range(6))
def test_box_is_tight(seed):
    """One object over a background: the changed pixels are exactly those the box covers at its edges."""
    kwargs = dict(image_size=128)
    empty, none = render_image(np.random.default_rng(seed), min_objects=0, max_objects=0, **kwargs)
    image, objects = render_image(np.random.default_rng(seed), min_objects=1, max_objects=1, **kwargs)
    assert none == [] and len(objects) == 1
    _, (x, y, w, h) = objects[0]
    ys, xs = np.nonzero(np.any(image != empty, axis=2))
    assert xs.min() == math.floor(x) and xs.max() == math.ceil(x + w) - 1
    assert ys.min() == math.floor(y) and ys.max() == math.ceil(y + h) - 1


def test_objects_are_coloured_as_named():
    """The middle of a filled object is close to its category's colour, far from the other colours."""
    from ovd.data.shapes import COLOURS

    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], np.float32)
    for seed in range(10):
        image, objects = render_image(np.random.default_rng(seed), image_size=160, min_objects=1, max_objects=1)
        category_id, (x, y, w, h) = objects[0]
        category = SHAPES_CATEGORIES[category_id - 1]
        if category["shape"] == "ring":
            continue
        pixel = image[int(y + h / 2), int(x + w / 2)].astype(np.float32)
        assert names[int(np.argmin(np.linalg.norm(table - pixel, axis=1)))] == category["colour"], (seed, pixel)


def test_image_labels_and_captions(world):
    boxes = defaultdict(list)
    for a in load(world, "train_all")["annotations"]:
        boxes[a["image_id"]].append(a["category_id"])
    names = {c["id"]: c["name"] for c in SHAPES_CATEGORIES}
    for im in load(world, "train_image_labels")["images"]:
        assert im["pos_category_ids"] == sorted(set(boxes[im["id"]]))
        assert 1 <= len(im["captions"]) <= 2
        for caption in im["captions"]:
            assert all(names[c] in caption for c in im["pos_category_ids"]), caption


def test_captions_use_plurals():
    assert make_captions([7, 1, 7]) == [
        "a photo of a red circle and two blue stars",
        "two blue stars and a red circle on a textured background",
    ]
    assert make_captions([8, 10, 10, 10, 5])[0] == "a photo of a red triangle, an orange star and three white crosses"
    assert make_captions([16]) == ["a photo of a white hexagon"]


def test_skip_when_done_and_refuse_other_params(tmp_path):
    root = make_shapes_world(tmp_path, **TINY)
    first_png = root / "images/train/000000.png"
    stamp = (first_png.stat().st_mtime_ns, (root / "meta.json").stat().st_mtime_ns)
    assert make_shapes_world(tmp_path, **TINY, workers=2) == root
    assert (first_png.stat().st_mtime_ns, (root / "meta.json").stat().st_mtime_ns) == stamp

    with pytest.raises(FileExistsError, match=r"num_train: 12 \(existing\) vs 5 \(requested\)") as info:
        make_shapes_world(tmp_path, **{**TINY, "num_train": 5})
    assert str(tmp_path) in str(info.value)

    make_shapes_world(tmp_path, **{**TINY, "num_train": 5}, overwrite=True)
    assert sorted(p.name for p in (root / "images/train").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert load_shapes_meta(root)["params"]["num_train"] == 5


def test_missing_meta_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "meta.json")):
        load_shapes_meta(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_train": 0}, "num_train must be an integer >= 1, got 0"),
        ({"num_val": 0}, "num_val must be an integer >= 1, got 0"),
        ({"num_train": 2.5}, "num_train must be an integer >= 1, got 2.5"),
        ({"image_size": 32}, "image_size must be an integer >= 64, got 32"),
        ({"min_objects": -1}, "min_objects must be an integer >= 0, got -1"),
        ({"max_objects": 0, "min_objects": 0}, "max_objects must be an integer >= 1, got 0"),
        ({"min_objects": 4, "max_objects": 3}, "min_objects=4, max_objects=3"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"seed": True}, "seed must be an integer >= 0, got True"),
        ({"workers": 0}, "workers must be an integer >= 1, got 0"),
    ],
)
def test_argument_validation(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_shapes_world(tmp_path / "w", **kwargs)
    assert not (tmp_path / "w").exists()


def test_render_argument_validation():
    with pytest.raises(ValueError, match="min_objects=3, max_objects=2"):
        render_image(np.random.default_rng(0), image_size=128, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="image_size must be an integer >= 64, got 63"):
        render_image(np.random.default_rng(0), image_size=63, min_objects=1, max_objects=2)


def test_cli(tmp_path, monkeypatch, capsys):
    script = Path(__file__).resolve().parents[1] / "tools" / "make_shapes_world.py"
    argv = [str(script), "--out", str(tmp_path), "--num-train", "6", "--num-val", "3", "--image-size", "96"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    counts = load_shapes_meta(tmp_path)["counts"]
    assert f"{counts['train']['boxes']} boxes" in out and "6 images" in out and str(tmp_path.resolve()) in out
    assert load_shapes_meta(tmp_path)["params"]["image_size"] == 96
