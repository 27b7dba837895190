"""The detection page: its functions without a browser, and the page itself in headless Chromium.

The browser test needs Debian's ``chromium`` (/usr/bin/chromium; `.ci/run` installs it) and the ``playwright``
package; set OVD_WEB_DEMO_SCREENSHOT=docs/web_demo.png to keep its screenshot for the README.
"""

import json
import os
import runpy
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import ovd.inference.vocabulary as vocabulary_module
from ovd.data.shapes import SHAPES_CATEGORIES
from ovd.inference import Detections, Detector
from ovd.inference.visualize import draw_detections, label_style, place_labels
from ovd.inference.web import (
    GROUP_COLORS,
    MAX_SIDE,
    PageError,
    WebDemo,
    draw_for_page,
    load_upload,
    novel_class_names,
    parse_names,
    unpaired,
)

from inference_helpers import CONFIG

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
THRESHOLD = 0.05  # the tiny random detector scores low; this keeps a few dozen boxes


@pytest.fixture(scope="module")
def photo_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(skdata.astronaut()).resize((240, 180)).save(path)
    return path


@pytest.fixture
def demo(files, cache):
    return WebDemo(Detector.from_config(CONFIG, files.weights, overrides=files.overrides),
                   novel_names=["green circle", "white hexagon"])


# ---- drawing ----


def test_labels_of_boxes_sharing_a_corner_do_not_overlap():
    boxes = np.array([[50, 50, 120, 120], [50, 50, 110, 130], [50, 50, 100, 100]], dtype=np.float32)
    places = place_labels(boxes, [(60, 12)] * 3, (200, 200))
    assert places[0] == (50, 38, 110, 50)  # the best box keeps the first choice: above its top-left corner
    for i in range(3):
        x0, y0, x1, y1 = places[i]
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 200
        for j in range(i):
            a, b = places[i], places[j]
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (a, b)


def test_labels_stay_inside_the_image():
    # a box at the top edge gets its label inside; one at the right edge has it shifted left
    places = place_labels(np.array([[0, 0, 40, 40], [180, 60, 200, 90]]), [(30, 10), (50, 10)], (100, 200))
    assert places[0] == (0, 0, 30, 10)
    assert places[1][2] == 200 and places[1][1] == 50
    # an image lower than a label: pinned to the top rather than dropped
    assert place_labels(np.array([[0, 0, 10, 4]]), [(20, 10)], (4, 400)) == [(0, 0, 20, 10)]


def test_font_follows_the_image_size():
    small, big = label_style((160, 160)), label_style((3000, 4000))
    assert big[0] > 3 * small[0] and big[2] > small[2]
    # a 20000x20 strip is not given a font sized by its long side
    assert label_style((20, 20000))[0] < label_style((2000, 2000))[0]


def test_draw_colours_and_marks():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    box = np.array([[20, 40, 80, 90]], dtype=np.float32)
    plain = draw_detections(image, box, ["x"], np.array([3]), colors=[(255, 0, 0)])
    marked = draw_detections(image, box, ["x"], np.array([3]), colors=[(255, 0, 0)], marked=np.array([True]))
    assert tuple(plain[65, 20]) == (255, 0, 0)  # left edge of the box in the given colour
    red = lambda im: int((im == (255, 0, 0)).all(axis=2).sum())  # noqa: E731
    assert red(marked) > red(plain)


def test_page_enlarges_small_images_and_colours_by_group():
    dets = Detections(np.array([[10, 10, 60, 60]], np.float32), np.array([0.9], np.float32), np.array([0]),
                      ["green circle"], np.array([1]), (160, 160))
    drawn = draw_for_page(np.zeros((160, 160, 3), np.uint8), dets, ["novel"])
    assert drawn.shape == (640, 640, 3)
    assert tuple(drawn[140, 40]) == GROUP_COLORS["novel"]  # the box's left edge, at 4x


# ---- differences between two vocabularies ----


def test_unpaired_boxes():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 5], [50, 50, 60, 60]], np.float32)  # IoU with a[0] exactly 0.5: a counterpart
    only_a, only_b = unpaired(a, b)
    assert only_a.tolist() == [False, True, False] and only_b.tolist() == [False, True]
    only_a, only_b = unpaired(a, np.zeros((0, 4)))
    assert only_a.tolist() == [True] * 3 and only_b.tolist() == []
    assert unpaired(a, b, iou=0.6)[0].tolist() == [True, True, True]


