"""The chain's figures are checked through their data (bar heights, line x offsets), not their pixels, on small
synthetic runs written here (no training)."""

import json
import time

import pytest
from matplotlib.container import BarContainer
from PIL import Image

from ovd.utils import figures
from tools_loader import load_tool

plot = load_tool("plot_metrics")

DATASET = "shapes_val"
FINAL = {  # AP50 novel / base / all of each detector stage
    "base": (0.05, 0.90, 0.66), "rkd": (0.40, 0.91, 0.77), "rkd_pis_wt": (0.62, 0.92, 0.84),
    "control": (0.04, 0.93, 0.68), "oracle_rkd_pis_wt": (0.75, 0.93, 0.88),
}
ITERS = {"base": 500, "proposals_oln": 300, "rkd": 200, "rkd_pis_wt": 200, "control": 200, "oracle_rkd_pis_wt": 200}
INIT = {"base": None, "proposals_oln": None, "rkd": "base", "rkd_pis_wt": "rkd", "control": "base",
        "oracle_rkd_pis_wt": "rkd"}
LOSSES = {"base": ["loss_cls", "loss_box_reg"], "rkd": ["loss_cls", "loss_box_reg", "loss_rkd_l1"],
          "rkd_pis_wt": ["loss_cls", "loss_box_reg", "loss_rkd_l1", "loss_pms"], "control": ["loss_cls", "loss_box_reg"],
          "oracle_rkd_pis_wt": ["loss_cls", "loss_box_reg", "loss_rkd_l1", "loss_pms"],
          "proposals_oln": ["loss_rpn_ctr", "loss_rpn_loc", "loss_box_iou", "loss_box_reg"]}
RECALL = (0.55, 0.80, 0.72)  # AR@20 novel / base / all of the proposal model


