import json

import pytest
from PIL import Image

from tools_loader import load_tool

plot = load_tool("plot_metrics")


def test_plot_writes_a_png_with_every_loss(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"iteration": i, "loss_cls": 1.0 / (i + 1), "loss_pms": 0.5, "total_loss": 2.0, "lr": 0.01} for i in range(5)]
    rows.append({"iteration": 4, "shapes_val/AP50": 0.5, "shapes_val/AP50_novel": 0.2, "shapes_val/AP50_base": 0.7})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot.plot_runs([run], tmp_path / "curves.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_plot_names_a_broken_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\n{"iter')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2 is not a JSON line"):
        plot.read_metrics(tmp_path)