# ---- bad input at the function level ----


def test_uploads(tmp_path, photo_png):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(PageError, match="notes.png: not an image"):
        load_upload(text)
    with pytest.raises(PageError, match="empty.jpg: the file is empty"):
        load_upload(empty)
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((20, 20000, 3), 128, np.uint8)).save(strip)
    up = load_upload(strip)
    assert up.rgb.shape == (4, MAX_SIDE, 3) and "20000x20" in up.notice and f"{MAX_SIDE}x4" in up.notice
    ok = load_upload(photo_png)
    assert ok.rgb.shape == (180, 240, 3) and ok.notice == ""


def test_parse_names():
    assert parse_names(" red mug, stapler,, red mug ,") == ["red mug", "stapler"]
    for empty in ("", " , ,", None):
        with pytest.raises(PageError, match="empty"):
            parse_names(empty)
    with pytest.raises(PageError, match="5000 names"):
        parse_names(", ".join(f"thing {i}" for i in range(5000)))


# ---- the page's requests on a Detector ----


def test_detect_is_the_detector(demo, files, photo_png):
    result = demo.detect([photo_png], "red mug, stapler", THRESHOLD)
    reference = Detector.from_config(CONFIG, files.weights, overrides=files.overrides)
    reference.set_vocabulary(["red mug", "stapler"])
    expected = reference(np.asarray(Image.open(photo_png)), score_threshold=THRESHOLD)
    assert len(expected) > 0
    assert result.coco == expected.to_coco(0)
    assert [r[1] for r in result.rows] == expected.class_names and {r[2] for r in result.rows} == {"new"}
    assert len(result.images) == 1 and result.images[0].shape == (540, 720, 3)  # 180x240 shown at 3x
    assert f"{len(expected)} detections in 1 image(s)" in result.message and "detection took" in result.message


def test_same_words_again_do_not_recompute_text_embeddings(demo, photo_png, monkeypatch):
    calls = []
    encode = vocabulary_module.encode_text
    monkeypatch.setattr(vocabulary_module, "encode_text", lambda *a, **k: calls.append(list(a[1])) or encode(*a, **k))
    first = demo.detect([photo_png], "red mug, stapler", THRESHOLD)
    demo.detect([photo_png], "blue bottle", THRESHOLD)
    assert calls == [["red mug", "stapler"], ["blue bottle"]]
    again = demo.detect([photo_png], "red mug, stapler", THRESHOLD)
    assert calls == [["red mug", "stapler"], ["blue bottle"]]  # from the cache
    assert demo.detector.vocabulary.names == ("red mug", "stapler")
    assert again.coco == first.coco


def test_bad_requests_leave_a_message_and_the_next_one_works(demo, photo_png, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = demo.detect([text, empty], "red circle", THRESHOLD)
    assert result.images == [] and "notes.txt: not an image" in result.message and "empty.png" in result.message
    with pytest.raises(PageError, match="empty"):
        demo.detect([photo_png], " , ", THRESHOLD)
    with pytest.raises(PageError, match="5000 names"):
        demo.detect([photo_png], ",".join(f"n{i}" for i in range(5000)), THRESHOLD)
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((20, 20000, 3), 128, np.uint8)).save(strip)
    mixed = demo.detect([strip, empty, photo_png], "red circle", THRESHOLD)
    assert len(mixed.images) == 2 and "detected on a 4096x4 copy" in mixed.message
    assert "skipped empty.png" in mixed.message
    assert {d["image_id"] for d in mixed.coco} <= {0, 1}


def test_groups_and_presets(demo):
    assert demo.group("green circle") == "novel" and demo.group("red circle") == "base" and demo.group("mug") == "new"
    assert "coco" in demo.presets and "shapes" in demo.presets
    coco = demo.vocabulary(", ".join(demo.presets["coco"].names))
    assert coco is demo.presets["coco"] and coco.category_ids[-1] == 90  # COCO's own ids, not 1..80
    assert demo.vocabulary("red circle, cup").category_ids == (1, 2)


