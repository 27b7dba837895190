"""Faults: training, region extraction and pseudo-label mining killed with SIGKILL (mid-run and while writing a file)
and run again end exactly as an uninterrupted run; broken checkpoints are refused and skipped; non-finite losses stop
training with what it takes to look into them, or are skipped and counted."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tools_loader import load_tool

from ovd.clip import encode_text, load_clip, save_text_embeddings
from ovd.config import load_config
from ovd.data.region_store import RegionStore
from ovd.engine.checkpoint import CheckpointError, Checkpointer, read_checkpoint
from ovd.engine.trainer import train
from ovd.modeling.detector import OVDetector

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/shapes/base.yaml"

# Runs a tool's entry point in a child process that kills itself (SIGKILL: no clean-up, no `finally`) at a chosen
# point, set in the environment:
#   KILL_AT_CALL="module:attr.path:n"  on entering the call after n calls of that function;
#   KILL_IN_WRITE="pattern:n"          in the atomic write (ovd.utils.io.atomic_path) after n earlier ones of files
#                                      whose name matches the glob, once half of the temporary file is on disk.
CHILD = r"""
import contextlib, fnmatch, importlib, os, runpy, signal, sys
from pathlib import Path

tool, entry, *argv = sys.argv[1:]
namespace = runpy.run_path(tool)  # imports what the tool uses; the tool itself runs at the end
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

if os.environ.get("KILL_AT_CALL"):
    module, qualname, n = os.environ["KILL_AT_CALL"].split(":")
    owner = importlib.import_module(module)
    *parents, name = qualname.split(".")
    for p in parents:
        owner = getattr(owner, p)
    function, calls = getattr(owner, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] > int(n):
            die()
        return function(*args, **kwargs)

    setattr(owner, name, counted)

