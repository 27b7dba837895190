"""`tools/demo.py`: folders, globs, videos, vocabularies, and bad inputs reported without stopping."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from inference_helpers import CONFIG
from tools_loader import TOOLS, load_tool


# `files` (a tiny trained-detector folder) and `cache` (a private OVD_CACHE) come from conftest.py
pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture
def folder(tmp_path):
    """Two photos and one file that is not an image."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(skdata.astronaut()).resize((200, 200)).save(root / "astronaut.png")
    Image.fromarray(skdata.coffee()).resize((240, 160)).save(root / "coffee.jpg")
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    (root / "notes.txt").write_text("not an input")
    return root


def demo(files, *args):
    return load_tool("demo").main(["--config-file", CONFIG, "--weights", str(files.weights), *args, *files.overrides])


def test_folder_with_a_bad_image(files, folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = demo(files, "--input", str(folder), "--vocabulary", "red mug,stapler", "--confidence-threshold", "0.2",
              "--output", str(out))
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.jpg" in captured.err and "1 input(s) failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "coffee.jpg", "detections.json"]
    with Image.open(out / "coffee.jpg") as im:
        assert im.size == (240, 160)
    result = json.loads((out / "detections.json").read_text())
    assert result["categories"] == [{"id": 1, "name": "red mug"}, {"id": 2, "name": "stapler"}]
    assert [Path(i["file_name"]).name for i in result["images"]] == ["astronaut.png", "coffee.jpg"]
    assert result["detections"] and all(d["score"] >= 0.2 for d in result["detections"])
    assert {d["category_name"] for d in result["detections"]} <= {"red mug", "stapler"}


def test_globs_names_file_video_and_overrides_after_input(files, folder, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (96, 64))
    for k in range(3):
        writer.write(np.full((64, 96, 3), 60 * k, dtype=np.uint8))
    writer.release()
    names = tmp_path / "names.txt"
    names.write_text("red circle\nblue star\n")
    out = tmp_path / "out"
    rc = demo(files, "--vocabulary", str(names), "--output", str(out), "--confidence-threshold", "0",
              "--input", str(folder / "*.png"), str(video), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.3")
    assert rc == 0, capsys.readouterr()
    assert (out / "astronaut.png").is_file() and (out / "clip.mp4").stat().st_size > 0
    result = json.loads((out / "detections.json").read_text())
    assert [i.get("frame") for i in result["images"]] == [None, 0, 1, 2]
    assert all(d["score"] >= 0.3 for d in result["detections"])  # the override reached the model


def test_bad_vocabulary_and_missing_input(files, folder, capsys):
    assert demo(files, "--input", str(folder), "--vocabulary", "mug,mug") == 2
    assert "duplicate class names" in capsys.readouterr().err
    assert demo(files, "--input", str(folder / "nothing*.png")) == 1
    assert "input not found" in capsys.readouterr().out


def test_runs_as_a_script_on_cpu(files, folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "demo.py"), "--config-file", CONFIG, "--weights", str(files.weights),
         "--input", str(folder / "astronaut.png"), "--vocabulary", "shapes", *files.overrides, "MODEL.DEVICE", "cpu"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "astronaut.png:" in proc.stdout and "detections" in proc.stdout
