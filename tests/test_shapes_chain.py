"""The whole chain at CI size: every stage runs and hands its output to the next; a second run skips them."""

import math

import pytest

from tools_loader import load_tool

chain = load_tool("run_shapes_chain")

TINY = ["SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "[]", "SOLVER.CHECKPOINT_PERIOD", "0",
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]


@pytest.mark.slow
def test_chain_runs_every_stage_and_skips_when_done(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "runs"
    args = ["--stages", "base", "rkd", "rkd_pis_wt", "--num-train", "16", "--num-val", "6", "--teacher-steps", "4",
            "--pseudo-threshold", "0",
            "--output", str(out), *TINY]
    results = chain.main(args)
    assert list(results) == ["base", "rkd", "rkd_pis_wt"]
    for stage, r in results.items():
        assert all(0.0 <= r[k] <= 1.0 for k in ("AP50", "AP50_base", "AP50_novel")), stage
        assert math.isfinite(r["fidelity/cosine_novel"])
    assert (out / "curves.png").is_file()
    first = capsys.readouterr().out
    assert first.count("tools/train_net.py") == 3 and "pseudo boxes: precision" in first
    stamp = (out / "rkd" / "model_final.pth").stat().st_mtime_ns
    chain.main(args)
    second = capsys.readouterr().out
    assert "tools/train_net.py" not in second and "mine_pseudo_labels" not in second
    assert (out / "rkd" / "model_final.pth").stat().st_mtime_ns == stamp