if os.environ.get("KILL_IN_WRITE"):
    import ovd.utils.io

    pattern, n = os.environ["KILL_IN_WRITE"].rsplit(":", 1)
    original, writes = ovd.utils.io.atomic_path, [0]

    @contextlib.contextmanager
    def atomic_path(path):
        with original(path) as tmp:
            yield tmp
            if fnmatch.fnmatch(Path(path).name, pattern):
                writes[0] += 1
                if writes[0] > int(n):
                    os.truncate(tmp, os.path.getsize(tmp) // 2)
                    die()

    for m in list(sys.modules.values()):
        if getattr(m, "atomic_path", None) is original:
            m.atomic_path = atomic_path

sys.argv = [tool, *argv]
namespace[entry]()
"""


def run(tool, args, *, entry="main", kill_at_call=None, kill_in_write=None):
    """Run ``tools/<tool>.py`` in a child process; with a kill point, expect it to die there. Returns its output."""
    kills = {k: v for k, v in (("KILL_AT_CALL", kill_at_call), ("KILL_IN_WRITE", kill_in_write)) if v}
    env = {k: v for k, v in os.environ.items() if k not in ("KILL_AT_CALL", "KILL_IN_WRITE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **kills)
    script = str(ROOT / "tools" / f"{tool}.py")
    if kills:
        command = [sys.executable, "-c", CHILD, script, entry, *args]
    else:
        command = [sys.executable, script, *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    expected = -signal.SIGKILL if kills else 0
    assert proc.returncode == expected, output[-3000:]
    return output


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a, b):
    wa, wb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def flip_byte(path, offset=None, *, inside=None):
    """Invert one byte of ``path``: at ``offset``, or in the middle of the stored bytes of tensor ``inside``."""
    data = bytearray(path.read_bytes())
    if inside is not None:
        raw = inside.detach().numpy().tobytes()
        offset = data.find(raw) + len(raw) // 2
        assert offset >= len(raw) // 2
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_killed_anywhere_resumes_to_the_uninterrupted_result(tiny_world, tmp_path):
    """12 iterations, a checkpoint every 4, a log line every 3 (so an averaging window spans a checkpoint)."""
    _, overrides = tiny_world
    common = ["--config-file", CONFIG, *overrides, "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "4",
              "LOG_PERIOD", "3", "DATASETS.TEST", "[]"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run("train_net", [*common, "OUTPUT_DIR", str(ref)])

    def train_net(*extra, **kill):
        return run("train_net", [*extra, *common, "OUTPUT_DIR", str(out)], entry="cli", **kill)

    # 1. Killed in the optimizer step (after forward and backward) of an iteration between checkpoints 4 and 8;
    # seeded, so a failure can be replayed.
    k = random.Random(9).randrange(5, 8)
    train_net(kill_at_call=f"torch.optim:AdamW.step:{k}")
    assert (out / "model_0000003.pth").is_file() and not (out / "model_0000007.pth").exists()
    assert max(m["iteration"] for m in metrics(out)) >= 3  # lines past the checkpoint, for the resume to drop

    # 2. Resumed, and killed half-way through writing the iteration-8 checkpoint: the last good one stays in place.
    train_net("--resume", kill_in_write="model_*.pth:0")
    partial = list(out.glob(".model_0000007.pth.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < (ref / "model_0000007.pth").stat().st_size
    assert not (out / "model_0000007.pth").exists() and (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert read_checkpoint(out / "model_0000003.pth")["iteration"] == 4

    # 3. Resumed from 4 and killed in the step of iteration 10, after the iteration-8 checkpoint.
    train_net("--resume", kill_at_call="torch.optim:AdamW.step:6")
    assert read_checkpoint(out / "model_0000007.pth")["iteration"] == 8
    assert not list(out.glob(".*.tmp"))  # the next checkpoint save removed the half-written file

    # 4. The newest checkpoint is damaged on disk (one byte in the middle); --resume refuses it, says why, and
    # falls back to the one before.
    flip_byte(out / "model_0000007.pth", (out / "model_0000007.pth").stat().st_size // 2)
    log = run("train_net", ["--resume", *common, "OUTPUT_DIR", str(out)])
    assert "skipping unusable checkpoint" in log and "model_0000007.pth is corrupted" in log
    assert f"resumed from {out / 'model_0000003.pth'} at iteration 4" in log

    assert_same_weights(ref / "model_final.pth", out / "model_final.pth")
    assert metrics(out) == metrics(ref)  # every logged loss, lr and iteration
    assert [m["iteration"] for m in metrics(ref)] == [0, 2, 3, 5, 7, 8, 11]
    assert not list(out.glob(".*.tmp"))


def test_checkpoint_fallback_and_clear_errors(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer)
    assert ckpt.resume() == (0, {})  # nothing to resume: start at 0
    ckpt.save("model_0000003", 4, state={"nonfinite_skipped": 1})
    first = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save("model_0000007", 8)
    (tmp_path / ".model_0000011.pth.abc123.tmp").write_bytes(b"half a checkpoint")  # left by a killed save
    ckpt.save("model_0000011", 12)
    assert not list(tmp_path.glob(".*.tmp"))

    newest = tmp_path / "model_0000011.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*model_0000011\.pth"):
        read_checkpoint(newest)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000011.pth"
    fresh = torch.nn.Linear(3, 2)
    resumed = Checkpointer(tmp_path, model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1)).resume()
    assert resumed == (8, {})  # the one before the truncated pointer target
    assert torch.equal(fresh.weight, model.weight)

    # bytes changed inside a tensor: torch.load would read them, the CRC check refuses them
    middle = tmp_path / "model_0000007.pth"
    flip_byte(middle, inside=model.weight)
    with pytest.raises(CheckpointError, match=r"model_0000007\.pth is corrupted"):
        read_checkpoint(middle)
    assert ckpt.resume() == (4, {"nonfinite_skipped": 1})

    flip_byte(tmp_path / "model_0000003.pth", inside=first)
    with pytest.raises(CheckpointError, match=r"(?s)no usable checkpoint.*0000011.*0000007.*0000003"):
        ckpt.resume()
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_checkpoint(tmp_path / "nowhere.pth")


# -------------------------------------------------------------------------------------------- non-finite losses


def cfg_for(tiny_world, out, *extra):
    _, overrides = tiny_world
    return load_config(CONFIG, overrides + ["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "6", "DATASETS.TEST", "[]",
                                            "SOLVER.CHECKPOINT_PERIOD", "0", *extra])


@pytest.fixture
def poison(monkeypatch):
    """``poison({2, 3})``: the model's ``loss_box_reg`` is NaN in its calls 2 and 3 (from 0) of this training run."""
    forward, state = OVDetector.forward, {"calls": 0, "at": set()}

    def poisoned(self, samples):
        losses = forward(self, samples)
        if state["calls"] in state["at"]:
            losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
        state["calls"] += 1
        return losses

    monkeypatch.setattr(OVDetector, "forward", poisoned)

    def set_calls(at):
        state.update(calls=0, at=set(at))

    return set_calls


def test_nonfinite_loss_stops_with_a_report_then_resumes_skipping(tiny_world, poison, tmp_path):
    poison({3})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration 3: loss_box_reg=nan; "
                                                 r"SOLVER.SKIP_NONFINITE_LOSS true would skip") as e:
        train(cfg_for(tiny_world, tmp_path, "SOLVER.CHECKPOINT_PERIOD", "2"))
    report, snapshot = tmp_path / "nonfinite_iter_0000003.json", tmp_path / "nonfinite_iter_0000003.pth"
    assert str(report) in str(e.value) and str(snapshot) in str(e.value)
    info = json.loads(report.read_text())
    assert info["iteration"] == 3 and info["action"] == "stopped" and info["nonfinite"] == ["loss_box_reg"]
    assert info["losses"]["loss_box_reg"] == "nan" and isinstance(info["losses"]["loss_rpn_cls"], float)
    assert len(info["image_ids"]) == 2 and all(f.endswith(".png") for f in info["file_names"])
    assert read_checkpoint(snapshot)["iteration"] == 3  # the state before the bad step, kept aside
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"  # resuming goes on from iteration 2
    assert not (tmp_path / "model_final.pth").exists()
    assert [m["iteration"] for m in metrics(tmp_path)] == [0, 1, 2]

    # Resumed at iteration 2, now skipping: iterations 3 and 4 (calls 1 and 2 of this run) are bad.
    poison({1, 2})
    train(cfg_for(tiny_world, tmp_path, "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.SKIP_NONFINITE_LOSS", "true"),
          resume=True)
    rows = metrics(tmp_path)
    assert [m["iteration"] for m in rows] == [0, 1, 2, 3, 4, 5]
    assert [m["nonfinite_skipped"] for m in rows[2:]] == [0, 1, 2, 2]
    assert "loss_box_reg" not in rows[3] and "total_loss" not in rows[4] and np.isfinite(rows[5]["total_loss"])
    assert rows[5]["lr"] == pytest.approx(1e-3)  # the LR schedule went on through the skipped steps
    assert read_checkpoint(tmp_path / "model_0000003.pth")["trainer"] == {"nonfinite_skipped": 1, "nonfinite_streak": 1}
    final = read_checkpoint(tmp_path / "model_final.pth")
    assert final["trainer"] == {"nonfinite_skipped": 2, "nonfinite_streak": 0}
    # 4 optimizer steps in 6 iterations: none for the 2 skipped
    assert all(int(s["step"]) == 4 for s in final["optimizer"]["state"].values())
    assert json.loads((tmp_path / "nonfinite_iter_0000004.json").read_text())["action"] == "skipped"


