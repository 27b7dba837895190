"""End-to-end training on a tiny shapes world: losses fall, evaluation runs, resume is exact, DDP stays in sync."""

import json

import pytest
import torch

from ovd.config import load_config
from ovd.engine.checkpoint import read_checkpoint
from ovd.engine.launch import launch
from ovd.engine.trainer import evaluate_only, train

CONFIG = "configs/shapes/base.yaml"


def cfg_for(tiny_world, out, *extra):
    _, overrides = tiny_world
    return load_config(CONFIG, overrides + ["OUTPUT_DIR", str(out), *extra])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_lowers_losses_and_evaluates(tiny_world, tmp_path):
    cfg = cfg_for(tiny_world, tmp_path, "SOLVER.MAX_ITER", "30", "SOLVER.CHECKPOINT_PERIOD", "0")
    results = train(cfg)
    rows = [m for m in metrics(tmp_path) if "total_loss" in m]
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "total_loss") < 0.7 * mean(first, "total_loss")
    assert mean(last, "loss_rpn_cls") < mean(first, "loss_rpn_cls")
    res = results["shapes_val"]
    for k in ("AP", "AP50", "AP50_base", "AP50_novel"):
        assert 0.0 <= res[k] <= 1.0
    assert (tmp_path / "inference" / "shapes_val" / "coco_instances_results.json").is_file()
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "model_final.pth").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    # --eval-only on the saved weights reproduces the final evaluation
    again = evaluate_only(cfg_for(tiny_world, tmp_path / "eval", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")))
    assert again["shapes_val"]["AP"] == pytest.approx(res["AP"], abs=1e-9)


@pytest.mark.slow
def test_resume_continues_exactly(tiny_world, tmp_path):
    args = ("SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "4", "DATASETS.TEST", "[]", "DATALOADER.NUM_WORKERS", "1")
    train(cfg_for(tiny_world, tmp_path / "a", *args))
    b = tmp_path / "b"
    train(cfg_for(tiny_world, b, *args))
    # simulate a run killed after its iteration-4 checkpoint: the final checkpoint never got written
    (b / "model_final.pth").unlink()
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "total_loss": 123.0}\n{"iterat')  # entries of the lost iterations, torn
    train(cfg_for(tiny_world, b, *args), resume=True)
    wa = read_checkpoint(tmp_path / "a" / "model_final.pth")["model"]
    wb = read_checkpoint(b / "model_final.pth")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = [(m["iteration"], m["total_loss"]) for m in metrics(tmp_path / "a")]
    lb = [(m["iteration"], m["total_loss"]) for m in metrics(b)]
    assert la == lb and [i for i, _ in la] == list(range(8))
    ck = read_checkpoint(b / "model_0000003.pth")
    assert ck["iteration"] == 4 and {"optimizer", "scheduler", "scaler"} <= ck.keys()


def _ddp_worker(cfg):
    import torch.distributed as dist

    train(cfg)
    from ovd.engine.checkpoint import read_checkpoint as read

    # every rank compares its own weights with the checkpoint rank 0 wrote after the last step
    dist.barrier()
    saved = read(f"{cfg.OUTPUT_DIR}/model_final.pth")["model"]
    flat = torch.cat([v.float().flatten() for v in saved.values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered)


@pytest.mark.slow
def test_two_process_ddp_on_cpu_stays_in_sync(tiny_world, tmp_path):
    cfg = cfg_for(tiny_world, tmp_path, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "0", "DATASETS.TEST", "[]")
    launch(_ddp_worker, 2, use_cuda=False, args=(cfg,))
    rows = metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1, 2]


def test_embeddings_that_do_not_match_the_classes_are_refused(tiny_world, tmp_path):
    import numpy as np

    from ovd.clip.text import save_text_embeddings

    bad = tmp_path / "five.npy"
    save_text_embeddings(bad, np.eye(5, 32, dtype=np.float32), names=list("abcde"), templates=["{}"],
                         model_name="random", pretrained=None)
    cfg = cfg_for(tiny_world, tmp_path, "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", str(bad))
    with pytest.raises(ValueError, match=r"ZEROSHOT_WEIGHT_PATH.*five\.npy.*shapes_train_base"):
        train(cfg)


@pytest.mark.slow
def test_two_process_ddp_with_box_and_image_labelled_batches(tiny_world, true_pseudo_boxes, tmp_path):
    """Both DDP workers draw the same source each iteration, so PIS batches (no RPN gradients) and box batches
    alternate in step; the weights stay identical across ranks."""
    cfg = cfg_for(tiny_world, tmp_path, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "0", "DATASETS.TEST", "[]",
                  "DATASETS.TRAIN", "[shapes_train_base, shapes_train_image_labels]", "DATALOADER.DATASET_ANN", "[box, image]",
                  "DATALOADER.DATASET_RATIO", "[1, 1]", "DATALOADER.DATASET_BS", "[1, 2]", "MODEL.PIS_PROP_PATH", str(true_pseudo_boxes))
    launch(_ddp_worker, 2, use_cuda=False, args=(cfg,))
    rows = metrics(tmp_path)
    assert any("loss_pms" in r for r in rows) and any("loss_rpn_cls" in r for r in rows)


def test_initial_weights_keep_this_runs_class_counts(tiny_world, tmp_path):
    """MODEL.WEIGHTS brings learned weights, not the class counts of the data it was trained on: fine-tuning on data
    that boxes fewer classes must see zero counts for the others (IGNORE_ZERO_CATS then leaves them out)."""
    from ovd.data.build import load_train_datasets
    from ovd.engine.trainer import build_for_training, load_weights

    cfg = cfg_for(tiny_world, tmp_path)
    model, _ = build_for_training(cfg, load_train_datasets(cfg))
    own = model.roi_heads.box_predictor.freq_weight.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["roi_heads.box_predictor.freq_weight"] = torch.full_like(own, 7.0)  # another run's counts
    key = next(k for k in state if k.endswith(".weight") and state[k].is_floating_point())
    state[key] = state[key] + 1.0  # a learned weight that must be loaded
    torch.save({"model": state}, tmp_path / "other.pth")
    load_weights(model, str(tmp_path / "other.pth"))
    assert torch.equal(model.roi_heads.box_predictor.freq_weight, own) and (own == 0).any()
    assert torch.equal(model.state_dict()[key], state[key])
