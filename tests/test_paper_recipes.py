"""The paper's recipes, key by key: each of the 12 COCO/LVIS configs sets what the original object-centric-ovd code
trains with, or differs where datasets/README.md ("The paper's recipes") says why.

tests/fixtures/original_recipes.json records the original's effective settings of each config (detectron2's
defaults, then its add_ovd_config, then the config's YAML chain), under our key names, with the original's file
and key beside each value; its keys without a meaning here are listed as skipped, with the reason. Equivalent forms
compare equal: `(800, 800)` with range sampling is `[800]` with choice sampling, `FP16: True` is AMP, ...
"""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from ovd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TABLE = json.loads((ROOT / "tests/fixtures/original_recipes.json").read_text())
RECIPES = TABLE["configs"]
GPUS = 8  # the paper's machine; per-GPU batch sizes are compared at this count

# the original's value -> ours, where the same setting is spelt differently
VALUE_MAPS = {
    "MODEL.BACKBONE.NAME": {"build_resnet_backbone": "resnet_c4", "build_resnet_fpn_backbone": "resnet_fpn"},
    "MODEL.ROI_BOX_HEAD.POOLER_ALIGNED": {"ROIAlignV2": True, "ROIAlign": False},
    "MODEL.ROI_MASK_HEAD.POOLER_ALIGNED": {"ROIAlignV2": True, "ROIAlign": False},
    "SOLVER.CLIP_GRADIENTS": {False: 0.0},  # CLIP_GRADIENTS.ENABLED False: no clipping
}
# The original's ImageNet-LVIS file carries each image's MAVL box as an annotation; ovd's image-label file does not
# (its pseudo boxes come from MODEL.PIS_PROP_PATH), so the same images have another catalogue name.
DATASET_NAMES = {"imagenet_lvis_v1_pis": "imagenet_lvis_v1"}
# Where ours keeps its own value (a reason for each in datasets/README.md, "The paper's recipes"): key -> when.
DEVIATIONS = {
    "SEED": lambda ours, original: original == -1,  # a fixed seed where the original draws a random one each run
    "TEST.EVAL_PERIOD": lambda ours, original: original == 0,  # evaluating along the way, not at the end only
    "SOLVER.CHECKPOINT_PERIOD": lambda ours, original: ours > 0,  # when checkpoints are written
}
# How DATALOADER.DATASET_RATIO counts, in ovd (ovd/data/samplers.py) as in the original's MultiDatasetSampler: the
# sources supply *images* in this ratio, grouped into per-source batches.
OURS_RATIO_COUNTS = "image"


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _ours(path: str) -> dict:
    return _flat(dataclasses.asdict(load_config(ROOT / path)))


def _original(path: str) -> dict:
    return {k: value for k, (value, _) in RECIPES[path]["compared"].items()}


def _short_sides(sizes: list[int], sampling: str) -> list[int]:
    """The short sides a training image may get: `choice` picks one of ``sizes``, `range` any in [min, max]."""
    if sampling == "range":
        lo, hi = sizes
        return list(range(lo, hi + 1))
    return sorted(set(sizes))


def train_resize(s: dict, sources: int) -> list[tuple[list[int], int]]:
    """(possible short sides, long-side cap) of each training source. Per-source DATASET_MIN_SIZES /
    DATASET_MAX_SIZES where set (the original: where USE_DIFF_BS_SIZE is on), else INPUT.*_SIZE_TRAIN."""
    mins = s.get("DATALOADER.DATASET_MIN_SIZES") or [s["INPUT.MIN_SIZE_TRAIN"]] * sources
    maxs = s.get("DATALOADER.DATASET_MAX_SIZES") or [s["INPUT.MAX_SIZE_TRAIN"]] * sources
    return [(_short_sides(m, s["INPUT.MIN_SIZE_TRAIN_SAMPLING"]), x) for m, x in zip(mins, maxs)]


