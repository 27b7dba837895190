"""Generating proposals with a proposal model: batched == one by one, shards merge into the unsharded file, a killed
run resumes to the same file, unreadable images are skipped, --evaluate, and the errors of bad arguments."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tools_loader import load_tool
from ovd.config import load_config
from ovd.data.build import build_test_mapper, load_dataset
from ovd.data.proposals import load_proposals
from ovd.evaluation import format_recall_table, proposal_recall
from ovd.inference.proposal_generation import (
    build_proposal_model,
    generate_proposals,
    meta_path,
    model_source,
)
from ovd.modeling.build import build_model

CONFIG = "configs/shapes/proposals_oln.yaml"
DETECTOR_CONFIG = "configs/shapes/base.yaml"
DATASET = "shapes_val"  # 12 images: chunks of 4 give 3 chunks, so shard 0/2 has two and shard 1/2 one
CHUNK, BATCH = 4, 3


@pytest.fixture(scope="module")
def proposal_model(tiny_world, tmp_path_factory):
    """(overrides, checkpoint) of a randomly initialised tiny OLN proposal model."""
    _, overrides = tiny_world
    overrides = overrides + ["DATALOADER.NUM_WORKERS", "0"]
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("proposal_model") / "model.pth"
    torch.save({"model": build_model(load_config(CONFIG, overrides)).state_dict()}, weights)
    return overrides, weights


@pytest.fixture(scope="module")
def setup(proposal_model):
    overrides, weights = proposal_model
    cfg = load_config(CONFIG, overrides)
    dataset = load_dataset(DATASET)
    return cfg, build_proposal_model(cfg, weights), dataset, model_source(cfg, CONFIG, weights)


def generate(setup, out, **kwargs):
    cfg, model, dataset, source = setup
    kwargs = {"chunk_size": CHUNK, "batch_size": BATCH, "progress": False, **kwargs}
    return generate_proposals(model, dataset, out, mapper=build_test_mapper(cfg, dataset), source=source, **kwargs)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "proposals.json"
    return generate(setup, out), out


def same_files(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes() and meta_path(a).read_bytes() == meta_path(b).read_bytes()


def test_file_holds_every_image_top_k_by_score(setup, reference):
    summary, out = reference
    dataset = setup[2]
    proposals, stats = load_proposals(out, image_sizes={r.image_id: (r.height, r.width) for r in dataset.records})
    assert summary.images == len(dataset) == 12 and summary.proposals == stats.num_read
    assert sorted(proposals) == sorted(r.image_id for r in dataset.records)
    for boxes, scores in proposals.values():
        assert len(scores) == 100 and (np.diff(scores) <= 0).all()
    assert json.loads(meta_path(out).read_text())["job"]["shard"] is None


def test_batched_equals_one_by_one(setup, reference, tmp_path):
    sizes = {r.image_id: (r.height, r.width) for r in setup[2].records}
    batched, _ = load_proposals(reference[1], image_sizes=sizes)
    generate(setup, tmp_path / "single.json", batch_size=1)
    single, _ = load_proposals(tmp_path / "single.json", image_sizes=sizes)
    assert batched.keys() == single.keys()
    # The same up to the file's rounding (1/100 px, 5 decimals) of values that differ in their last float bits;
    # proposals of scores that close may trade places, and one at the top-k cut may trade with the next one.
    for image_id, (boxes, scores) in batched.items():
        boxes1, scores1 = single[image_id]
        np.testing.assert_allclose(scores, scores1, atol=1.1e-5)
        close = (np.abs(boxes[:, None] - boxes1[None]).max(-1) <= 0.011) & (np.abs(scores[:, None] - scores1) <= 1.1e-5)
        assert (close.any(axis=1) | (scores <= scores[-1] + 1.1e-5)).all()


def test_top_k_and_nms(setup, reference, tmp_path):
    summary = generate(setup, tmp_path / "p.json", top_k=7, nms_thresh=0.3)
    proposals, _ = load_proposals(tmp_path / "p.json")
    full, _ = load_proposals(reference[1])
    assert summary.proposals == sum(len(s) for _, s in proposals.values()) <= 7 * 12
    for image_id, (boxes, scores) in proposals.items():
        iou = _iou(boxes, boxes)
        assert (iou[np.triu_indices(len(boxes), 1)] <= 0.3 + 1e-3).all()
        assert scores[0] == full[image_id][1][0]  # NMS keeps the best box


def test_resume_after_a_kill_gives_the_same_file(setup, reference, tmp_path):
    out = tmp_path / "proposals.json"

    def kill_after_first(chunk_id):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(setup, out, on_chunk=kill_after_first)
    assert not out.exists() and not meta_path(out).exists()
    summary = generate(setup, out)
    assert (summary.images_resumed, summary.images) == (CHUNK, 12)
    assert same_files(reference[1], out)
    # finished: a rerun has nothing to do; other settings are refused
    assert generate(setup, out).images_resumed == 12
    with pytest.raises(FileExistsError, match=r"top_k: 100 -> 50"):
        generate(setup, out, top_k=50)


def test_shards_merge_into_the_unsharded_file(proposal_model, reference, tmp_path, capsys):
    overrides, weights = proposal_model
    main = load_tool("generate_proposals").main
    common = ["--config-file", CONFIG, "--weights", str(weights), "--dataset", DATASET, "--chunk-size", str(CHUNK),
              "--batch-size", str(BATCH), "--no-progress"]
    for i in range(2):
        assert main(common + ["--shard", f"{i}/2", "--out", str(tmp_path / f"shard{i}.json"), *overrides]) == 0
    # Shard 0/2 has chunks 0 and 2: images 1-4 and 9-12.
    shard0 = json.loads((tmp_path / "shard0.json").read_text())
    assert sorted({e["image_id"] for e in shard0}) == [1, 2, 3, 4, 9, 10, 11, 12]
    merge = ["merge", str(tmp_path / "shard1.json"), str(tmp_path / "shard0.json"), "--out", str(tmp_path / "all.json")]
    assert main(merge) == 0
    assert same_files(reference[1], tmp_path / "all.json")
    assert main(merge[:2] + merge[3:]) == 2
    assert "merge needs each of the shards 0..1 of one run exactly once" in capsys.readouterr().err


def test_evaluate_prints_the_recall_of_the_written_file(proposal_model, tmp_path, capsys):
    overrides, weights = proposal_model
    out = tmp_path / "p.json"
    status = load_tool("generate_proposals").main([
        "--config-file", CONFIG, "--weights", str(weights), "--dataset", DATASET, "--out", str(out), "--evaluate",
        "--no-progress", *overrides])
    assert status == 0
    dataset = load_dataset(DATASET)
    assert dataset.novel_category_ids
    proposals, _ = load_proposals(out)
    expected = format_recall_table(proposal_recall(dataset, proposals),
                                   title=f"proposal recall (%) on {DATASET}")
    assert expected in capsys.readouterr().out
    assert "AR@100" in expected


def test_unreadable_image_is_reported_counted_and_skipped(proposal_model, tiny_world, tmp_path, capsys):
    overrides, weights = proposal_model
    root, _ = tiny_world
    images = tmp_path / "images"
    shutil.copytree(root / "shapes" / "images" / "val", images)
    ann = json.loads((root / "shapes" / "annotations" / "val.json").read_text())
    broken = ann["images"][2]
    (images / broken["file_name"]).write_bytes(b"not an image")
    (tmp_path / "val.json").write_text(json.dumps(ann))
    out = tmp_path / "p.json"
    status = load_tool("generate_proposals").main([
        "--config-file", CONFIG, "--weights", str(weights), "--dataset-json", str(tmp_path / "val.json"),
        "--image-root", str(images), "--out", str(out), "--chunk-size", str(CHUNK), "--no-progress", *overrides])
    assert status == 1
    captured = capsys.readouterr()
    assert f"1 image(s) could not be read and have no proposals:\n  image {broken['id']}: cannot read image" \
           in captured.out
    written = {e["image_id"] for e in json.loads(out.read_text())}
    assert written == {im["id"] for im in ann["images"]} - {broken["id"]}
    meta = json.loads(meta_path(out).read_text())
    assert meta["num_skipped"] == 1 and meta["skipped"][0]["image_id"] == broken["id"]


@pytest.mark.parametrize("case", ["unknown-dataset", "detector-weights", "detector-config", "shard"])
def test_bad_arguments_give_one_clear_error(case, proposal_model, tiny_world, tmp_path, capsys):
    overrides, weights = proposal_model
    config, dataset = CONFIG, DATASET
    if case == "unknown-dataset":
        dataset, expected = "shapes_vall", r"error: unknown dataset 'shapes_vall' \(did you mean shapes_val\?\); known:"
    elif case == "detector-weights":
        weights = tmp_path / "detector.pth"
        torch.save({"model": build_model(load_config(DETECTOR_CONFIG, overrides)).state_dict()}, weights)
        expected = (rf"error: checkpoint {weights} does not fit the model built from the config:\n"
                    r"  missing keys \(\d+\): box_stage\..*\n  unexpected keys \(\d+\): roi_heads\.")
    elif case == "detector-config":
        config, expected = DETECTOR_CONFIG, r"error: MODEL.META_ARCHITECTURE is 'GeneralizedRCNN': proposals come from"
    else:
        overrides, expected = ["--shard", "2/2"], r"argument --shard: --shard i/n needs 0 <= i < n, got '2/2'"
    argv = ["--config-file", config, "--weights", str(weights), "--dataset", dataset, "--out", str(tmp_path / "p.json"),
            *overrides]
    try:
        status = load_tool("generate_proposals").main(argv)
    except SystemExit as e:
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert re.search(expected, err), err
    assert not (tmp_path / "p.json").exists()


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from torchvision.ops import box_iou

    return box_iou(torch.from_numpy(a).double(), torch.from_numpy(b).double()).numpy()
