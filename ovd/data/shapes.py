"""The shapes world (DESIGN §6): a deterministic synthetic COCO-format detection dataset that stands in for COCO.

Images show a few (by default 2–5) coloured shapes on noisy textured backgrounds. A category is a (colour, shape)
pair named ``"<colour> <shape>"``; 11 are base and 5 novel, and every novel one shares its shape and its colour with
some base one, so naming it needs language, as with COCO's novel classes. Layout under ``root``::

    images/train/000000.png ...          images/val/000000.png ...
    annotations/train_base.json          base boxes only (novel objects are in the pixels, unlabelled)
    annotations/train_all.json           all boxes, same images: the teacher's training crops (it plays web-scale
                                         CLIP, which knows novel classes), oracle proposals, pseudo-box precision;
                                         never the detector's training boxes
    annotations/train_image_labels.json  same images with ``pos_category_ids`` and ``captions``, no annotations
    annotations/val.json                 all boxes
    meta.json                            categories, splits, params, counts; written last: marks a complete world

Image ``index`` of a split is rendered from ``numpy.random.default_rng([seed, split_code, index])``, so it does not
depend on how many images are generated, on the worker count, or on the other split.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.pool
import os
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ovd.utils.io import read_json, write_json
from ovd.utils.paths import datasets_root

FORMAT_VERSION = 1

# RGB, saturated and far apart in hue or brightness so a small model separates them; the background stays muted.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "blue": (35, 75, 225),
    "green": (35, 165, 50),
    "yellow": (240, 215, 35),
    "purple": (145, 55, 190),
    "orange": (250, 130, 20),
    "white": (240, 240, 240),
}

_BASE = [
    ("red", "circle"), ("blue", "circle"), ("green", "square"), ("yellow", "square"), ("red", "triangle"),
    ("purple", "triangle"), ("blue", "star"), ("orange", "star"), ("green", "ring"), ("white", "cross"),
    ("yellow", "hexagon"),
]
_NOVEL = [("green", "circle"), ("blue", "square"), ("yellow", "triangle"), ("red", "star"), ("white", "hexagon")]

SHAPES_CATEGORIES: list[dict[str, Any]] = [
    {"id": i, "name": f"{colour} {shape}", "shape": shape, "colour": colour, "split": split}
    for i, (colour, shape, split) in enumerate(
        [(c, s, "base") for c, s in _BASE] + [(c, s, "novel") for c, s in _NOVEL], start=1
    )
]
_CATEGORY_BY_ID = {c["id"]: c for c in SHAPES_CATEGORIES}

SPLIT_CODES = {"train": 0, "val": 1}
# name -> (image split, annotation file under root/annotations)
SHAPES_SPLITS: dict[str, tuple[str, str]] = {
    "train_base": ("train", "train_base.json"),
    "train_all": ("train", "train_all.json"),
    "train_image_labels": ("train", "train_image_labels.json"),
    "val": ("val", "val.json"),
}

# Object extent in px at 160 px images; scaled with image_size / 160.
OBJECT_SIZE_PX = (20.0, 70.0)
MAX_OVERLAP_IOU = 0.2
# Box IoU alone lets a large object be drawn over a small earlier one and hide it; this bounds the intersection
# relative to the smaller box too.
MAX_OVERLAP_OF_SMALLER = 0.5
PLACEMENT_TRIES = 10
MAX_ROTATION_DEG = 15.0
_SUPERSAMPLE = 4  # boxes are exact to 1/4 px, and edges are anti-aliased by area averaging
_CV_SHIFT = 4  # fractional bits of cv2 drawing coordinates


def base_category_ids() -> list[int]:
    """Ids of the 11 base categories (boxes available for training)."""
    return [c["id"] for c in SHAPES_CATEGORIES if c["split"] == "base"]


def novel_category_ids() -> list[int]:
    """Ids of the 5 novel categories (no training boxes)."""
    return [c["id"] for c in SHAPES_CATEGORIES if c["split"] == "novel"]


def default_shapes_root() -> Path:
    """``$OVD_DATASETS/shapes``, with ``OVD_DATASETS`` defaulting to ``./datasets``."""
    return datasets_root() / "shapes"


def shapes_split_paths(root: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """``(image_dir, annotation_json)`` of split ``name`` (a key of ``SHAPES_SPLITS``) of the world at ``root``."""
    if name not in SHAPES_SPLITS:
        raise ValueError(f"unknown shapes split {name!r}; expected one of {sorted(SHAPES_SPLITS)}")
    image_split, file_name = SHAPES_SPLITS[name]
    root = Path(root)
    return root / "images" / image_split, root / "annotations" / file_name


def load_shapes_meta(root: str | os.PathLike) -> dict[str, Any]:
    """Read ``root/meta.json``; a missing file means the world was never (completely) generated."""
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"shapes world metadata not found: {path} (generate it with tools/make_shapes_world.py --out {Path(root)})"
        )
    return read_json(path, what="shapes world metadata")


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_render_args(image_size: int, min_objects: int, max_objects: int) -> None:
    _check_int("image_size", image_size, 64)
    _check_int("min_objects", min_objects, 0)
    _check_int("max_objects", max_objects, 0)
    if min_objects > max_objects:
        raise ValueError(
            f"min_objects must be <= max_objects, got min_objects={min_objects}, max_objects={max_objects}"
        )


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A muted, low-frequency colour field with mid-frequency luminance texture and pixel noise.

    Returns ``(background [size, size, 3] float32, sensor_noise [size, size, 3] float32)``. The sensor noise is
    added again after the objects so they are not flat either; reusing one noise field halves the sampling cost,
    the dominant cost of rendering.
    """
    grid = int(rng.integers(2, 7))
    level = rng.uniform(55.0, 135.0)
    # Small per-channel spread keeps the background desaturated, so object colours stand out against it.
    coarse = level + rng.normal(0.0, 25.0, (grid, grid, 1)) + rng.normal(0.0, 12.0, (grid, grid, 3))
    field = cv2.resize(coarse.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    tex_grid = int(rng.integers(10, 30))
    texture = rng.normal(0.0, rng.uniform(4.0, 14.0), (tex_grid, tex_grid)).astype(np.float32)
    field += cv2.resize(texture, (size, size), interpolation=cv2.INTER_LINEAR)[..., None]
    # Capped below the darkest white object, so white never melts into a bright patch.
    np.clip(field, 10.0, 180.0, out=field)
    background_sigma, sensor_sigma = rng.uniform(2.0, 8.0), rng.uniform(1.0, 4.0)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)
    field += noise * np.float32(background_sigma)
    return field, noise * np.float32(sensor_sigma)