def test_diverged_training_stops_after_the_skip_limit(tiny_world, tmp_path):
    # A huge LR: after the first steps the weights overflow and every loss (or the RPN's output) is non-finite.
    cfg = cfg_for(tiny_world, tmp_path, "SOLVER.BASE_LR", "1e30", "SOLVER.SKIP_NONFINITE_LOSS", "true",
                  "SOLVER.NONFINITE_SKIP_LIMIT", "3", "SOLVER.MAX_ITER", "20")
    with pytest.raises(FloatingPointError, match=r"3 non-finite steps in a row \(SOLVER.NONFINITE_SKIP_LIMIT\)") as e:
        train(cfg)
    stopped = int(str(e.value).split("iteration ")[1].split(":")[0])
    actions = [json.loads((tmp_path / f"nonfinite_iter_{i:07d}.json").read_text())["action"]
               for i in range(stopped - 2, stopped + 1)]
    assert actions == ["skipped", "skipped", "stopped"]
    assert not (tmp_path / f"nonfinite_iter_{stopped - 3:07d}.json").exists()


def _ddp_worker_with_a_nan_on_rank_1(cfg):
    import torch.distributed as dist

    forward, calls = OVDetector.forward, [0]

    def poisoned(self, samples):  # rank 1's loss is NaN at iteration 1, rank 0's is not
        losses = forward(self, samples)
        if dist.get_rank() == 1 and calls[0] == 1:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        calls[0] += 1
        return losses

    OVDetector.forward = poisoned
    train(cfg)
    dist.barrier()
    final = read_checkpoint(f"{cfg.OUTPUT_DIR}/model_final.pth")
    flat = torch.cat([v.float().flatten() for v in final["model"].values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])  # rank 0 skipped the step with rank 1: still in sync
    assert all(int(s["step"]) == 2 for s in final["optimizer"]["state"].values())


