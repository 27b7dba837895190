"""The whole chain at CI size: every stage runs and hands its output to the next; a second run skips them."""

import json
import math

import pytest

from tools_loader import load_tool

chain = load_tool("run_chain")
check = load_tool("check_readme_results")

TINY = ["SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "[]", "SOLVER.CHECKPOINT_PERIOD", "0",
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]


@pytest.mark.slow
def test_chain_runs_every_stage_and_skips_when_done(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "runs"
    args = ["--config-file", "configs/shapes/chain.yaml", "--stages", "base", "rkd", "rkd_pis_wt", "--num-train", "16", "--num-val", "6", "--teacher-steps", "4",
            "--pseudo-threshold", "0",
            "--output", str(out), *TINY]
    results = chain.main(args)
    assert list(results) == ["base", "rkd", "rkd_pis_wt"]
    for stage, r in results.items():
        assert all(0.0 <= r[k] <= 1.0 for k in ("AP50", "AP50_base", "AP50_novel")), stage
        # at CI size the 3-iteration proposal model may put no val region on a novel object (NaN then)
        assert "fidelity/cosine_novel" in r and math.isfinite(r["fidelity/cosine_base"]) or r["fidelity/regions_base"] == 0
    assert (out / "curves.png").is_file() and (out / "summary.png").is_file()
    first = capsys.readouterr().out
    # the proposal model (base boxes only) and the three stages; its proposals feed regions and pseudo boxes
    assert first.count("tools/train_net.py") == 4 and "MODEL.META_ARCHITECTURE ProposalNetwork MODEL.PROPOSAL_GENERATOR.NAME OLN" in first
    assert "tools/generate_proposals.py" in first and "make_oracle_proposals" not in first
    assert "pseudo boxes: precision" in first and "proposals (oln) on shapes_val: AR@20 novel" in first
    manifest = json.loads((out / "chain_results.json").read_text())
    assert list(manifest["stages"]) == ["proposals_oln", "base", "rkd", "rkd_pis_wt"]
    assert [manifest["stages"][s]["init_from"] for s in ("base", "rkd", "rkd_pis_wt")] == [None, "base", "rkd"]
    assert manifest["results"]["rkd"] == results["rkd"]
    assert 0 <= manifest["proposal_recall"]["oln"]["AR@20_novel"] <= 1
    assert (out / "summary.txt").read_text().strip() == manifest["table"]
    # README's table is checked against the run: written once, it passes; one digit off, it fails
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{check.BEGIN}\nold\n{check.END}\nrest\n")
    results = ["--results", str(out / "chain_results.json"), "--readme", str(readme)]
    assert check.main(results) == 1
    assert check.main(results + ["--write"]) == 0 and check.main(results) == 0
    text = readme.read_text()
    row = f"| rkd | {100 * manifest['results']['rkd']['AP50_novel']:.1f} |"
    assert row in text and text.endswith(f"{check.END}\nrest\n")
    readme.write_text(text.replace(row, "| rkd | 99.9 |"))
    assert check.main(results) == 1
    stamp = (out / "rkd" / "model_final.pth").stat().st_mtime_ns
    chain.main(args)
    second = capsys.readouterr().out
    assert "tools/train_net.py" not in second and "mine_pseudo_labels" not in second
    assert (out / "rkd" / "model_final.pth").stat().st_mtime_ns == stamp
