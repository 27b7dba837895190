"""Your own data, as a user brings it: the shapes world exported as plain COCO files into another folder, its classes
renamed to other words, declared in a config (DATASETS.CUSTOM) and run through the whole method by
`tools/run_chain.py` from that config alone — once with image tags, once with captions turned into tags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ovd.clip.train_toy import train_toy_clip
from ovd.config import load_config
from ovd.data.catalog import get_dataset, register_config_datasets
from ovd.data.shapes import make_shapes_world
from tools_loader import load_tool

REPO = Path(__file__).resolve().parents[1]
chain = load_tool("run_chain")

# the 16 shapes names -> words a user's data might have
NEW_NAMES = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum", "kiwi",
             "melon", "fig", "lime", "date", "olive"]

# CI size: a small ResNet-18 FPN at 128 px, 3 iterations per stage (the sizes of configs/shapes at a tenth)
CI_CONFIG = """\
_BASE_: {example}
MODEL:
  DEVICE: cpu
  PIXEL_MEAN: [123.675, 116.28, 103.53]
  PIXEL_STD: [58.395, 57.12, 57.375]
  BACKBONE: {{WEIGHTS: "", FREEZE_AT: 0}}
  RESNETS: {{DEPTH: 18, NORM: BN, STRIDE_IN_1X1: false, STEM_OUT_CHANNELS: 16, RES2_OUT_CHANNELS: 16}}
  FPN: {{OUT_CHANNELS: 32}}
  ANCHOR_GENERATOR: {{SIZES: [[16], [32], [64], [128], [256]]}}
  RPN: {{PRE_NMS_TOPK_TRAIN: 200, PRE_NMS_TOPK_TEST: 100, POST_NMS_TOPK_TRAIN: 64, POST_NMS_TOPK_TEST: 32}}
  ROI_HEADS: {{BATCH_SIZE_PER_IMAGE: 32, SCORE_THRESH_TEST: 0.01}}
  ROI_BOX_HEAD: {{FC_DIM: 64, ZEROSHOT_WEIGHT_DIM: 128}}
DATASETS:
  CUSTOM:
    - {{NAME: fruit_train, JSON: data/train.json, IMAGES: data/images/train}}
    - {tags}
    - {{NAME: fruit_val, JSON: data/val.json, IMAGES: data/images/val, NOVEL: [{novel}]}}
  TRAIN: [fruit_train, fruit_tags]
  TEST: [fruit_val]
DATALOADER: {{NUM_WORKERS: 0, DATASET_BS: [2, 2]}}
INPUT: {{FORMAT: RGB, MIN_SIZE_TRAIN: [128], MAX_SIZE_TRAIN: 128, MIN_SIZE_TEST: 128, MAX_SIZE_TEST: 128}}
SOLVER: {{OPTIMIZER: AdamW, BASE_LR: 0.001, IMS_PER_BATCH: 2, MAX_ITER: 3, STEPS: [], WARMUP_ITERS: 1,
          CHECKPOINT_PERIOD: 0}}
TEST: {{IMS_PER_BATCH: 4}}
CHAIN:
  CLIP_MODEL: local-dir:{teacher}
  CLIP_PRETRAINED: ""
  WORK_DIR: work
  FINETUNE: {{MAX_ITER: 3, STEPS: []}}