def batch_sizes(s: dict, sources: int) -> list[int]:
    """Images per batch and GPU, per source, at 8 GPUs."""
    return list(s.get("DATALOADER.DATASET_BS") or [s["SOLVER.IMS_PER_BATCH"] // GPUS] * sources)


def batch_shares(s: dict, sources: int, *, counts: str) -> list[float]:
    """The fraction of training batches from each source. A ratio that counts images gives each source batches in
    proportion to ratio / batch size (the original: 1:4 images at 2 vs 8 per batch is one batch of each)."""
    ratio = s.get("DATALOADER.DATASET_RATIO") or [1] * sources
    weights = [r / b for r, b in zip(ratio, batch_sizes(s, sources))] if counts == "image" else list(ratio)
    return [round(w / sum(weights), 6) for w in weights]


def _repeat_factors(flags: list[bool], s: dict) -> tuple[list[bool], float | None]:
    """Which sources are repeat-factor sampled, and the threshold where any is."""
    return list(flags), s["DATALOADER.REPEAT_THRESHOLD"] if any(flags) else None


def _original_repeat_factors(s: dict, sources: int) -> tuple[list[bool], float | None]:
    sampler = s["DATALOADER.SAMPLER_TRAIN"]
    if sampler == "MultiDatasetSampler":
        return _repeat_factors(s["DATALOADER.USE_RFS"], s)
    return _repeat_factors([sampler == "RepeatFactorTrainingSampler"] * sources, s)


def _ours_repeat_factors(s: dict, sources: int) -> tuple[list[bool], float | None]:
    anns = s["DATALOADER.DATASET_ANN"] or ["box"] * sources  # ovd repeat-factor samples box-labelled sources only
    return _repeat_factors([s["DATALOADER.SAMPLER_TRAIN"] == "RepeatFactorTrainingSampler" and a == "box"
                            for a in anns], s)


def _original_init(s: dict) -> str:
    """Which model a config starts from: "imagenet", or the stage of the chain ("base", "rkd")."""
    weights = s["MODEL.WEIGHTS"]
    if weights.endswith("ImageNetPretrained/MSRA/R-50.pkl"):
        return "imagenet"
    return re.fullmatch(r"saved_models/(coco|lvis)_ovd_(\w+)\.pth", weights).group(2)


def _ours_init(s: dict) -> str:
    if not s["MODEL.WEIGHTS"] and s["MODEL.BACKBONE.WEIGHTS"].endswith("/R-50.pkl"):
        return "imagenet"
    return re.fullmatch(r"\./output/(coco|lvis)/(\w+)_r50_(c4|fpn)/model_final\.pth", s["MODEL.WEIGHTS"]).group(2)


# keys compared together, as one derived setting: name -> (keys, derived setting of the original, of ours)
GROUPS = {
    "train resize per source": (
        {"INPUT.MIN_SIZE_TRAIN", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "INPUT.MAX_SIZE_TRAIN",
         "DATALOADER.DATASET_MIN_SIZES", "DATALOADER.DATASET_MAX_SIZES"},
        train_resize, train_resize),
    "batch size per source": ({"DATALOADER.DATASET_BS"}, batch_sizes, batch_sizes),
    "repeat-factor sampling": (
        {"DATALOADER.SAMPLER_TRAIN", "DATALOADER.USE_RFS", "DATALOADER.REPEAT_THRESHOLD"},
        _original_repeat_factors, _ours_repeat_factors),
    "initial weights": ({"MODEL.WEIGHTS"}, lambda s, n: _original_init(s), lambda s, n: _ours_init(s)),
}
GROUPED = set().union(*(keys for keys, _, _ in GROUPS.values()))
SHARES = "DATALOADER.DATASET_RATIO"  # compared by test_batch_shares_match_the_original


def _normalise(key: str, value):
    """The original's ``value`` of ``key`` as ovd spells it."""
    if key == "MODEL.ROI_HEADS.IOU_THRESHOLD":
        (value,) = value  # detectron2's IOU_THRESHOLDS [0.5] with IOU_LABELS [0, 1]: one threshold
    if key in ("DATASETS.TRAIN", "DATASETS.TEST"):
        return [DATASET_NAMES.get(v, v) for v in value]
    return VALUE_MAPS[key].get(value, value) if key in VALUE_MAPS else value


def _readme_deviations() -> str:
    text = (ROOT / "datasets/README.md").read_text()
    start = text.find("## The paper's recipes")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _original_keys(recipe: dict) -> set[str]:
    """The original's keys a config's entry accounts for: compared (their source names the key) or skipped."""
    keys = set(recipe["skipped"])
    for _, source in recipe["compared"].values():
        file, _, key = source.rpartition(": ")
        if file.endswith((".yaml", "config/defaults.py", "ovd/config.py")):
            keys.add(key)
    return keys


def test_table_covers_the_paper_configs():
    stages = ("base", "rkd", "pis", "rkd_pis", "rkd_pis_wt", "rkd_pis_wt_8x")
    assert set(RECIPES) == {f"configs/{f}/{s}_{a}.yaml" for f, a in (("coco", "r50_c4"), ("lvis", "r50_fpn"))
                            for s in stages}
    for path, recipe in RECIPES.items():
        assert (ROOT / path).is_file(), path
        assert not set(recipe["compared"]) & set(recipe["skipped"]), path
        assert all(reason for reason in list(recipe["skipped"].values()) + list(TABLE["skipped"].values()))
        assert all(len(entry) == 2 and entry[1] for entry in recipe["compared"].values()), path
        assert len(recipe["compared"]) >= 80, path
    # the original has the same keys in every config: each is compared or skipped in each
    accounted = {path: _original_keys(recipe) for path, recipe in RECIPES.items()}
    assert len({frozenset(keys) for keys in accounted.values()}) == 1, accounted
    assert not set(TABLE["skipped"]) & next(iter(accounted.values()))


@pytest.mark.parametrize("path", sorted(RECIPES))
def test_settings_match_the_original(path):
    ours, original = _ours(path), _original(path)
    sources = len(original["DATASETS.TRAIN"])
    assert len(ours["DATASETS.TRAIN"]) == sources
    wrong = []
    for key, value in original.items():
        if key in GROUPED or key == SHARES:
            continue
        if key not in ours:
            wrong.append(f"{key}: not a key of ovd's config")
            continue
        expected, got = _normalise(key, value), ours[key]
        same = got == pytest.approx(expected) if isinstance(expected, float) else got == expected
        documented = key in DEVIATIONS and DEVIATIONS[key](got, value) and f"`{key}`" in _readme_deviations()
        if not same and not documented:
            wrong.append(f"{key}: ours {got!r}, the original {value!r} ({RECIPES[path]['compared'][key][1]})")
    for name, (keys, of_original, of_ours) in GROUPS.items():
        if keys & set(original):
            expected, got = of_original(original, sources), of_ours(ours, sources)
            if got != expected:
                wrong.append(f"{name}: ours {got}, the original {expected} (from {sorted(keys & set(original))})")
    assert not wrong, f"{path} differs from {RECIPES[path]['original']}:\n" + "\n".join(wrong)


MULTI_SOURCE = sorted(p for p, r in RECIPES.items() if SHARES in r["compared"])


@pytest.mark.parametrize("path", MULTI_SOURCE)
def test_batch_shares_match_the_original(path):
    ours, original = _ours(path), _original(path)
    sources = len(original["DATASETS.TRAIN"])
    assert batch_shares(ours, sources, counts=OURS_RATIO_COUNTS) == batch_shares(original, sources, counts="image")


def test_equivalent_forms_compare_equal():
    s = {"INPUT.MIN_SIZE_TRAIN": [800, 800], "INPUT.MIN_SIZE_TRAIN_SAMPLING": "range", "INPUT.MAX_SIZE_TRAIN": 1333}
    assert train_resize(s, 1) == train_resize({**s, "INPUT.MIN_SIZE_TRAIN": [800],
                                               "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice"}, 1) == [([800], 1333)]
    per_source = {"DATALOADER.DATASET_MIN_SIZES": [[800, 800], [400, 400]], "DATALOADER.DATASET_MAX_SIZES": [1333, 667],
                  "INPUT.MIN_SIZE_TRAIN_SAMPLING": "range"}
    assert train_resize(per_source, 2) == [([800], 1333), ([400], 667)]
    mix = {"DATALOADER.DATASET_RATIO": [1, 4], "DATALOADER.DATASET_BS": [2, 8]}
    assert batch_shares(mix, 2, counts="image") == batch_shares({**mix, "DATALOADER.DATASET_RATIO": [1, 1]}, 2,
                                                                counts="batch") == [0.5, 0.5]
    assert batch_sizes({"SOLVER.IMS_PER_BATCH": 16}, 1) == [2]
    assert _normalise("MODEL.ROI_HEADS.IOU_THRESHOLD", [0.5]) == 0.5
    assert _normalise("MODEL.ROI_BOX_HEAD.POOLER_ALIGNED", "ROIAlignV2") is True
    rfs = {"DATALOADER.SAMPLER_TRAIN": "MultiDatasetSampler", "DATALOADER.USE_RFS": [True, False],
           "DATALOADER.REPEAT_THRESHOLD": 0.001}
    ours_rfs = {"DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler", "DATALOADER.DATASET_ANN": ["box", "image"],
                "DATALOADER.REPEAT_THRESHOLD": 0.001}
    assert _original_repeat_factors(rfs, 2) == _ours_repeat_factors(ours_rfs, 2) == ([True, False], 0.001)
    assert _normalise("SOLVER.CLIP_GRADIENTS", False) == 0.0


def test_eight_x_trains_box_images_at_many_scales():
    """The original's 8x recipes resize each box image to one of 37 short sides, 128 to 1280 px in steps of 32."""
    for family, arch in (("coco", "r50_c4"), ("lvis", "r50_fpn")):
        ours = _ours(f"configs/{family}/rkd_pis_wt_8x_{arch}.yaml")
        (box_sides, box_cap), (image_sides, image_cap) = train_resize(ours, 2)
        assert box_sides == list(range(128, 1281, 32)) and len(box_sides) == 37 and box_cap == 1333
        assert (image_sides, image_cap) == ([400], 667)
