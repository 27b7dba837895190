"""A catalogue of bad inputs: each row is one mistake a user can make, the exception it raises and what
its message must name — the file, key, id or value at fault. `docs/ERRORS.md` lists the same cases by id.

In the patterns, ``<tmp>`` stands for the test's tmp_path, ``<weights>`` for the tiny detector's checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from inference_helpers import CONFIG
from tools_loader import load_tool
from ovd.clip.text import load_templates, load_text_embeddings, save_text_embeddings
from ovd.config import ConfigError, load_config
from ovd.data.build import open_region_store
from ovd.data.catalog import DatasetSpec, get_dataset, register_config_datasets
from ovd.data.datasets import load_coco_json, load_image_labels
from ovd.data.mapper import DatasetMapper
from ovd.data.proposals import load_proposals
from ovd.data.region_store import RegionStore, RegionStoreWriter
from ovd.engine.trainer import check_no_novel_boxes
from ovd.engine.checkpoint import CheckpointError, Checkpointer, load_model_state, read_checkpoint
from ovd.evaluation import LVISEvaluator, evaluate_lvis
from ovd.inference import Detector
from ovd.inference.vocabulary import Vocabulary, parse_vocabulary, preset_vocabulary, resolve_templates
from ovd.modeling.build import build_model
from ovd.modeling.pretrained import UnsafePickleError, read_pretrained_resnet
from ovd.pseudo_labels.miner import import_pseudo_boxes

ERRORS_MD = Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md"


# ---- small bad files ---------------------------------------------------------------------------------------------

def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _json(path: Path, obj) -> Path:
    return _write(path, json.dumps(obj))


def _edit_json(path: Path, **changes) -> Path:
    """Rewrite a JSON object file with ``changes`` (None deletes the key)."""
    data = json.loads(path.read_text())
    data.update(changes)
    return _json(path, {k: v for k, v in data.items() if v is not None})


def _yaml(t: Path, text: str) -> Path:
    return _write(t / "c.yaml", text)


def _png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = {"id": 1, "file_name": "a.png", "height": 8, "width": 8}
CUBE = {"id": 1, "name": "cube"}


def _ann(**changes) -> dict:
    return {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], **changes}


def _coco(t: Path, *, images=(IMAGE,), annotations=(), categories=(CUBE,), novel=()) -> DatasetSpec:
    """A COCO file ``<tmp>/ann.json`` whose images live in ``<tmp>/images``."""
    data = {"images": list(images), "annotations": list(annotations), "categories": list(categories)}
    return DatasetSpec("ann", _json(t / "ann.json", data), t / "images", tuple(novel))


def _labels(t: Path, *images: dict) -> DatasetSpec:
    """An image-label file ``<tmp>/labels.json`` (categories cube=1, ball=2)."""
    data = {"images": list(images), "categories": [CUBE, {"id": 2, "name": "ball"}]}
    return DatasetSpec("labels", _json(t / "labels.json", data), t / "images")


LABELLED = {**IMAGE, "pos_category_ids": [1]}


def _custom(t: Path, *, image: bool = True, **entry):
    """Declare ``<tmp>/ann.json`` (one image, a.png; with ``image`` False the folder holds b.png instead) as
    DATASETS.CUSTOM entry ``mine`` of a config in ``<tmp>``, then look the name up."""
    _coco(t, categories=[CUBE, {"id": 2, "name": "ball"}])
    _write(t / "images" / ("a.png" if image else "b.png"), _png(8, 8))
    text = "DATASETS:\n  CUSTOM:\n    - {NAME: mine, JSON: ann.json, IMAGES: images, " + \
        ", ".join(f"{k}: {v}" for k, v in entry.items()) + "}\n"
    register_config_datasets(load_config(_yaml(t, text)).DATASETS.CUSTOM)
    return get_dataset("mine")


def _labelled_records(t: Path) -> list:
    return load_image_labels(_labels(t, LABELLED)).records


def _map_first(t: Path, image: bytes | None):
    """Write ``<tmp>/images/a.png`` (unless None) and map the 8x8 image of ``_coco`` as the data loader does."""
    if image is not None:
        _write(t / "images" / "a.png", image)
    record = load_coco_json(_coco(t)).records[0]
    return DatasetMapper(is_train=False, min_sizes=[8], max_size=8, category_ids=[1])(record)


def _store(t: Path) -> Path:
    """A finished region store ``<tmp>/store``: image 1 with two 4-d regions, teacher "toy"."""
    writer = RegionStoreWriter(t / "store", job={"model_name": "toy", "dim": 4})
    writer.write_chunk(0, image_ids=[1], counts=[2], boxes=np.zeros((2, 4)), embeds=np.full((2, 4), 0.5))
    writer.finalize([0])
    return t / "store"


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _delete(path: Path) -> Path:
    path.unlink()
    return path


def _npy(path: Path, array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(array), allow_pickle=True)
    return path


def _vocab_npy(t: Path, names: list[str]) -> Path:
    return save_text_embeddings(t / "e.npy", np.eye(len(names), 4, dtype=np.float32), names=names, templates=["{}"],
                                model_name="toy", pretrained=None)


def _ckpt(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _flip_tensor_byte(path: Path) -> Path:
    """Change one byte inside the stored tensor data of a ``torch.save`` file (its zip CRC no longer matches)."""
    data = bytearray(path.read_bytes())
    at = data.find(np.full(64, 7.0, np.float32).tobytes())
    assert at > 0
    data[at + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _load_into(model: nn.Module, path: Path) -> list[str]:
    return load_model_state(model, read_checkpoint(path)["model"], source=str(path))


def _checkpointer(folder: Path) -> Checkpointer:
    model = nn.Linear(2, 2)
    return Checkpointer(folder, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def case(case_id: str, call, error: type[BaseException], pattern: str):
    return pytest.param(call, error, pattern, id=case_id)


# ---- the catalogue: inputs given as files or values --------------------------------------------------------------

CONFIG_CASES = [
    case("config-unknown-key", lambda t: load_config(_yaml(t, "SOLVER:\n  BASE_RL: 0.1\n")), ConfigError,
         r"unknown config key SOLVER\.BASE_RL in <tmp>/c\.yaml; did you mean SOLVER\.BASE_LR\?"),
    case("config-unknown-section", lambda t: load_config(_yaml(t, "MODLE:\n  DEVICE: cpu\n")), ConfigError,
         r"unknown config key MODLE in <tmp>/c\.yaml; did you mean MODEL\?"),
    case("config-unknown-override", lambda t: load_config(None, ["MODEL.ROI_HEADS.SCORE_THRESH", "0.3"]), ConfigError,
         r"unknown config key MODEL\.ROI_HEADS\.SCORE_THRESH in command-line override MODEL\.ROI_HEADS\.SCORE_THRESH; "
         r"did you mean MODEL\.ROI_HEADS\.SCORE_THRESH_TEST\?"),
    case("config-lower-case-override", lambda t: load_config(None, ["solver.base_lr=0.1"]), ConfigError,
         r"unknown config key solver in command-line override solver\.base_lr; did you mean SOLVER\?"),
    case("config-wrong-type", lambda t: load_config(_yaml(t, "SOLVER:\n  MAX_ITER: ten\n")), ConfigError,
         r"config key SOLVER\.MAX_ITER in <tmp>/c\.yaml: expected int, got .*'ten'"),
    case("config-wrong-type-override", lambda t: load_config(None, ["MODEL.MASK_ON", "maybe"]), ConfigError,
         r"config key MODEL\.MASK_ON in command-line override MODEL\.MASK_ON: expected bool, got .*'maybe'"),
    case("config-wrong-list-element", lambda t: load_config(None, ["SOLVER.STEPS", "[60000, soon]"]), ConfigError,
         r"config key SOLVER\.STEPS\[1\] in command-line override SOLVER\.STEPS: expected int, got .*'soon'"),
    case("config-scalar-for-list", lambda t: load_config(None, ["DATASETS.TRAIN", "shapes_train"]), ConfigError,
         r"config key DATASETS\.TRAIN in command-line override DATASETS\.TRAIN: expected List\[str\]"),
    case("config-scalar-for-section", lambda t: load_config(_yaml(t, "SOLVER: 3\n")), ConfigError,
         r"config key SOLVER in <tmp>/c\.yaml must be a mapping of sub-keys, got 3"),
    case("config-bad-yaml", lambda t: load_config(_yaml(t, "SOLVER:\n\tBASE_LR: 0.1\n")), ConfigError,
         r"(?s)config file <tmp>/c\.yaml is not valid YAML: .*'\\t'.*line 2, column 1"),
    case("config-not-a-mapping", lambda t: load_config(_yaml(t, "- MODEL\n- SOLVER\n")), ConfigError,
         r"config file <tmp>/c\.yaml must hold a mapping of keys, got list"),
    case("config-file-missing", lambda t: load_config(t / "nope.yaml"), ConfigError,
         r"config file not found: <tmp>/nope\.yaml$"),
    case("config-base-missing", lambda t: load_config(_yaml(t, "_BASE_: base.yaml\n")), ConfigError,
         r"config file not found: <tmp>/base\.yaml \(the _BASE_ of <tmp>/c\.yaml\)"),
    case("config-base-cycle", lambda t: load_config(_yaml(t, "_BASE_: c.yaml\n")), ConfigError,
         r"_BASE_ cycle: <tmp>/c\.yaml -> <tmp>/c\.yaml"),
    case("config-base-not-a-name", lambda t: load_config(_yaml(t, "_BASE_: 5\n")), ConfigError,
         r"_BASE_ in <tmp>/c\.yaml must be a file name or a list of them, got 5"),
    case("config-override-without-value", lambda t: load_config(None, ["SOLVER.MAX_ITER"]), ConfigError,
         r"override 'SOLVER\.MAX_ITER' has no value \(use KEY=VALUE or KEY VALUE\)"),
    case("config-override-empty-key", lambda t: load_config(None, ["=0.1"]), ConfigError,
         r"override '=0\.1': '' is not a config key"),
    case("config-override-empty-part", lambda t: load_config(None, ["SOLVER..BASE_LR=0.1"]), ConfigError,
         r"override 'SOLVER\.\.BASE_LR=0\.1': 'SOLVER\.\.BASE_LR' is not a config key"),
]

DATASET_CASES = [
    case("data-not-json", lambda t: load_coco_json(DatasetSpec("ann", _write(t / "ann.json", "{images: "), t)),
         ValueError, r"annotation file of dataset ann <tmp>/ann\.json is not valid JSON: .*line 1 column 2"),
    case("data-file-missing", lambda t: load_coco_json(DatasetSpec("ann", t / "ann.json", t)), FileNotFoundError,
         r"annotation file of dataset ann not found: <tmp>/ann\.json"),
    case("data-not-coco", lambda t: load_coco_json(DatasetSpec("ann", _json(t / "ann.json", [IMAGE]), t)), ValueError,
         r"<tmp>/ann\.json is not a COCO annotation file: it has no 'images' list"),
    case("data-image-entry-incomplete", lambda t: load_coco_json(_coco(t, images=[{"id": 3, "file_name": "a.png"}])),
         ValueError, r"<tmp>/ann\.json: image entry \{'id': 3, 'file_name': 'a\.png'\} needs id, file_name.*height"),
    case("data-no-images", lambda t: load_coco_json(_coco(t, images=[])), ValueError,
         r"dataset ann: <tmp>/ann\.json has no images"),
    case("data-unknown-image-id", lambda t: load_coco_json(_coco(t, annotations=[_ann(image_id=99)])), ValueError,
         r"<tmp>/ann\.json: annotation 7 refers to image_id 99, which is not in images"),
    case("data-unknown-category-id", lambda t: load_coco_json(_coco(t, annotations=[_ann(category_id=42)])),
         ValueError, r"<tmp>/ann\.json: annotation 7 has category_id 42, which is not in categories"),
    case("data-bad-bbox", lambda t: load_coco_json(_coco(t, annotations=[_ann(bbox=[1, 2, 3])])), ValueError,
         r"<tmp>/ann\.json: annotation 7 has bbox \[1, 2, 3\]; expected \[x, y, w, h\] numbers"),
    case("data-bbox-not-numbers", lambda t: load_coco_json(_coco(t, annotations=[_ann(bbox=[1, 2, "a", 4])])),
         ValueError, r"<tmp>/ann\.json: annotation 7 has bbox \[1, 2, 'a', 4\]; expected"),
    case("data-unknown-novel-id", lambda t: load_coco_json(_coco(t, novel=[5])), ValueError,
         r"dataset ann: novel category ids \[5\] are not in <tmp>/ann\.json"),
    case("data-rle-mask", lambda t: load_coco_json(
        _coco(t, annotations=[_ann(segmentation={"size": [8, 8], "counts": "04"})]), with_masks=True),
         ValueError, r"<tmp>/ann\.json: annotation 7 has an RLE mask; mask training \(MODEL\.MASK_ON\) needs polygons"),
    case("data-path-escapes-root", lambda t: load_coco_json(_coco(t, images=[{**IMAGE, "file_name": "../x.png"}])),
         ValueError, r"<tmp>/ann\.json: image file_name '\.\./x\.png' points outside the image folder <tmp>/images"),
    case("data-path-absolute", lambda t: load_coco_json(_coco(t, images=[{**IMAGE, "file_name": "/etc/passwd"}])),
         ValueError, r"<tmp>/ann\.json: image file_name '/etc/passwd' points outside the image folder <tmp>/images"),
    case("data-image-missing", lambda t: _map_first(t, None), FileNotFoundError,
         r"image 1 not found: <tmp>/images/a\.png"),
    case("data-image-not-an-image", lambda t: _map_first(t, b"GIF? no, a text file"), OSError,
         r"cannot read image 1 <tmp>/images/a\.png: cannot identify image file"),
    case("data-image-truncated", lambda t: _map_first(t, _png(8, 8)[:120]), OSError,
         r"cannot read image 1 <tmp>/images/a\.png: .*truncated"),
    case("data-image-size-mismatch", lambda t: _map_first(t, _png(10, 12)), ValueError,
         r"image <tmp>/images/a\.png is 10x12 but its annotation says 8x8"),
    case("data-unknown-dataset-name", lambda t: get_dataset("shapes_vall"), KeyError,
         r"unknown dataset 'shapes_vall' \(did you mean shapes_val\?\); known: .*shapes_val\b"),
    case("custom-json-missing", lambda t: _custom(t, JSON="train.json"), FileNotFoundError,
         r"dataset mine: annotation file <tmp>/train\.json not found \(JSON of DATASETS\.CUSTOM\)"),
    case("custom-images-missing", lambda t: _custom(t, image=False), FileNotFoundError,
         r"dataset mine: 1 of the 1 images listed in <tmp>/ann\.json are not in <tmp>/images, e\.g\. a\.png"),
    case("custom-novel-not-a-category", lambda t: _custom(t, NOVEL="[bal]"), ValueError,
         r"dataset mine: NOVEL class 'bal' is not a category name or id of <tmp>/ann\.json \(did you mean 'ball'\?\)"),
    case("custom-builtin-name", lambda t: register_config_datasets(
        load_config(None, ["DATASETS.CUSTOM", "[{NAME: shapes_val, JSON: a.json, IMAGES: im}]"]).DATASETS.CUSTOM),
         ValueError, r"DATASETS\.CUSTOM\[0\]: 'shapes_val' is the name of a built-in dataset"),
    case("custom-bad-ann-type", lambda t: _custom(t, ANN_TYPE="boxes"), ValueError,
         r"DATASETS\.CUSTOM\[0\] \(mine\): ANN_TYPE 'boxes'; expected one of \('box', 'image'\)"),
    case("labels-missing-pos-category-ids", lambda t: load_image_labels(_labels(t, IMAGE)), ValueError,
         r"<tmp>/labels\.json: image 1 has no pos_category_ids"),
    case("labels-image-entry-incomplete", lambda t: load_image_labels(_labels(t, {"id": 1, "file_name": "a.png",
                                                                                "pos_category_ids": [1]})),
         ValueError, r"<tmp>/labels\.json: image entry \{'id': 1, .*\} needs id, file_name, height and width"),
    case("labels-unknown-category-id", lambda t: load_image_labels(_labels(t, {**IMAGE, "pos_category_ids": [1, 9]})),
         ValueError, r"<tmp>/labels\.json: image 1 is labelled with category ids \[9\], not in categories"),
    case("labels-path-escapes-root", lambda t: load_image_labels(_labels(t, {**LABELLED, "file_name": "../../x.png"})),
         ValueError, r"<tmp>/labels\.json: image file_name '\.\./\.\./x\.png' points outside the image folder"),
]

PROPOSAL_CASES = [
    case("proposals-unknown-image-id", lambda t: load_proposals(
        _json(t / "p.json", [{"image_id": 5, "bbox": [0, 0, 2, 2], "score": 0.9}]), image_sizes={1: (8, 8)}),
         ValueError, r"proposals file <tmp>/p\.json has proposals for 1 image ids not in the dataset \(first: \[5\]\)"),
    case("proposals-missing-field", lambda t: load_proposals(_json(t / "p.json", [
        {"image_id": 1, "bbox": [0, 0, 2, 2], "score": 0.9}, {"image_id": 1, "bbox": [0, 0, 2, 2]}])),
         ValueError, r"proposals file <tmp>/p\.json: entry 1 \(\{'image_id': 1, 'bbox': \[0, 0, 2, 2\]\}\) is not "
                     r"\{image_id: int, bbox: \[x, y, w, h\], score\}"),
    case("proposals-bbox-of-3", lambda t: load_proposals(
        _json(t / "p.json", [{"image_id": 1, "bbox": [0, 0, 2], "score": 0.9}])),
         ValueError, r"proposals file <tmp>/p\.json: entry 0 \(.*'bbox': \[0, 0, 2\].*\) is not"),
    case("proposals-string-image-id", lambda t: load_proposals(
        _json(t / "p.json", [{"image_id": "1", "bbox": [0, 0, 2, 2], "score": 0.9}])),
         ValueError, r"proposals file <tmp>/p\.json: entry 0 \(\{'image_id': '1'.*\) is not"),
    case("proposals-nan", lambda t: load_proposals(
        _json(t / "p.json", [{"image_id": 1, "bbox": [0, float("nan"), 2, 2], "score": 0.9}])),
         ValueError, r"proposals file <tmp>/p\.json: entry 0 \(.*nan.*\) has a non-finite bbox or score"),
    case("proposals-not-a-list", lambda t: load_proposals(_json(t / "p.json", {"1": [[0, 0, 2, 2]]})), ValueError,
         r"proposals file <tmp>/p\.json must hold a JSON list of \{image_id, bbox, score\}, got dict"),
    case("proposal-model-novel-boxes", lambda t: check_no_novel_boxes(
        load_config("configs/shapes/proposals_oln.yaml", ["DATASETS.TEST", "[]"]),
        [load_coco_json(_coco(t, annotations=[_ann()], novel=[1]))]),
         ValueError, r"dataset ann \(<tmp>/ann\.json\) has boxes of classes that are novel in .*'cube' \(id 1, 1 boxes\)"
                     r".*MODEL\.PROPOSAL_GENERATOR\.ALLOW_NOVEL_BOXES true"),
    case("proposal-generator-unknown", lambda t: build_model(
        load_config("configs/shapes/proposals_oln.yaml", ["MODEL.PROPOSAL_GENERATOR.NAME", "MAVL"])),
         ValueError, r"MODEL\.PROPOSAL_GENERATOR\.NAME: unknown proposal generator 'MAVL'; expected one of \('RPN', 'OLN'\)"),
    case("model-meta-architecture-unknown", lambda t: build_model(
        load_config("configs/shapes/proposals_oln.yaml", ["MODEL.META_ARCHITECTURE", "OLN"])),
         ValueError, r"MODEL\.META_ARCHITECTURE: unknown model 'OLN'; expected one of \('GeneralizedRCNN', 'ProposalNetwork'\)"),
]

STORE_CASES = [
    case("store-not-found", lambda t: RegionStore.open(t / "nowhere"), FileNotFoundError,
         r"region store not found: <tmp>/nowhere"),
    case("store-not-a-store", lambda t: RegionStore.open(t), FileNotFoundError,
         r"<tmp> is not a region store: it has no meta\.json"),
    case("store-interrupted", lambda t: RegionStore.open(_write(t / "s" / "chunks" / "job.json", "{}").parents[1]),
         ValueError, r"region store <tmp>/s is incomplete \(an extraction was interrupted\); run it again to resume"),
    case("store-not-complete", lambda t: RegionStore.open(_edit_json(_store(t) / "meta.json", complete=False).parent),
         ValueError, r"region store <tmp>/store is incomplete: <tmp>/store/meta\.json is not marked complete"),
    case("store-other-format", lambda t: RegionStore.open(_edit_json(_store(t) / "meta.json", format_version=9).parent),
         ValueError, r"region store <tmp>/store has format_version 9; this code reads version 1"),
    case("store-missing-metadata", lambda t: RegionStore.open(_edit_json(_store(t) / "meta.json", dim=None).parent),
         ValueError, r"region store metadata <tmp>/store/meta\.json lacks \['dim'\]"),
    case("store-meta-not-json", lambda t: RegionStore.open(_write(_store(t) / "meta.json", "{").parent), ValueError,
         r"region store metadata <tmp>/store/meta\.json is not valid JSON"),
    case("store-other-teacher", lambda t: RegionStore.open(_store(t), expected_model="ViT-B-32"), ValueError,
         r"region store <tmp>/store holds embeddings of CLIP model 'toy', but model 'ViT-B-32' is expected"),
    case("store-other-dim", lambda t: RegionStore.open(_store(t), expected_dim=512), ValueError,
         r"region store <tmp>/store holds embeddings of dim 4, but dim 512 is expected"),
    case("store-other-dim-config", lambda t: open_region_store(
        str(_store(t)), load_config(None, ["MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM", "512"]),
        key="MODEL.RKD_FEAT_PATH"),
         ValueError, r"MODEL\.RKD_FEAT_PATH: region store <tmp>/store holds embeddings of dim 4, but dim 512"),
    case("store-truncated", lambda t: RegionStore.open(_truncate(_store(t) / "embeddings.npy").parent), ValueError,
         r"region store file <tmp>/store/embeddings\.npy is truncated or corrupt"),
    case("store-array-missing", lambda t: RegionStore.open(_delete(_store(t) / "boxes.npy").parent),
         FileNotFoundError, r"region store file missing: <tmp>/store/boxes\.npy"),
    case("store-array-wrong-shape", lambda t: RegionStore.open(
        _npy(_store(t) / "embeddings.npy", np.zeros((2, 8), np.float16)).parent),
         ValueError, r"region store file <tmp>/store/embeddings\.npy holds float16 \[2, 8\], but meta\.json says "
                     r"float16 \[2, 4\]"),
]

PSEUDO_BOX_CASES = [
    case("pseudo-file-missing", lambda t: load_image_labels(_labels(t, LABELLED), t / "pseudo.json"),
         FileNotFoundError, r"pseudo-box file not found: <tmp>/pseudo\.json"),
    case("pseudo-not-json", lambda t: load_image_labels(_labels(t, LABELLED), _write(t / "pseudo.json", "[{")),
         ValueError, r"pseudo-box file <tmp>/pseudo\.json is not valid JSON"),
    case("pseudo-not-coco", lambda t: load_image_labels(_labels(t, LABELLED), _json(t / "pseudo.json", [_ann()])),
         ValueError, r"pseudo-box file <tmp>/pseudo\.json is not COCO JSON with an 'annotations' list"),
    case("pseudo-unknown-image-id", lambda t: load_image_labels(
        _labels(t, LABELLED), _json(t / "pseudo.json", {"annotations": [_ann(image_id=77)]})),
         ValueError, r"pseudo-box file <tmp>/pseudo\.json has boxes for image ids \[77\] that are not in dataset "
                     r"labels \(<tmp>/labels\.json\)"),
    case("pseudo-malformed", lambda t: load_image_labels(
        _labels(t, LABELLED), _json(t / "pseudo.json", {"annotations": [{"image_id": 1, "bbox": [1, 1, 4, 4]}]})),
         ValueError, r"pseudo-box file <tmp>/pseudo\.json: annotation 0 \(.*\) is not \{image_id: int, category_id: int"),
    case("pseudo-none-usable", lambda t: load_image_labels(
        _labels(t, LABELLED), _json(t / "pseudo.json", {"annotations": [_ann(category_id=2)]})),
         ValueError, r"pseudo-box file <tmp>/pseudo\.json leaves no image of dataset labels with a pseudo box"),
    case("pseudo-import-malformed", lambda t: import_pseudo_boxes(
        _json(t / "pseudo.json", {"annotations": [_ann(bbox=[1, 1, 4])]}), _labelled_records(t)),
         ValueError, r"pseudo-box file <tmp>/pseudo\.json: annotation 0 \(.*'bbox': \[1, 1, 4\].*\) is not "
                     r"\{image_id: int, category_id: int, bbox"),
    case("pseudo-import-unknown-image-id", lambda t: import_pseudo_boxes(
        _json(t / "pseudo.json", {"annotations": [_ann(image_id=77)]}), _labelled_records(t)),
         ValueError, r"pseudo-box file <tmp>/pseudo\.json has boxes for 1 image ids that are not in the image-label "
                     r"dataset \(first: \[77\]\)"),
]

TEXT_EMBEDDING_CASES = [
    case("text-file-missing", lambda t: load_text_embeddings(t / "e.npy"), FileNotFoundError,
         r"text embeddings file not found: <tmp>/e\.npy"),
    case("text-not-npy", lambda t: load_text_embeddings(_write(t / "e.npy", "mug,cup\n")), ValueError,
         r"text embeddings file <tmp>/e\.npy must be a \[C, D\] float array saved with numpy\.save; it is not a "
         r"\.npy file"),
    case("text-torch-file", lambda t: load_text_embeddings(_ckpt(t / "e.npy", torch.eye(3))), ValueError,
         r"text embeddings file <tmp>/e\.npy must be .*; it is a zip archive \(\.npz or torch\.save\)"),
    case("text-pickled-objects", lambda t: load_text_embeddings(_npy(t / "e.npy", np.array([{}], dtype=object))),
         ValueError, r"text embeddings file <tmp>/e\.npy is not a plain numeric array \(pickled objects are refused\)"),
    case("text-integer-array", lambda t: load_text_embeddings(_npy(t / "e.npy", np.zeros((3, 4), np.int64))),
         ValueError, r"text embeddings file <tmp>/e\.npy must hold a float \[C, D\] array, got dtype int64"),
    case("text-wrong-shape", lambda t: load_text_embeddings(_npy(t / "e.npy", np.ones(8, np.float32))), ValueError,
         r"text embeddings file <tmp>/e\.npy must hold a 2-D \[C, D\] array with C, D > 0, got shape \[8\]"),
    case("text-no-rows", lambda t: load_text_embeddings(_npy(t / "e.npy", np.ones((0, 4), np.float32))), ValueError,
         r"text embeddings file <tmp>/e\.npy must hold a 2-D \[C, D\] array with C, D > 0, got shape \[0, 4\]"),
    case("text-nan-rows", lambda t: load_text_embeddings(
        _npy(t / "e.npy", np.array([[1, 0], [np.nan, 1]], np.float32))),
         ValueError, r"text embeddings file <tmp>/e\.npy contains non-finite values in rows \[1\]"),
    case("text-zero-rows", lambda t: load_text_embeddings(_npy(t / "e.npy", np.array([[1, 0], [0, 0]], np.float32))),
         ValueError, r"text embeddings file <tmp>/e\.npy has all-zero rows \[1\]"),
    case("text-transposed", lambda t: load_text_embeddings(
        _npy(t / "e.npy", np.ones((4, 3), np.float32)), expected_names=["mug", "cup", "pen"]),
         ValueError, r"text embeddings file <tmp>/e\.npy has 4 rows but 3 class names were expected \(looks "
                     r"transposed"),
    case("text-names-mismatch", lambda t: load_text_embeddings(
        _vocab_npy(t, ["mug", "cup", "pen"]), expected_names=["mug", "cup", "box"]),
         ValueError, r"text embeddings file <tmp>/e\.npy was made for a different vocabulary: name 2 is 'pen' in "
                     r"<tmp>/e\.json, 'box' expected"),
    case("text-sidecar-count", lambda t: load_text_embeddings(_edit_json(
        _vocab_npy(t, ["mug", "cup", "pen"]).with_suffix(".json"), names=["mug", "cup"]).with_suffix(".npy")),
         ValueError, r"text embeddings file <tmp>/e\.npy has 3 rows but its sidecar <tmp>/e\.json lists 2 names"),
    case("text-save-not-npy", lambda t: save_text_embeddings(
        t / "e.pt", np.eye(2, dtype=np.float32), names=["mug", "cup"], templates=["{}"], model_name="toy",
        pretrained=None), ValueError, r"text embeddings path must end in \.npy, got <tmp>/e\.pt"),
    case("text-dim-vs-config", lambda t: build_model(load_config(CONFIG, [
        "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", str(_vocab_npy(t, ["mug", "cup"])),
        "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM", "512"])),
         ValueError, r"MODEL\.ROI_BOX_HEAD\.ZEROSHOT_WEIGHT_PATH <tmp>/.*\.npy holds 4-d embeddings, but "
                     r"MODEL\.ROI_BOX_HEAD\.ZEROSHOT_WEIGHT_DIM is 512"),
]

CHECKPOINT_CASES = [
    case("checkpoint-missing", lambda t: read_checkpoint(t / "m.pth"), FileNotFoundError,
         r"checkpoint not found: <tmp>/m\.pth"),
    case("checkpoint-truncated", lambda t: read_checkpoint(
        _truncate(_ckpt(t / "m.pth", {"model": {"w": torch.ones(64)}}))),
         CheckpointError, r"cannot read checkpoint <tmp>/m\.pth: .*zip archive"),
    case("checkpoint-bytes-changed", lambda t: read_checkpoint(
        _flip_tensor_byte(_ckpt(t / "m.pth", {"model": {"w": torch.full((64,), 7.0)}}))),
         CheckpointError, r"checkpoint <tmp>/m\.pth is corrupted: the bytes of '.*' do not match their CRC-32"),
    case("checkpoint-not-a-checkpoint", lambda t: read_checkpoint(_write(t / "m.pth", "MODEL:\n  DEVICE: cpu\n")),
         CheckpointError, r"cannot read checkpoint <tmp>/m\.pth: it is not a file written by torch\.save"),
    case("checkpoint-pickled-object", lambda t: read_checkpoint(_ckpt(t / "m.pth", argparse.Namespace(lr=0.1))),
         CheckpointError, r"cannot read checkpoint <tmp>/m\.pth: it holds a Python object \(argparse\.Namespace\) "
                          r"besides tensors; ovd reads weights only"),
    case("checkpoint-not-a-dict", lambda t: read_checkpoint(_ckpt(t / "m.pth", [torch.ones(2)])), CheckpointError,
         r"checkpoint <tmp>/m\.pth holds a list, expected a dict"),
    case("checkpoint-wrong-architecture", lambda t: _load_into(nn.Sequential(nn.Linear(4, 2)), _ckpt(
        t / "m.pth", nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)).state_dict())),
         CheckpointError, r"checkpoint <tmp>/m\.pth does not fit the model built from the config:\n"
                          r"  unexpected keys \(2\): 2\.bias, 2\.weight\n"
                          r"  0\.weight: checkpoint shape \[3, 4\], model shape \[2, 4\]"),
    case("checkpoint-resume-none-usable", lambda t: _checkpointer(_write(t / "model_0000009.pth", "x").parent).resume(),
         CheckpointError, r"--resume: no usable checkpoint in <tmp> .*:\n"
                          r"  cannot read checkpoint <tmp>/model_0000009\.pth"),
    case("checkpoint-resume-no-optimizer", lambda t: _checkpointer(_ckpt(
        t / "model_0000009.pth", {"model": nn.Linear(2, 2).state_dict(), "iteration": 9}).parent).resume(),
         CheckpointError, r"checkpoint <tmp>/model_0000009\.pth has no 'optimizer' state; cannot resume"),
]

def _lvis_gt(t: Path, **category) -> Path:
    """A one-image LVIS ground truth ``<tmp>/lvis.json`` with one category (``cube``, id 1)."""
    image = {**IMAGE, "neg_category_ids": [], "not_exhaustive_category_ids": []}
    return _json(t / "lvis.json", {"images": [image], "annotations": [{**_ann(), "area": 16.0}],
                                   "categories": [{**CUBE, **category}]})


EVALUATION_CASES = [
    case("eval-lvis-gt-without-frequency", lambda t: LVISEvaluator(_lvis_gt(t)), ValueError,
         r"LVIS ground-truth file <tmp>/lvis\.json is not an LVIS v1 file: category 1 \('cube'\) has no 'frequency'"),
    case("eval-detection-unknown-category", lambda t: evaluate_lvis(_lvis_gt(t, frequency="f"), [
        {"image_id": 1, "category_id": 9, "bbox": [1, 1, 4, 4], "score": 0.5}]), ValueError,
         r"detections have category_id 9, not in the ground truth <tmp>/lvis\.json"),
]


class _RunsCode:
    """Unpickles into a shell command: what a tampered weights file would hold."""

    def __reduce__(self):
        return os.system, ("true",)


BACKBONE_CASES = [
    case("backbone-pickle-runs-code", lambda t: read_pretrained_resnet(
        _write(t / "R-50.pkl", pickle.dumps({"conv1_w": _RunsCode()}, protocol=2))), UnsafePickleError,
         r"MODEL\.BACKBONE\.WEIGHTS <tmp>/R-50\.pkl: refusing to unpickle the global posix\.system"),
    case("backbone-unknown-file-kind", lambda t: read_pretrained_resnet(_write(t / "R-50.txt", "x")), ValueError,
         r"MODEL\.BACKBONE\.WEIGHTS <tmp>/R-50\.txt: unknown kind of file; expected a torchvision state dict"),
]

VOCABULARY_CASES = [
    case("vocabulary-empty", lambda t: Vocabulary.of([]), ValueError,
         r"the vocabulary is empty: give at least one class name"),
    case("vocabulary-duplicate", lambda t: Vocabulary.of(["mug", "stapler", "mug"]), ValueError,
         r"duplicate class names: \['mug'\]"),
    case("vocabulary-bare-string", lambda t: Vocabulary.of("red mug"), TypeError,
         r"a vocabulary is a list of class names, got the string 'red mug'"),
    case("vocabulary-blank-name", lambda t: parse_vocabulary("mug,,stapler"), ValueError,
         r"blank class names at positions \[1\]"),
    case("vocabulary-empty-file", lambda t: parse_vocabulary(str(_write(t / "names.txt", "\n \n"))), ValueError,
         r"vocabulary file <tmp>/names\.txt has no class names"),
    case("vocabulary-unknown-preset", lambda t: preset_vocabulary("cocoa"), ValueError,
         r"unknown vocabulary preset 'cocoa'; presets: coco, lvis, shapes"),
    case("templates-without-braces", lambda t: load_templates(_write(t / "t.txt", "a photo of a {}\na photo\n")),
         ValueError, r"each prompt template needs exactly one '\{\}' for the class name; bad templates: \['a photo'\]"),
    case("templates-file-missing", lambda t: resolve_templates(t / "t.txt"), FileNotFoundError,
         r"template file not found: <tmp>/t\.txt"),
]

FILE_CASES = (CONFIG_CASES + DATASET_CASES + PROPOSAL_CASES + STORE_CASES + PSEUDO_BOX_CASES + TEXT_EMBEDDING_CASES
              + CHECKPOINT_CASES + BACKBONE_CASES + EVALUATION_CASES + VOCABULARY_CASES)


def _pattern(pattern: str, tmp: Path, weights: Path | None = None) -> str:
    pattern = pattern.replace("<tmp>", re.escape(str(tmp)))
    return pattern.replace("<weights>", re.escape(str(weights))) if weights is not None else pattern


@pytest.mark.parametrize("call, error, pattern", FILE_CASES)
def test_bad_input_names_the_culprit(tmp_path, call, error, pattern):
    with pytest.raises(error) as info:
        call(tmp_path)
    assert type(info.value) is error, f"{type(info.value).__name__} is a subclass of {error.__name__}, be exact"
    assert re.search(_pattern(pattern, tmp_path), str(info.value)), str(info.value)


# ---- a trained detector given bad inputs -------------------------------------------------------------------------

# `files` (a tiny trained-detector folder) and `cache` (a private OVD_CACHE) come from conftest.py
pytestmark = pytest.mark.usefixtures("cache")


def _detector(files, **kwargs) -> Detector:
    return Detector.from_config(CONFIG, files.weights, overrides=files.overrides, **kwargs)


DETECTOR_CASES = [
    case("detector-no-weights", lambda f, t: Detector.from_config(CONFIG, overrides=f.overrides), ValueError,
         r"no detector weights: pass weights= \(a checkpoint\) or set MODEL\.WEIGHTS"),
    case("detector-wrong-architecture", lambda f, t: Detector.from_config(
        CONFIG, f.weights, overrides=f.overrides + ["MODEL.ROI_BOX_HEAD.FC_DIM", "32"]),
         CheckpointError, r"checkpoint <weights> does not fit the model built from the config:\n"
                          r"  roi_heads\.box_head\.fc1\.weight: checkpoint shape \[64, \d+\], model shape \[32, \d+\]"),
    case("detector-text-encoder-without-weights", lambda f, t: _detector(f, text_encoder="ViT-B-32"), ValueError,
         r"text_encoder='ViT-B-32' needs text_encoder_weights="),
    case("detector-vocabulary-string", lambda f, t: _detector(f).set_vocabulary("red mug"), ValueError,
         r"a vocabulary given as a string must be a preset \(coco, lvis, shapes\) or a \.npy embeddings file, got "
         r"'red mug'; pass class names as a list, e.g\. \['red mug'\]"),
    case("detector-vocabulary-empty", lambda f, t: _detector(f).set_vocabulary([]), ValueError,
         r"the vocabulary is empty"),
    case("detector-embeddings-wrong-dim", lambda f, t: _detector(f).set_vocabulary(_vocab_npy(t, ["mug", "cup"])),
         ValueError, r"text embeddings file <tmp>/e\.npy holds 4-d embeddings; this detector scores 128-d ones"),
    case("detector-embeddings-with-templates", lambda f, t: _detector(f).set_vocabulary(
        _vocab_npy(t, ["mug", "cup"]), templates=["a {}"]),
         ValueError, r"templates apply to class names, not to a ready embeddings file"),
    case("detector-image-missing", lambda f, t: _detector(f)(t / "nope.png"), FileNotFoundError,
         r"image not found: <tmp>/nope\.png"),
    case("detector-image-float", lambda f, t: _detector(f)(np.zeros((8, 8, 3), np.float32)), ValueError,
         r"image arrays must be uint8 \(0-255\), got float32"),
    case("detector-image-two-channels", lambda f, t: _detector(f)(np.zeros((8, 8, 2), np.uint8)), ValueError,
         r"image arrays must be \[H, W\], \[H, W, 3\] or \[H, W, 4\] with H, W > 0, got \[8, 8, 2\]"),
]


@pytest.mark.parametrize("call, error, pattern", DETECTOR_CASES)
def test_detector_bad_input_names_the_culprit(files, tmp_path, call, error, pattern):
    with pytest.raises(error) as info:
        call(files, tmp_path)
    assert type(info.value) is error
    assert re.search(_pattern(pattern, tmp_path, files.weights), str(info.value)), str(info.value)


# ---- command-line tools ------------------------------------------------------------------------------------------

@pytest.fixture
def restore_ovd_logger():
    """The tools set up the ``ovd`` logger for a console; put it back for the tests that follow."""
    logger = logging.getLogger("ovd")
    saved = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def _demo(f, *args: str) -> list[str]:
    return ["--config-file", CONFIG, "--weights", str(f.weights), *args, *f.overrides]


CLI_CASES = [
    # expected: the exit status (output matched) or the exception raised (its message matched)
    case("train-no-config-file", lambda t, f: ("train_net", ["--eval-only"]), 2,
         r"the following arguments are required: --config-file"),
    case("train-config-missing", lambda t, f: ("train_net", ["--config-file", str(t / "nope.yaml")]), 2,
         r"error: config file not found: <tmp>/nope\.yaml"),
    case("train-unknown-override", lambda t, f: ("train_net", ["--config-file", CONFIG, "SOLVER.BASE_RL", "0.1"]),
         2, r"error: unknown config key SOLVER\.BASE_RL in command-line override SOLVER\.BASE_RL; "
            r"did you mean SOLVER\.BASE_LR\?"),
    case("train-override-without-value", lambda t, f: ("train_net", ["--config-file", CONFIG, "SOLVER.MAX_ITER"]),
         2, r"error: override 'SOLVER\.MAX_ITER' has no value"),
    case("train-override-wrong-type", lambda t, f: ("train_net", ["--config-file", CONFIG, "SOLVER.MAX_ITER=ten"]),
         2, r"error: config key SOLVER\.MAX_ITER in command-line override SOLVER\.MAX_ITER: expected int"),
    case("train-weights-missing", lambda t, f: ("train_net", ["--config-file", CONFIG, "--eval-only", *f.overrides,
                                                              "MODEL.WEIGHTS", str(t / "none.pth")]),
         2, r"error: checkpoint not found: <tmp>/none\.pth"),
    case("train-num-gpus-not-int", lambda t, f: ("train_net", ["--config-file", CONFIG, "--num-gpus", "two"]), 2,
         r"argument --num-gpus: invalid int value: 'two'"),
    case("demo-no-input", lambda t, f: ("demo", ["--config-file", CONFIG]), 2,
         r"the following arguments are required: --input"),
    case("demo-input-only-overrides", lambda t, f: ("demo", _demo(f, "--input", "MODEL.DEVICE", "cpu")), 2,
         r"--input needs at least one file, folder, glob or video"),
    case("demo-threshold-not-float", lambda t, f: ("demo", _demo(f, "--input", "a.png", "--confidence-threshold",
                                                                  "high")), 2,
         r"argument --confidence-threshold: invalid float value: 'high'"),
    case("demo-config-missing", lambda t, f: ("demo", ["--input", "a.png", "--config-file", str(t / "nope.yaml")]), 2,
         r"error: config file not found: <tmp>/nope\.yaml"),
    case("demo-weights-missing", lambda t, f: ("demo", ["--input", "a.png", "--config-file", CONFIG, "--weights",
                                                        str(t / "nope.pth")]), 2,
         r"error: checkpoint not found: <tmp>/nope\.pth"),
    case("demo-weights-not-a-checkpoint", lambda t, f: ("demo", ["--input", "a.png", "--config-file", CONFIG,
                                                                 "--weights", str(_write(t / "w.pth", "weights"))]), 2,
         r"error: cannot read checkpoint <tmp>/w\.pth"),
    case("demo-unknown-override", lambda t, f: ("demo", _demo(f, "--input", "a.png", "MODEL.ROI_HEADS.SCORE_THRESH_TES",
                                                              "0.3")), 2,
         r"error: unknown config key MODEL\.ROI_HEADS\.SCORE_THRESH_TES in command-line override "
         r"MODEL\.ROI_HEADS\.SCORE_THRESH_TES; did you mean MODEL\.ROI_HEADS\.SCORE_THRESH_TEST\?"),
    case("demo-text-encoder-without-weights", lambda t, f: ("demo", _demo(f, "--input", "a.png", "--text-encoder",
                                                                          "ViT-B-32")), 2,
         r"error: text_encoder='ViT-B-32' needs text_encoder_weights="),
    case("demo-duplicate-vocabulary", lambda t, f: ("demo", _demo(f, "--input", "a.png", "--vocabulary", "mug,mug")), 2,
         r"error: duplicate class names: \['mug'\]"),
    case("demo-empty-vocabulary-file", lambda t, f: ("demo", _demo(f, "--input", "a.png", "--vocabulary",
                                                                   str(_write(t / "names.txt", "")))), 2,
         r"error: vocabulary file <tmp>/names\.txt has no class names"),
    case("demo-embeddings-missing", lambda t, f: ("demo", _demo(f, "--input", "a.png", "--vocabulary",
                                                                str(t / "v.npy"))), 2,
         r"error: text embeddings file not found: <tmp>/v\.npy"),
    case("demo-input-missing", lambda t, f: ("demo", _demo(f, "--input", str(t / "nope.png"))), 1,
         r"input not found \(or a folder/glob with no image\): <tmp>/nope\.png"),
    case("demo-input-not-an-image", lambda t, f: ("demo", _demo(f, "--input", str(_write(t / "bad.png", "text")))), 1,
         r"error: skipped <tmp>/bad\.png: cannot read image <tmp>/bad\.png: cannot identify image file"),
    case("extract-shard-out-of-range", lambda t, f: ("extract_region_embeddings", [
        "--dataset", "shapes_train", "--proposals", "p.json", "--out", "s", "--shard", "3/2"]), 2,
         r"argument --shard: --shard i/n needs 0 <= i < n, got '3/2'"),
    case("extract-json-without-image-root", lambda t, f: ("extract_region_embeddings", [
        "--dataset-json", "ann.json", "--proposals", "p.json", "--out", "s", "--random-init"]), 2,
         r"--dataset-json needs --image-root"),
    case("extract-model-without-weights", lambda t, f: ("extract_region_embeddings", [
        "--dataset", "shapes_train", "--proposals", "p.json", "--out", "s", "--model", "ViT-B-32"]), 2,
         r"give --pretrained TAG\|FILE, or --random-init \[--seed N\] for a randomly initialised --model"),
]


def _run_tool(tool: str, argv: list[str]) -> int:
    module = load_tool(tool)
    try:
        return (module.cli if tool == "train_net" else module.main)(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("call, expected, pattern", CLI_CASES)
def test_cli_bad_arguments_name_the_culprit(files, tmp_path, capsys, restore_ovd_logger, call, expected, pattern):
    tool, argv = call(tmp_path, files)
    pattern = _pattern(pattern, tmp_path, files.weights)
    if isinstance(expected, int):
        status = _run_tool(tool, argv)
        captured = capsys.readouterr()
        assert status == expected, captured
        assert re.search(pattern, captured.out + captured.err), captured
    else:
        with pytest.raises(expected, match=pattern):
            _run_tool(tool, argv)


# ---- inputs repaired with a warning, not refused ------------------------------------------------------------------

WARNING_CASES = [
    # call -> result, check(result), the warning logged
    pytest.param(lambda t: load_proposals(_json(t / "p.json", [
        {"image_id": 1, "bbox": [1, 1, 0, 3], "score": 0.9}, {"image_id": 1, "bbox": [1, 1, 3, 3], "score": 0.8}]),
        image_sizes={1: (8, 8)})[1], lambda stats: (stats.num_zero_area, stats.num_kept) == (1, 1),
        r"<tmp>/p\.json: 0 proposals clipped to their image, 1 of zero area dropped, 0 for unknown images skipped",
        id="proposals-zero-area-dropped"),
    pytest.param(lambda t: load_proposals(_json(t / "p.json", [
        {"image_id": 1, "bbox": [20, 1, 3, 3], "score": 0.9}, {"image_id": 1, "bbox": [6, 6, 4, 4], "score": 0.8}]),
        image_sizes={1: (8, 8)}), lambda out: out[0][1][0].tolist() == [[6, 6, 8, 8]] and out[1].num_clipped == 1,
        r"<tmp>/p\.json: 1 proposals clipped to their image, 1 of zero area dropped",
        id="proposals-outside-image-clipped"),
    pytest.param(lambda t: load_coco_json(_coco(t, annotations=[_ann(bbox=[9, 1, 4, 4]),
                                                                _ann(id=8, bbox=[6, 6, 4, 4])])),
                 lambda d: d.records[0].boxes.tolist() == [[6, 6, 8, 8]],
                 r"<tmp>/ann\.json: 2 boxes clipped to their image, 1 of zero area dropped",
                 id="data-box-outside-image"),
    pytest.param(lambda t: load_image_labels(_labels(t, LABELLED), _json(t / "pseudo.json", {
        "annotations": [_ann(category_id=2), _ann(id=8)]})), lambda d: d.records[0].category_ids.tolist() == [1],
                 r"<tmp>/pseudo\.json: 1 pseudo boxes for labels the image does not have were ignored",
                 id="pseudo-box-of-unlabelled-class"),
]


@pytest.mark.parametrize("call, check, pattern", WARNING_CASES)
def test_repaired_input_is_logged(tmp_path, caplog, monkeypatch, call, check, pattern):
    monkeypatch.setattr(logging.getLogger("ovd"), "propagate", True)  # a tool may have set up its own console
    with caplog.at_level(logging.WARNING, logger="ovd"):
        result = call(tmp_path)
    assert check(result)
    assert re.search(_pattern(pattern, tmp_path), caplog.text), caplog.text


ALL_CASES = FILE_CASES + DETECTOR_CASES + CLI_CASES + WARNING_CASES


def test_catalogue_is_documented():
    ids = [p.id for p in ALL_CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", ERRORS_MD.read_text(), flags=re.M))
    assert sorted(set(ids) - documented) == [], "cases missing from docs/ERRORS.md"
    assert sorted(documented - set(ids)) == [], "docs/ERRORS.md lists cases the catalogue does not have"
