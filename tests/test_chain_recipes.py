"""The chain's stages as config recipes, and datasets declared in a config (DATASETS.CUSTOM)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from ovd.config import Config, load_config
from ovd.data.build import train_ann_types
from ovd.data.catalog import get_dataset, register_config_datasets
from ovd.engine.chain import (
    chain_sources,
    proposal_overrides,
    source_paths,
    stage_overrides,
    text_embeddings_path,
    with_inits,
)

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "configs" / "shapes"
# keys that differ by construction (where a run writes and starts from), and keys that do nothing in a stage whose
# loss is off (a stage file keeps the schema default there, the chain config the value its later stages use)
RUN_KEYS = {"OUTPUT_DIR", "MODEL.WEIGHTS"}
INERT_WITHOUT_DISTILLATION = {"MODEL.IRM_LOSS_NORMALIZE"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _differences(a: Config, b: Config) -> dict:
    fa, fb = _flat(asdict(a)), _flat(asdict(b))
    ignored = RUN_KEYS | (set() if a.MODEL.DISTILLATION else INERT_WITHOUT_DISTILLATION)
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k] and k not in ignored and not k.startswith("CHAIN.")}


@pytest.mark.parametrize("stage", ["base", "control", "rkd", "pis", "rkd_pis", "rkd_pis_wt", "proposals_oln",
                                   "proposals_rpn"])
def test_shapes_stage_files_are_the_chain_recipes(stage):
    """`make demo` runs configs/shapes/chain.yaml through the recipes; the stage files people run by hand (and the
    numbers in docs/RESULTS.md came from) must be the same runs."""
    chain = load_config(SHAPES / "chain.yaml")
    if stage.startswith("proposals_"):
        opts = proposal_overrides(chain, stage.split("_")[1].upper())
    else:
        opts = stage_overrides(chain, stage, source_paths(chain, "oln"), text_embeddings_path(chain))
    derived = load_config(SHAPES / "chain.yaml", opts)
    assert _differences(derived, load_config(SHAPES / f"{stage}.yaml")) == {}


def test_recipes_turn_each_part_of_the_method_on():
    chain = load_config(SHAPES / "chain.yaml")
    paths, text = source_paths(chain, "rpn"), Path("t.npy")

    def stage(name: str) -> Config:
        return load_config(SHAPES / "chain.yaml", stage_overrides(chain, name, paths, text))

    base, rkd, pis, wt = stage("base"), stage("rkd"), stage("pis"), stage("rkd_pis_wt")
    assert base.DATASETS.TRAIN == rkd.DATASETS.TRAIN == ["shapes_train_base"] and not base.MODEL.DISTILLATION
    assert rkd.MODEL.DISTILLATION and rkd.MODEL.RKD_FEAT_PATH == str(paths["train_regions"])
    assert pis.DATASETS.TRAIN == ["shapes_train_base", "shapes_train_image_labels"] and not pis.MODEL.DISTILLATION
    assert pis.MODEL.PIS_PROP_PATH == str(paths["pseudo"]) and "/rpn/" in pis.MODEL.PIS_PROP_PATH
    assert wt.MODEL.ROI_BOX_HEAD.WEIGHT_TRANSFER and wt.MODEL.DISTILLATION and not rkd.MODEL.ROI_BOX_HEAD.WEIGHT_TRANSFER
    assert (base.SOLVER.MAX_ITER, rkd.SOLVER.MAX_ITER, rkd.SOLVER.BASE_LR) == (500, 200, 0.0005)
    assert base.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH == "t.npy"
    assert with_inits(["rkd_pis_wt"]) == ["base", "rkd", "rkd_pis_wt"]


def test_proposal_iterations_scale_the_schedule():
    chain = load_config(SHAPES / "chain.yaml", ["CHAIN.PROPOSAL_ITERS", "300"])
    cfg = load_config(SHAPES / "chain.yaml", proposal_overrides(chain, "OLN"))
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (300, [240])
    assert cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork" and cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == [[1.0]]


def test_chain_refuses_what_it_cannot_run():
    two_box = load_config(SHAPES / "chain.yaml", ["DATALOADER.DATASET_ANN", "[box, box]"])
    with pytest.raises(ValueError, match=r"one box-labelled dataset .* box: \['shapes_train_base', "):
        chain_sources(two_box)
    two_tests = load_config(SHAPES / "chain.yaml", ["DATASETS.TEST", "[shapes_val, shapes_train_all]"])
    with pytest.raises(ValueError, match="one test dataset"):
        chain_sources(two_tests)
    box_only = load_config(SHAPES / "base.yaml")
    with pytest.raises(ValueError, match="stage pis needs an image-labelled dataset"):
        stage_overrides(box_only, "pis", source_paths(box_only, "oln"), Path("t.npy"))
    with pytest.raises(ValueError, match="OLN or RPN"):
        proposal_overrides(box_only, "oracle")


def test_custom_datasets_resolve_against_the_declaring_file(tmp_path, monkeypatch):
    """A dataset declared in a _BASE_ file keeps paths relative to that file, wherever the run starts."""
    data = tmp_path / "project" / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(b"")
    (data / "train.json").write_text('{"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}], '
                                     '"annotations": [], "categories": [{"id": 1, "name": "cup"}, '
                                     '{"id": 7, "name": "dog"}]}')
    (tmp_path / "project" / "base.yaml").write_text(
        "DATASETS:\n  CUSTOM:\n    - {NAME: rel_train, JSON: data/train.json, IMAGES: data/images, NOVEL: [dog]}\n"
        "    - {NAME: rel_tags, JSON: data/train.json, IMAGES: data/images, NOVEL: ['7', cup], ANN_TYPE: image}\n"
        "    - {NAME: val, JSON: data/train.json, IMAGES: data/images}\n"  # a shapes split's name, not a built-in one
        "  TRAIN: [rel_train, rel_tags]\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine.yaml").write_text("_BASE_: ../project/base.yaml\n")
    monkeypatch.chdir(tmp_path / "runs")
    cfg = load_config("mine.yaml")
    register_config_datasets(cfg.DATASETS.CUSTOM)
    spec = get_dataset("rel_train")
    assert spec.json_file == data / "train.json" and spec.image_root == data / "images"
    assert spec.novel_category_ids == (7,) and get_dataset("rel_tags").novel_category_ids == (1, 7)
    assert get_dataset("val").json_file == data / "train.json"
    assert train_ann_types(cfg) == ["box", "image"]  # DATALOADER.DATASET_ANN's default: each dataset's ANN_TYPE


def test_run_chain_takes_the_teacher_as_the_other_tools_do():
    from tools_loader import load_tool

    run_chain = load_tool("run_chain")
    args = run_chain.parse_args(["--config-file", str(SHAPES / "chain.yaml"), "--model", "ViT-B-32", "--pretrained",
                                 "openai", "SEED", "3"])
    cfg = load_config(SHAPES / "chain.yaml", run_chain.config_overrides(args))
    assert (cfg.CHAIN.CLIP_MODEL, cfg.CHAIN.CLIP_PRETRAINED, cfg.SEED) == ("ViT-B-32", "openai", 3)
    assert text_embeddings_path(cfg).name == "ViT-B-32_openai.npy"
    plain = run_chain.parse_args(["--config-file", str(SHAPES / "chain.yaml")])
    assert load_config(SHAPES / "chain.yaml", run_chain.config_overrides(plain)).CHAIN.CLIP_MODEL.startswith("local-dir:")