def test_compare_marks_boxes_without_counterpart(demo, photo_png):
    same = demo.compare(photo_png, "red circle, blue star", "red circle, blue star", THRESHOLD)
    assert len(same.rows) > 0 and {r[-1] for r in same.rows} == {"found"}
    np.testing.assert_array_equal(same.images[0], same.images[1])
    diff = demo.compare(photo_png, "red circle, blue star", "red mug", THRESHOLD)
    a = [r for r in diff.rows if r[0] == "A"]
    b = [r for r in diff.rows if r[0] == "B"]
    xyxy = lambda rows: np.array([d["bbox"] for d in rows]) @ np.array(  # noqa: E731
        [[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    coco_a = [d for d in diff.coco if d["side"] == "A"]
    coco_b = [d for d in diff.coco if d["side"] == "B"]
    only_a, only_b = unpaired(xyxy(coco_a), xyxy(coco_b))
    assert [r[-1] == "none at IoU>=0.5" for r in a] == only_a.tolist()
    assert [r[-1] == "none at IoU>=0.5" for r in b] == only_b.tolist()
    assert only_a.any()  # two different vocabularies on a random detector do not find the same boxes
    assert f"{int(only_a.sum())} with no B box" in diff.message


def test_novel_names_from_the_config_datasets(tiny_world):
    root, overrides = tiny_world
    expected = {c["name"] for c in SHAPES_CATEGORIES if c["split"] == "novel"}
    assert novel_class_names(CONFIG, overrides) == expected


def test_tool_without_weights_says_what_to_do(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "tools" / "web_demo.py"))["main"]
    assert main(["--weights", str(tmp_path / "none.pth")]) == 2
    assert "no detector weights at" in capsys.readouterr().err


# ---- the page in a browser ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _playwright_missing() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium (.ci/run does)")
@pytest.mark.skipif(_playwright_missing(), reason="playwright is not installed (the test extra)")
def test_page_in_headless_chromium(demo, files, photo_png, tmp_path):
    from playwright.sync_api import sync_playwright

    from ovd.inference.web import build_app, example_images, launch_kwargs

    reference = Detector.from_config(CONFIG, files.weights, overrides=files.overrides)
    reference.set_vocabulary(["red mug", "stapler", "red circle"])
    expected = reference(np.asarray(Image.open(photo_png)), score_threshold=THRESHOLD).to_coco(0)
    assert expected

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    examples = example_images(tmp_path / "examples")
    app = build_app(demo, examples=examples, threshold=THRESHOLD)
    port = _free_port()
    app.launch(**launch_kwargs(port=port, examples=examples), prevent_thread_lock=True)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            status = page.locator("#status")

            def submit(words, path=None):  # the file list keeps earlier uploads; a new one is added
                if path is not None:
                    page.set_input_files("#upload input[type=file]", str(path))
                    page.locator("#upload").get_by_text(Path(path).name).wait_for()
                page.fill("#vocabulary textarea", words)
                before = status.inner_text()
                page.click("#detect")
                # done when the status changed and is no longer gradio's progress timer ("0.8s")
                page.wait_for_function(
                    "([el, old]) => { const t = el.innerText.trim(); "
                    "return t && t !== old && !/^(processing|queue|[0-9.]+s\\b)/i.test(t); }",
                    arg=[status.element_handle(), before], timeout=20000)
                return status.inner_text()

            # a bad upload: a message on the page, and the server answers the next request
            assert "empty.png: the file is empty" in submit("red mug", empty)
            message = submit(" , ", photo_png)
            assert "the vocabulary is empty" in message and "Traceback" not in page.content()
            message = submit("red mug, stapler, red circle")
            assert f"{len(expected)} detections in 1 image(s)" in message and "detection took" in message
            assert json.loads(page.input_value("#coco-json textarea")) == expected
            href = page.locator("#download a").first.get_attribute("href")
            url = href if href.startswith("http") else f"http://127.0.0.1:{port}{href}"
            assert url.startswith(f"http://127.0.0.1:{port}/"), url  # the page's own server, nothing outside
            assert page.request.get(url, timeout=10000).json() == expected  # through the browser's session
            page.locator("#result img").first.wait_for()
            shot = tmp_path / "web_demo.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        app.close()
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("OVD_WEB_DEMO_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