@pytest.mark.slow
def test_ddp_workers_skip_a_nonfinite_step_together(tiny_world, tmp_path):
    from ovd.engine.launch import launch

    cfg = cfg_for(tiny_world, tmp_path, "SOLVER.MAX_ITER", "3", "SOLVER.SKIP_NONFINITE_LOSS", "true")
    launch(_ddp_worker_with_a_nan_on_rank_1, 2, use_cuda=False, args=(cfg,))
    assert [m["nonfinite_skipped"] for m in metrics(tmp_path)] == [0, 1, 1]
    report = json.loads((tmp_path / "nonfinite_iter_0000001_rank1.json").read_text())
    assert report["nonfinite"] == ["loss_cls"] and report["rank"] == 1
    assert json.loads((tmp_path / "nonfinite_iter_0000001.json").read_text())["nonfinite"] == []


# ------------------------------------------------------------------------------------ offline steps: extraction, mining


@pytest.fixture(scope="module")
def world(oracle_world):
    return oracle_world


def extractor_args(world, out):
    root, proposals = world
    return ["--dataset-json", str(root / "annotations" / "train_image_labels.json"), "--image-root",
            str(root / "images" / "train"), "--proposals", str(proposals), "--model", "ovd-toy-vit", "--random-init",
            "--top-k", "8", "--chunk-size", "3", "--batch-size", "7", "--num-workers", "0", "--no-progress",
            "--out", str(out)]


@pytest.fixture(scope="module")
def reference_store(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    load_tool("extract_region_embeddings").main(extractor_args(world, out))
    return out


def test_region_extraction_killed_while_writing_is_completed_by_a_rerun(world, reference_store, tmp_path):
    out = tmp_path / "store"
    args = extractor_args(world, out)
    # Killed half-way through writing chunk 1 (of 4): chunk 0 is kept, chunk 1 will be done again.
    run("extract_region_embeddings", args, kill_in_write="000001.npz:0")
    assert sorted(p.name for p in (out / "chunks").glob("*.npz")) == ["000000.npz"]
    assert list((out / "chunks").glob(".000001.npz.*.tmp"))
    with pytest.raises(ValueError, match="incomplete"):
        RegionStore.open(out)
    # Run again, killed while joining the chunks into the final arrays.
    run("extract_region_embeddings", args, kill_in_write="embeddings.npy:0")
    assert not (out / "meta.json").exists() and len(list((out / "chunks").glob("*.npz"))) == 4
    log = run("extract_region_embeddings", args)
    assert "images_resumed            12" in log
    for name in ("embeddings.npy", "boxes.npy", "index.npy", "meta.json"):
        assert (out / name).read_bytes() == (reference_store / name).read_bytes(), name
    assert not (out / "chunks").exists() and not list(out.glob(".*.tmp"))


def test_pseudo_label_mining_killed_then_rerun_writes_the_same_file(world, reference_store, tmp_path):
    root, _ = world
    labels = root / "annotations" / "train_image_labels.json"
    names = [c["name"] for c in json.loads(labels.read_text())["categories"]]
    text = tmp_path / "text.npy"
    save_text_embeddings(text, encode_text(load_clip("ovd-toy-vit", seed=0), names), names=names,
                         templates=["a photo of a {}"], model_name="ovd-toy-vit", pretrained=None)
    common = ["--image-labels", str(labels), "--region-store", str(reference_store), "--text-embeddings", str(text),
              "--threshold", "0.2", "--logit-scale", "100", "--no-progress"]
    tool = load_tool("mine_pseudo_labels")
    tool.main([*common, "--out", str(tmp_path / "ref.json")])
    out = tmp_path / "pseudo.json"
    tool.main([*common, "--threshold", "0.9", "--out", str(out)])  # an earlier output, of other settings
    earlier = out.read_bytes()
    assert earlier != (tmp_path / "ref.json").read_bytes()

    run("mine_pseudo_labels", [*common, "--out", str(out)], kill_at_call="ovd.pseudo_labels.miner:score_regions:5")
    assert out.read_bytes() == earlier  # killed mid-way: nothing written
    run("mine_pseudo_labels", [*common, "--out", str(out)], kill_in_write="pseudo.json:0")
    assert out.read_bytes() == earlier and list(tmp_path.glob(".pseudo.json.*.tmp"))  # half a file, beside it
    tool.main([*common, "--out", str(out)])
    assert out.read_bytes() == (tmp_path / "ref.json").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))