def _polygon(shape: str, radius: float, angle: float) -> np.ndarray:
    """Vertices ``[K, 2]`` (x, y) of a polygonal shape centred at 0 that fits in a circle of ``radius``."""
    if shape == "square":
        t = np.deg2rad(45.0 + 90.0 * np.arange(4))
        r = np.full(4, radius)
    elif shape == "triangle":
        t = np.deg2rad(-90.0 + 120.0 * np.arange(3))
        r = np.full(3, radius)
    elif shape == "hexagon":
        t = np.deg2rad(60.0 * np.arange(6))
        r = np.full(6, radius)
    elif shape == "star":
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    elif shape == "cross":
        a, b = radius * 0.95, radius * 0.32  # arm length, arm half-width
        xy = np.array([(b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a),
                       (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b), (-b, -a)])
        c, s = math.cos(angle), math.sin(angle)
        return xy @ np.array([[c, s], [-s, c]])
    else:
        raise ValueError(f"not a polygonal shape: {shape!r}")
    t = t + angle
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _shape_mask(shape: str, radius: float, centre: tuple[float, float], patch: int, angle: float) -> np.ndarray:
    """Binary supersampled mask ``[patch * S, patch * S]`` uint8 of a shape centred at ``centre`` (patch px)."""
    size = patch * _SUPERSAMPLE
    mask = np.zeros((size, size), np.uint8)
    unit = _SUPERSAMPLE * (1 << _CV_SHIFT)

    def fixed(v: np.ndarray | float) -> np.ndarray:
        # cv2 puts integer coordinates at pixel centres; our continuous coordinates put pixel k on [k, k + 1).
        return np.round((np.asarray(v, np.float64) * _SUPERSAMPLE - 0.5) * (1 << _CV_SHIFT)).astype(np.int32)

    c = fixed(np.array(centre))
    if shape in ("circle", "ring"):
        cv2.circle(mask, (int(c[0]), int(c[1])), int(round(radius * unit)), 1, -1, cv2.LINE_8, _CV_SHIFT)
        if shape == "ring":
            cv2.circle(mask, (int(c[0]), int(c[1])), int(round(0.55 * radius * unit)), 0, -1, cv2.LINE_8, _CV_SHIFT)
    else:
        pts = fixed(_polygon(shape, radius, angle) + np.array(centre))
        cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1, cv2.LINE_8, _CV_SHIFT)
    return mask