OUTPUT_DIR: runs
"""


def _export(world: Path, dest: Path) -> list[str]:
    """The world's files as a user has them: images in two folders, COCO JSON with renamed classes and nothing
    shapes-specific (no 'split' marks, no shape/colour fields). Returns the renamed novel classes."""
    rename = {}
    novel = []
    for name, split in (("train_base", "train"), ("train_image_labels", "tags"), ("val", "val")):
        data = json.loads((world / "annotations" / f"{name}.json").read_text())
        for c in data["categories"]:
            rename[c["name"]] = NEW_NAMES[c["id"] - 1]
            if c.get("split") == "novel" and NEW_NAMES[c["id"] - 1] not in novel:
                novel.append(NEW_NAMES[c["id"] - 1])
        data = {"images": [{k: img[k] for k in ("id", "file_name", "height", "width", "pos_category_ids") if k in img}
                           for img in data["images"]],
                "annotations": data["annotations"],
                "categories": [{"id": c["id"], "name": rename[c["name"]]} for c in data["categories"]]}
        (dest / f"{split}.json").write_text(json.dumps(data))
    for split in ("train", "val"):
        shutil.copytree(world / "images" / split, dest / "images" / split)
    # captions naming each image's labels with the new words, COCO's caption format
    tags = json.loads((dest / "tags.json").read_text())
    names = {c["id"]: c["name"] for c in tags["categories"]}
    captions = {"images": [{k: v for k, v in img.items() if k != "pos_category_ids"} for img in tags["images"]],
                "annotations": [{"id": i + 1, "image_id": img["id"],
                                 "caption": "a photo of " + " and ".join(f"a {names[c]}" for c in img["pos_category_ids"])}
                                for i, img in enumerate(tags["images"])]}
    (dest / "captions.json").write_text(json.dumps(captions))
    return novel


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user")
    world = tmp / "world"
    make_shapes_world(world, num_train=12, num_val=6, image_size=128)
    teacher = tmp / "teacher"
    train_toy_clip(world, teacher, steps=2, batch_size=8, seed=0)
    data = tmp / "project" / "data"
    data.mkdir(parents=True)
    novel = _export(world, data)
    shutil.rmtree(world)  # nothing of the shapes world is left to read
    return tmp / "project", teacher, novel


def _write_config(project: Path, teacher: Path, novel: list[str], tags: str, name: str) -> Path:
    path = project / name
    path.write_text(CI_CONFIG.format(example=REPO / "configs/custom/example.yaml", teacher=teacher, tags=tags,
                                     novel=", ".join(novel)))
    return path


@pytest.mark.slow
def test_own_data_with_image_tags_runs_every_stage(user_data, monkeypatch, capsys):
    project, teacher, novel = user_data
    monkeypatch.chdir(project)  # a user's own folder: WORK_DIR and OUTPUT_DIR are relative to it
    monkeypatch.setenv("OVD_DATASETS", str(project / "nowhere"))
    config = _write_config(project, teacher, novel, "{NAME: fruit_tags, JSON: data/tags.json, IMAGES: "
                           "data/images/train, ANN_TYPE: image}", "tags.yaml")
    results = chain.main(["--config-file", str(config), "--pseudo-threshold", "0"])
    out = capsys.readouterr().out
    assert list(results) == ["base", "rkd", "rkd_pis_wt"]
    for stage, r in results.items():
        assert all(0.0 <= r[k] <= 1.0 for k in ("AP50", "AP50_base", "AP50_novel")), stage
    assert "shapes_" not in out  # no dataset of the shapes world was used
    # the vocabulary is the user's words; the novel classes were named by word and resolved to their ids
    text_meta = json.loads((project / "work/text_embeddings/teacher.json").read_text())
    assert text_meta["names"] == NEW_NAMES
    cfg = load_config(config)
    register_config_datasets(cfg.DATASETS.CUSTOM)
    assert [NEW_NAMES[i - 1] for i in get_dataset("fruit_val").novel_category_ids] == sorted(novel, key=NEW_NAMES.index)
    manifest = json.loads((project / "runs/chain_results.json").read_text())
    assert manifest["dataset"] == "fruit_val" and list(manifest["stages"]) == ["proposals_oln", "base", "rkd",
                                                                               "rkd_pis_wt"]
    assert manifest["pseudo_boxes"]["stats"]["labels"] > 0
    assert (project / "work/pseudo_boxes/oln/train.json").is_file()
    assert "fruit_val" in manifest["table"] and (project / "runs/demo_images").is_dir()
    # a second run skips every stage
    chain.main(["--config-file", str(config), "--pseudo-threshold", "0"])
    again = capsys.readouterr().out
    assert "tools/train_net.py" not in again and "mine_pseudo_labels" not in again


@pytest.mark.slow
def test_own_data_with_captions(user_data, monkeypatch, capsys):
    project, teacher, novel = user_data
    monkeypatch.chdir(project)
    monkeypatch.setenv("OVD_DATASETS", str(project / "nowhere"))
    config = _write_config(project, teacher, novel, "{NAME: fruit_tags, JSON: data/tags_from_captions.json, IMAGES: "
                           "data/images/train, ANN_TYPE: image, CAPTIONS: data/captions.json}", "captions.yaml")
    # the same folders as the tags run (when it ran first): proposals and regions are reused, the pseudo boxes are
    # mined again because the labels changed
    results = chain.main(["--config-file", str(config), "--stages", "pis", "--pseudo-threshold", "0"])
    out = capsys.readouterr().out
    assert "tools/captions_to_image_labels.py" in out and "tools/mine_pseudo_labels.py" in out
    assert list(results) == ["base", "pis"]
    info = json.loads((project / "work/pseudo_boxes/oln/train.json").read_text())["info"]
    assert info["image_labels"] == str(project / "data/tags_from_captions.json")
    derived = json.loads((project / "data/tags_from_captions.json").read_text())
    tags = json.loads((project / "data/tags.json").read_text())
    # the captions name exactly each image's tags: the derived labels are the tags
    assert {i["id"]: sorted(i["pos_category_ids"]) for i in derived["images"]} == \
        {i["id"]: sorted(i["pos_category_ids"]) for i in tags["images"]}