def write_run(run_dir, stage, *, iters=None, final=True):
    """A run like the trainer's: a line every 20 iterations, evaluations at the middle and the end."""
    run_dir.mkdir(parents=True)
    n = iters or ITERS[stage]
    keys = ("AR@20_novel", "AR@20_base", "AR@20") if stage == "proposals_oln" else ("AP50_novel", "AP50_base", "AP50")
    end = RECALL if stage == "proposals_oln" else FINAL[stage]
    rows = []
    evals = (n // 2 - 1, n - 1)
    for it in sorted({0, *range(19, n, 20), *evals}):
        rows.append({"iteration": it, **{k: 1.0 / (it + 2) for k in LOSSES[stage]}, "total_loss": 2.0 / (it + 2),
                     "lr": 0.001})
        if it in evals:
            scale = 0.5 if it < n - 1 else 1.0
            rows.append({"iteration": it, **{f"{DATASET}/{k}": scale * v for k, v in zip(keys, end)}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if final:
        (run_dir / "final_metrics.json").write_text(json.dumps({DATASET: dict(zip(keys, end))}))


def write_chain(out, stages=("base", "proposals_oln", "rkd", "rkd_pis_wt", "control", "oracle_rkd_pis_wt"), *,
                pseudo=True, **run_kwargs):
    manifest = {"proposal_source": "oln", "dataset": DATASET, "stages": {}}
    for s in stages:
        manifest["stages"][s] = {"run_dir": f"output/shapes/{s}", "init_from": INIT[s]}  # relative to the repo
        if s == "proposals_oln":
            manifest["stages"][s]["kind"] = "proposals"
        if s.startswith("oracle"):
            manifest["stages"][s]["upper_bound"] = True
        write_run(out / s, s, **run_kwargs.get(s, {}))
    if pseudo:
        manifest["pseudo_boxes"] = {"precision": {"all": {"precision": 0.97}, "base": {"precision": 0.975},
                                                  "novel": {"precision": 0.96}},
                                    "stats": {"labels": 6497, "labels_kept": 5562}}
    (out / "chain_results.json").write_text(json.dumps(manifest))
    return out


def bar_heights(fig):
    return {p.get_gid(): p.get_height() for ax in fig.axes for p in ax.patches if p.get_gid()}


def lines(fig):
    return {ln.get_gid(): ln for ax in fig.axes for ln in ax.lines if ln.get_gid()}


def test_stage_offsets_follow_the_weights_each_stage_loads(tmp_path):
    chain = figures.load_chain(write_chain(tmp_path / "shapes"))
    offsets = {name: s.offset for name, s in chain.stages.items()}
    assert offsets == {"base": 0, "proposals_oln": 0, "rkd": 500, "rkd_pis_wt": 700, "control": 500,
                       "oracle_rkd_pis_wt": 700}
    assert chain.notes == []


def test_summary_bars_are_the_final_metrics(tmp_path):
    fig = figures.summary_figure(figures.load_chain(write_chain(tmp_path / "shapes")))
    heights = bar_heights(fig)
    for stage, values in FINAL.items():
        for metric, v in zip(figures.AP_METRICS, values):
            assert heights.pop(f"{stage}/{metric}") == pytest.approx(100 * v)
    for split, v in zip(("novel", "base", "all"), RECALL):
        assert heights.pop(f"proposals_oln/{split}") == pytest.approx(100 * v)
    assert heights == pytest.approx({"pseudo_boxes/novel": 96.0, "pseudo_boxes/base": 97.5, "pseudo_boxes/all": 97.0})
    hatched = {p.get_gid().split("/")[0] for ax in fig.axes for p in ax.patches if p.get_gid() and p.get_hatch()}
    assert hatched == {"oracle_rkd_pis_wt"}
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[-1] == "oracle RKD+PIS+WT\n(upper bound)" and labels[:2] == ["base", "RKD"]
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"5.0", "62.0", "93.0"} <= texts  # the numbers printed on the bars


def test_curves_share_one_continuous_axis(tmp_path):
    fig = figures.curves_figure(figures.load_chain(write_chain(tmp_path / "shapes")))
    ln = lines(fig)
    assert ln["base/total_loss"].get_xdata()[0] == 0
    assert ln["rkd/total_loss"].get_xdata()[0] == 500
    assert ln["rkd_pis_wt/total_loss"].get_xdata()[-1] == 899
    # a loss of the later stages only lies on the same axis
    assert ln["rkd_pis_wt/loss_pms"].get_xdata()[0] == 700 and "base/loss_pms" not in ln
    # RKD's AP line starts at base's last evaluation, then follows RKD's evaluations
    assert list(ln["rkd/AP50_novel"].get_xdata()) == [499, 599, 699]
    assert ln["rkd/AP50_novel"].get_ydata()[-1] == pytest.approx(40.0)
    assert list(ln["rkd/evaluations"].get_xdata()) == [599, 699]
    boundaries = {g for ax in fig.axes for g in [x.get_gid() for x in ax.lines] if g and g.startswith("boundary/")}
    assert boundaries == {"boundary/500", "boundary/700"}
    # the proposal model trains from scratch beside base: its own panels, from 0
    assert ln["proposals_oln/loss_box_iou"].get_xdata()[0] == 0
    assert list(ln["proposals_oln/AR@20_novel"].get_xdata()) == [149, 299]
    titles = {ax.get_title() for ax in fig.axes}
    assert {"AP50 on shapes_val (%)", "AR@20 on shapes_val (%)", "loss_rkd_l1"} <= titles


def test_chain_cli_writes_both_figures_in_under_5_s(tmp_path, capsys):
    out = write_chain(tmp_path / "shapes")
    # CPU time, not wall time: the budget is the drawing's, not that of whatever else shares the machine
    t0 = time.process_time()
    plot.main(["--chain", str(out)])
    elapsed = time.process_time() - t0
    assert capsys.readouterr().out.split() == [str(out / "summary.png"), str(out / "curves.png")]
    for name in ("summary.png", "curves.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 600
    assert elapsed < 5.0


def test_partial_and_missing_stages_are_drawn_as_far_as_they_go(tmp_path):
    out = write_chain(tmp_path / "shapes", stages=("base", "rkd"), pseudo=False, rkd={"iters": 120, "final": False})
    # the chain has listed the next stage but not started it, and the killed run left half a line
    manifest = json.loads((out / "chain_results.json").read_text())
    manifest["stages"]["rkd_pis_wt"] = {"run_dir": "output/shapes/rkd_pis_wt", "init_from": "rkd"}
    (out / "chain_results.json").write_text(json.dumps(manifest))
    with open(out / "rkd" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 139, "loss_cl')
    chain = figures.load_chain(out)
    assert chain.stages["rkd"].last_iteration == 119
    notes = "\n".join(chain.notes)
    assert "metrics.jsonl:" in notes and "cut mid-line" in notes
    assert "rkd: unfinished (no final_metrics.json), drawn to its iteration 119" in notes
    assert "rkd_pis_wt: not started" in notes and "rkd_pis_wt: loads 'rkd'" not in notes
    summary = figures.summary_figure(chain)
    heights = bar_heights(summary)
    assert heights["rkd/AP50_novel"] == pytest.approx(40.0)  # its last evaluation, at iteration 119
    assert not any(g.startswith("rkd_pis_wt/") for g in heights)
    labels = [t.get_text() for t in summary.axes[0].get_xticklabels()]
    assert labels == ["base", "RKD\n(unfinished: it 119)", "RKD+PIS+WT\nno metrics yet"]
    assert len(summary.axes) == 2  # no side panel without pseudo boxes or proposals, and one for the notes
    assert "cut mid-line" in summary.axes[-1].texts[0].get_text()
    curves = figures.curves_figure(chain)
    assert lines(curves)["rkd/total_loss"].get_xdata()[-1] == 500 + 119


def test_a_stage_listed_twice_is_drawn_twice_with_a_note(tmp_path):
    out = write_chain(tmp_path / "shapes", stages=("base", "rkd"), pseudo=False)
    write_run(out / "rkd_again", "rkd")
    text = (out / "chain_results.json").read_text()
    (out / "chain_results.json").write_text(text.replace(
        '}}}', '}, "rkd": {"run_dir": "output/shapes/rkd_again", "init_from": "base"}}}'))
    chain = figures.load_chain(out)
    assert list(chain.stages) == ["base", "rkd", "rkd (2)"] and chain.stages["rkd (2)"].offset == 500
    assert any("stage 'rkd' is listed twice" in n for n in chain.notes)
    assert "rkd (2)/AP50" in bar_heights(figures.summary_figure(chain))


def test_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="neither chain_results.json nor run folders"):
        plot.main(["--chain", str(tmp_path)])
    with pytest.raises(SystemExit, match="no chain output folder"):
        plot.main(["--chain", str(tmp_path / "missing")])


def test_a_folder_without_manifest_draws_each_run_from_0(tmp_path):
    write_run(tmp_path / "base", "base")
    write_run(tmp_path / "rkd", "rkd")
    chain = figures.load_chain(tmp_path)
    assert [s.offset for s in chain.stages.values()] == [0, 0] and chain.dataset == DATASET
    assert "no readable chain_results.json" in chain.notes[0]


def test_plot_runs_given_by_name_overlay_from_0(tmp_path):
    write_run(tmp_path / "a" / "rkd", "rkd")
    write_run(tmp_path / "b" / "rkd", "rkd")
    out = tmp_path / "curves.png"
    plot.main([str(tmp_path / "a" / "rkd"), str(tmp_path / "b" / "rkd"), "--out", str(out)])
    with Image.open(out) as im:
        assert im.format == "PNG"
    ln = lines(figures.curves_figure(figures.load_runs([tmp_path / "a" / "rkd", tmp_path / "b" / "rkd"])))
    assert ln["a/rkd/total_loss"].get_xdata()[0] == ln["b/rkd/total_loss"].get_xdata()[0] == 0


def test_read_metrics_skips_unreadable_lines_with_a_note(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\n[1, 2]\n{"iteration": 1}\n{"iter')
    notes = []
    assert figures.read_metrics(tmp_path, notes) == [{"iteration": 0}, {"iteration": 1}]
    assert notes == [f"{tmp_path / 'metrics.jsonl'}:2 is not a JSON object with an iteration: skipped",
                     f"{tmp_path / 'metrics.jsonl'}:4 is cut mid-line (a killed run?): skipped"]


def test_stage_bars_with_seed_spread(tmp_path):
    means = {"base": {"AP50_novel": 0.234, "AP50_base": 0.918, "AP50": 0.704},
             "oracle": {"AP50_novel": 0.8, "AP50_base": 0.95, "AP50": 0.9}}
    stds = {"base": {"AP50_novel": 0.025, "AP50_base": 0.045, "AP50": 0.037},
            "oracle": {"AP50_novel": 0.01, "AP50_base": 0.01, "AP50": 0.01}}
    out = figures.plot_stage_bars(means, tmp_path / "ablation.png", stds=stds, upper_bounds=["oracle"])
    with Image.open(out) as im:
        assert im.format == "PNG"
    fig = figures.Figure()
    ax = fig.add_subplot()
    figures.draw_stage_bars(ax, means, stds=stds, upper_bounds=["oracle"])
    assert bar_heights(fig)["base/AP50_novel"] == pytest.approx(23.4)
    errors = sorted(seg[1][1] - seg[0][1] for c in ax.containers if isinstance(c, BarContainer)
                    for seg in c.errorbar.lines[2][0].get_segments())
    assert errors == pytest.approx(sorted(2 * 100 * s for d in stds.values() for s in d.values()))