def _overlaps(a: list[float], b: list[float]) -> bool:
    """Whether xywh boxes ``a`` and ``b`` overlap more than ``MAX_OVERLAP_IOU`` / ``MAX_OVERLAP_OF_SMALLER`` allow."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return False
    inter = iw * ih
    area_a, area_b = a[2] * a[3], b[2] * b[3]
    return inter > MAX_OVERLAP_IOU * (area_a + area_b - inter) or inter > MAX_OVERLAP_OF_SMALLER * min(area_a, area_b)


def render_image(
    rng: np.random.Generator, *, image_size: int, min_objects: int, max_objects: int
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """Render one image of the shapes world.

    The background is drawn from ``rng`` before anything depends on the object arguments, so the same generator
    state gives the same background whatever ``min_objects``/``max_objects`` are. Objects are drawn in order (later
    ones may occlude earlier ones). A placement whose box overlaps an earlier box by more than ``MAX_OVERLAP_IOU``
    (IoU) or ``MAX_OVERLAP_OF_SMALLER`` (of the smaller box) is retried, and the object is dropped after
    ``PLACEMENT_TRIES`` tries, so an image can hold fewer than ``min_objects`` objects (never none when
    ``min_objects >= 1``).

    Returns:
        image: ``[image_size, image_size, 3]`` uint8 RGB.
        objects: ``[(category_id, [x, y, w, h])]`` in drawing order; the box is the tight box of the object's own
            (unoccluded) mask in float pixels, exact to 1/4 px.
    """
    _check_render_args(image_size, min_objects, max_objects)
    image, sensor = _background(rng, image_size)
    scale = image_size / 160.0
    objects: list[tuple[int, list[float]]] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        category = _CATEGORY_BY_ID[int(rng.integers(1, len(SHAPES_CATEGORIES) + 1))]
        radius = 0.5 * rng.uniform(*OBJECT_SIZE_PX) * scale
        angle = float(np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)))
        brightness = rng.uniform(0.85, 1.05)
        tint = rng.normal(0.0, 7.0, 3)
        shade_dir = rng.uniform(0.0, 2.0 * math.pi)
        shade = rng.uniform(0.0, 0.12)
        # An integer patch origin plus a fractional centre gives sub-pixel positions with one mask per object.
        patch = int(math.ceil(2.0 * radius)) + 2
        centre = (1.0 + radius + rng.uniform(), 1.0 + radius + rng.uniform())
        mask = _shape_mask(category["shape"], radius, centre, patch, angle)
        local = [v / _SUPERSAMPLE for v in cv2.boundingRect(mask)]
        for _ in range(PLACEMENT_TRIES):
            ox, oy = (int(v) for v in rng.integers(0, image_size - patch + 1, 2))
            box = [ox + local[0], oy + local[1], local[2], local[3]]
            if not any(_overlaps(box, other) for _, other in objects):
                break
        else:
            continue
        # Area averaging of the supersampled mask is the pixel coverage: anti-aliased edges.
        alpha = cv2.resize(mask.astype(np.float32), (patch, patch), interpolation=cv2.INTER_AREA)[..., None]
        yy, xx = np.mgrid[0:patch, 0:patch].astype(np.float32) + 0.5
        ramp = ((xx - centre[0]) * math.cos(shade_dir) + (yy - centre[1]) * math.sin(shade_dir)) / radius
        colour = np.asarray(COLOURS[category["colour"]], np.float32) * brightness + tint.astype(np.float32)
        fill = colour * (1.0 + shade * ramp)[..., None]
        region = image[oy:oy + patch, ox:ox + patch]
        region[...] = region * (1.0 - alpha) + fill * alpha
        objects.append((category["id"], box))
    image += sensor
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


# ---------------------------------------------------------------------------------------------------------------
# Captions


_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _plural(word: str) -> str:
    return word + "es" if word.endswith(("s", "x", "sh", "ch")) else word + "s"


def _phrase(name: str, count: int) -> str:
    """``"a red circle"``, ``"an orange star"``, ``"two white crosses"``."""
    if count == 1:
        return ("an " if name[0] in "aeiou" else "a ") + name
    number = _NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else str(count)
    head, _, last = name.rpartition(" ")
    return f"{number} {head} {_plural(last)}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_captions(category_ids: list[int]) -> list[str]:
    """Captions naming the objects of an image, given their category ids in drawing order.

    The first lists categories by id ("a photo of a red circle and two blue stars"); where there are two or
    more categories, a second lists them in order of appearance with another template.
    """
    counts = Counter(category_ids)
    if not counts:
        return ["a photo of a noisy textured background"]
    by_id = [_phrase(_CATEGORY_BY_ID[c]["name"], counts[c]) for c in sorted(counts)]
    captions = [f"a photo of {_join(by_id)}"]
    if len(counts) > 1:
        by_appearance = [_phrase(_CATEGORY_BY_ID[c]["name"], counts[c]) for c in dict.fromkeys(category_ids)]
        captions.append(f"{_join(by_appearance)} on a textured background")
    return captions


# ---------------------------------------------------------------------------------------------------------------
# The world on disk


# Huffman-only coding: faster and smaller than deflate on these noisy images.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]


def _render_to_file(job: tuple[str, int, int, int, int, int, int]) -> list[tuple[int, list[float]]]:
    image_dir, seed, split_code, index, image_size, min_objects, max_objects = job
    rng = np.random.default_rng([seed, split_code, index])
    image, objects = render_image(rng, image_size=image_size, min_objects=min_objects, max_objects=max_objects)
    path = Path(image_dir) / f"{index:06d}.png"
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), _PNG_PARAMS):
        raise OSError(f"could not write image {path}")
    return objects


def _coco(split: str, labels: str, images: list[dict], annotations: list[dict]) -> dict[str, Any]:
    return {
        "info": {
            "description": "ovd shapes world", "split": split, "labels": labels, "format_version": FORMAT_VERSION
        },
        "images": images,
        "annotations": annotations,
        "categories": SHAPES_CATEGORIES,
    }


def _write_split(
    root: Path, split: str, params: dict[str, Any], count: int, pool: multiprocessing.pool.Pool | None
) -> dict[str, int]:
    """Render split ``split`` and write its annotation files; returns box counts for reporting."""
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    for stale in image_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
        stale.unlink()
    jobs = [(str(image_dir), params["seed"], SPLIT_CODES[split], i, params["image_size"],
             params["min_objects"], params["max_objects"]) for i in range(count)]
    results = pool.imap(_render_to_file, jobs, chunksize=32) if pool else map(_render_to_file, jobs)

    size = params["image_size"]
    base = set(base_category_ids())
    images, labelled, all_boxes = [], [], []
    for index, objects in enumerate(results):
        image = {"id": index + 1, "file_name": f"{index:06d}.png", "height": size, "width": size}
        images.append(image)
        ids = [c for c, _ in objects]
        labelled.append({**image, "pos_category_ids": sorted(set(ids)), "captions": make_captions(ids)})
        for category_id, box in objects:
            x, y, w, h = (round(float(v), 2) for v in box)
            # Annotation ids are shared between train_all and train_base, so a base box keeps its id in both.
            all_boxes.append({"id": len(all_boxes) + 1, "image_id": index + 1, "category_id": category_id,
                              "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    base_boxes = [a for a in all_boxes if a["category_id"] in base]

    annotations = root / "annotations"
    if split == "train":
        write_json(annotations / "train_base.json", _coco(split, "base boxes", images, base_boxes))
        write_json(annotations / "train_all.json", _coco(split, "all boxes", images, all_boxes))
        write_json(annotations / "train_image_labels.json", _coco(split, "image labels", labelled, []))
    else:
        write_json(annotations / f"{split}.json", _coco(split, "all boxes", images, all_boxes))
    return {"images": count, "boxes": len(all_boxes), "base_boxes": len(base_boxes),
            "novel_boxes": len(all_boxes) - len(base_boxes)}


def shapes_world_params(
    *, num_train: int = 2000, num_val: int = 300, image_size: int = 160, min_objects: int = 2, max_objects: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """The validated generation parameters as stored in ``meta.json["params"]`` (fixed constants included, so a
    change to them invalidates an existing world)."""
    _check_int("num_train", num_train, 1)
    _check_int("num_val", num_val, 1)
    _check_int("seed", seed, 0)
    _check_render_args(image_size, min_objects, max_objects)
    _check_int("max_objects", max_objects, 1)
    return {
        "seed": int(seed), "num_train": int(num_train), "num_val": int(num_val), "image_size": int(image_size),
        "min_objects": int(min_objects), "max_objects": int(max_objects),
        "object_size_px_at_160": list(OBJECT_SIZE_PX), "max_overlap_iou": MAX_OVERLAP_IOU,
        "max_overlap_of_smaller": MAX_OVERLAP_OF_SMALLER,
        "placement_tries": PLACEMENT_TRIES, "max_rotation_deg": MAX_ROTATION_DEG,
    }


def make_shapes_world(
    root: str | os.PathLike,
    *,
    num_train: int = 2000,
    num_val: int = 300,
    image_size: int = 160,
    min_objects: int = 2,
    max_objects: int = 5,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
) -> Path:
    """Generate the shapes world under ``root`` and return ``root``.

    If ``root/meta.json`` exists with the same parameters, nothing is done; with different parameters,
    ``FileExistsError`` names them unless ``overwrite``. Output does not depend on ``workers``.
    """
    params = shapes_world_params(num_train=num_train, num_val=num_val, image_size=image_size,
                                 min_objects=min_objects, max_objects=max_objects, seed=seed)
    _check_int("workers", workers, 1)
    root = Path(root)
    meta_path = root / "meta.json"
    if meta_path.exists() and not overwrite:
        meta = load_shapes_meta(root)
        old = {**meta.get("params", {}), "format_version": meta.get("format_version")}
        new = {**params, "format_version": FORMAT_VERSION}
        differing = [f"{k}: {old.get(k)!r} (existing) vs {new.get(k)!r} (requested)"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if not differing:
            return root
        raise FileExistsError(
            f"a different shapes world exists in {root} ({'; '.join(differing)}); pass overwrite=True (--overwrite) "
            "or choose another folder"
        )
    # Removing the marker first means an interrupted regeneration is never mistaken for a complete world.
    meta_path.unlink(missing_ok=True)

    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        counts = {split: _write_split(root, split, params, n, pool)
                  for split, n in (("train", num_train), ("val", num_val))}
    write_json(meta_path, {
        "categories": SHAPES_CATEGORIES,
        "base_category_ids": base_category_ids(),
        "novel_category_ids": novel_category_ids(),
        "splits": {name: {"images": f"images/{image_split}", "annotations": f"annotations/{file_name}"}
                   for name, (image_split, file_name) in SHAPES_SPLITS.items()},
        "counts": counts,
        "params": params,
        "format_version": FORMAT_VERSION,
    }, indent=2)
    return root
