"""The detection page (`tools/web_demo.py`): upload or pick images, type a vocabulary, see boxes, a table and the
COCO results; compare two vocabularies on one image.

Choices, and why:
- Gradio (the convention of Detic, YOLO-World, OWLv2, Grounding DINO demos), imported only by `build_app`, so the
  page's logic here — reading uploads, parsing words, drawing, marking differences — is plain functions, tested
  without a server. The server never calls out: analytics off, no share link, no server-side rendering, system
  fonts instead of Google Fonts.
- One inference path: `WebDemo` holds one `ovd.Detector`; every request sets its vocabulary with
  `Detector.set_vocabulary` (whose `TextEncoder` caches text embeddings on disk, and takes training names from the
  checkpoint) and calls it. A lock makes "set the words, detect" one step, since the detector's vocabulary is
  shared by all visitors. Words equal to a preset (`PRESETS`) are set as that preset, so the JSON carries its
  COCO/LVIS category ids.
- Colours say what a name is to the model: *base* (a training class with boxes), *novel* (a training class the
  datasets of its config call novel: no boxes in training, `novel_class_names`), *new* (a word outside the
  training vocabulary).
- "Boxes that differ" between two vocabularies: a box of one side with no box of the other side at IoU >= 0.5,
  whatever either is called (`unpaired`). A box found by both under two names is not marked — the table shows the
  names; a box only one vocabulary finds is. Marked boxes are drawn three times as thick and starred.
- Small images (the 160 px shapes world) are enlarged for display by an integer factor, nearest neighbour, so
  the labels are readable and the pixels are still the model's; the JSON stays in original pixels.
- Bad input is a message on the page, never a traceback: a file that is not an image or is empty is skipped
  with its name, an image with a side over `MAX_SIDE` is downscaled with a notice (its boxes are in the
  downscaled pixels), an empty vocabulary or one of more than `MAX_NAMES` names is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from ovd.config import load_config
from ovd.data import get_dataset, read_image
from ovd.inference.detector_api import Detections, Detector
from ovd.inference.visualize import draw_detections
from ovd.inference.vocabulary import PRESETS, Vocabulary, preset_vocabulary
from ovd.utils.io import read_json
from ovd.utils.paths import datasets_root

__all__ = [
    "GROUP_COLORS",
    "MAX_NAMES",
    "MAX_SIDE",
    "PageError",
    "WebDemo",
    "build_app",
    "draw_for_page",
    "example_images",
    "load_upload",
    "novel_class_names",
    "parse_names",
    "unpaired",
]

logger = logging.getLogger(__name__)

MAX_NAMES = 2000  # LVIS's 1203 fit; past this, embedding on a CPU takes minutes while the page waits
MAX_SIDE = 4096  # longer sides are downscaled first: the model resizes to its own test size anyway
MAX_IMAGES = 16
MATCH_IOU = 0.5
DISPLAY_MIN_SIDE = 640  # images whose long side is shorter are enlarged for display
GROUP_COLORS = {"base": (66, 135, 245), "novel": (255, 140, 0), "new": (46, 204, 113)}
TABLE_HEADERS = ["image", "class", "group", "score", "x0", "y0", "x1", "y1"]
COMPARE_HEADERS = ["side", "class", "group", "score", "x0", "y0", "x1", "y1", "other side"]


class PageError(ValueError):
    """A problem with what the visitor gave (file, words); its message is shown on the page."""


@dataclass
class Upload:
    """An image read from an upload: ``rgb`` uint8 [H, W, 3] (downscaled where ``notice`` says so)."""

    name: str
    rgb: np.ndarray
    notice: str = ""


def load_upload(path: str | os.PathLike, *, max_side: int = MAX_SIDE) -> Upload:
    """Read an uploaded file as an RGB image, downscaled so that no side exceeds ``max_side`` (with a notice).

    Raises `PageError` naming the file when it is empty or not an image."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise PageError(f"{name}: the upload did not arrive")
    if path.stat().st_size == 0:
        raise PageError(f"{name}: the file is empty (0 bytes)")
    try:
        rgb = read_image(path)
    except OSError:
        raise PageError(f"{name}: not an image this page can read (PNG, JPEG, BMP, TIFF, WebP, ...)") from None
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return Upload(name, rgb)
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    return Upload(name, small, f"{name}: {w}x{h} is larger than {max_side} px on a side; detected on a "
                               f"{size[0]}x{size[1]} copy (boxes are in its pixels)")


def parse_names(text: str, *, max_names: int = MAX_NAMES) -> list[str]:
    """Class names from a comma-separated string: stripped, empty entries dropped, repeats kept once (first).

    Raises `PageError` for no names or more than ``max_names``."""
    names = list(dict.fromkeys(n.strip() for n in (text or "").split(",") if n.strip()))
    if not names:
        raise PageError("the vocabulary is empty: type some names, separated by commas, or pick a preset")
    if len(names) > max_names:
        raise PageError(f"{len(names)} names is more than this page embeds ({max_names}); use fewer, or the "
                        f"command line (tools/demo.py) for a vocabulary this large")
    return names


def unpaired(a: np.ndarray, b: np.ndarray, *, iou: float = MATCH_IOU) -> tuple[np.ndarray, np.ndarray]:
    """Which boxes of ``a`` have no box of ``b`` at IoU >= ``iou``, and the other way round.

    a: float [N, 4], b: float [M, 4], xyxy. Returns bool [N], bool [M] (True: no counterpart)."""
    a_t = torch.as_tensor(np.asarray(a, dtype=np.float32).reshape(-1, 4))
    b_t = torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4))
    if len(a_t) == 0 or len(b_t) == 0:
        return np.ones(len(a_t), dtype=bool), np.ones(len(b_t), dtype=bool)
    close = (box_iou(a_t, b_t) >= iou).numpy()
    return ~close.any(axis=1), ~close.any(axis=0)


def draw_for_page(
    rgb: np.ndarray, detections: Detections, groups: Sequence[str], *, marked: np.ndarray | None = None
) -> np.ndarray:
    """``rgb`` with ``detections`` drawn in their groups' colours (`GROUP_COLORS`), marked ones thick and starred;
    enlarged by an integer factor (nearest neighbour) when its long side is under `DISPLAY_MIN_SIDE`."""
    factor = max(1, math.ceil(DISPLAY_MIN_SIDE / max(rgb.shape[:2])))
    if factor > 1:
        rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    marked = np.zeros(len(detections), dtype=bool) if marked is None else marked
    labels = [f"{'* ' if m else ''}{n} {s:.2f}" for n, s, m in zip(detections.class_names, detections.scores, marked)]
    masks = detections.masks
    if masks is not None and factor > 1:
        masks = np.repeat(np.repeat(masks, factor, axis=1), factor, axis=2)
    return draw_detections(rgb, detections.boxes * factor, labels, detections.class_ids, masks=masks,
                           colors=[GROUP_COLORS[g] for g in groups], marked=marked)


def novel_class_names(config_file: str | os.PathLike, overrides: Sequence[str] = ()) -> frozenset[str]:
    """Names of the classes that the datasets of a config (DATASETS.TRAIN and TEST) call novel; empty where
    their files are absent (the page then shows every training class as base)."""
    cfg = load_config(config_file, overrides)
    novel: set[str] = set()
    for name in [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]:
        try:
            spec = get_dataset(name)
        except (KeyError, FileNotFoundError):
            continue
        if not spec.novel_category_ids:
            continue
        meta = read_json(spec.meta_file, what="split metadata") if spec.meta_file and spec.meta_file.is_file() else {}
        if "novel_names" in meta:
            novel.update(meta["novel_names"])
            continue
        categories = meta.get("categories") or read_json(spec.json_file, what="annotation file")["categories"]
        ids = set(spec.novel_category_ids)
        novel.update(c["name"].replace("_", " ") if "frequency" in c else c["name"] for c in categories
                     if c["id"] in ids)
    return frozenset(novel)


def example_images(folder: str | os.PathLike, *, shapes_images: int = 4) -> list[Path]:
    """Example inputs: the first shapes-world val images where the world exists, and scikit-image photos (shipped
    with the package, no download) written as PNG under ``folder``."""
    from skimage import data as skdata

    shapes_val = datasets_root() / "shapes" / "images" / "val"
    found = sorted(shapes_val.glob("*.png"))[:shapes_images] if shapes_val.is_dir() else []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        path = folder / f"{name}.png"
        if not path.is_file():
            Image.fromarray(getattr(skdata, name)()).save(path)
        found.append(path)
    return found


@dataclass
class PageResult:
    """What one request puts on the page: drawn images, table rows, COCO results, and a message."""

    images: list[np.ndarray] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    coco: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""


class WebDemo:
    """The page's requests on one `Detector`: `detect` and `compare`. Thread-safe (one request at a time).

    presets: the vocabularies offered, the training one first, then each of `PRESETS` readable here.
    novel_names: training classes without training boxes (`novel_class_names`), coloured apart from base ones."""

    def __init__(self, detector: Detector, *, novel_names: Collection[str] = ()) -> None:
        self.detector = detector
        self.training = detector.vocabulary
        self.novel_names = frozenset(novel_names) & set(self.training.names)
        self._lock = threading.Lock()
        self.presets: dict[str, Vocabulary] = {"training": self.training}
        for name in PRESETS:
            try:
                self.presets[name] = preset_vocabulary(name)
            except FileNotFoundError:  # lvis without its annotation file: not offered
                continue

    def group(self, name: str) -> str:
        """``"novel"``, ``"base"`` (training classes) or ``"new"`` (any other word)."""
        if name in self.novel_names:
            return "novel"
        return "base" if name in self.training.names else "new"

    def vocabulary(self, text: str) -> Vocabulary:
        """The vocabulary the words of ``text`` name: a preset (with its category ids) when they are exactly its
        names, else names with ids 1..C. Raises `PageError`."""
        names = parse_names(text)
        for vocab in self.presets.values():
            if list(vocab.names) == names:
                return vocab
        return Vocabulary.of(names)

    def _run(self, vocab: Vocabulary, images: Sequence[np.ndarray], threshold: float) -> tuple[list[Detections], str]:
        # caller holds the lock
        start = time.perf_counter()
        if self.detector.vocabulary != vocab:
            self.detector.set_vocabulary(vocab)
        words = time.perf_counter()
        found = self.detector(list(images), score_threshold=threshold)
        done = time.perf_counter()
        return found, (f"vocabulary of {len(vocab)} names set in {(words - start) * 1000:.0f} ms, "
                       f"detection took {(done - words) * 1000:.0f} ms")

    def detect(self, files: Sequence[str | os.PathLike], text: str, threshold: float) -> PageResult:
        """Detect the words of ``text`` in the uploaded ``files``. Unreadable files are skipped with a message."""
        notes: list[str] = []
        if not files:
            return PageResult(message="upload an image or pick an example")
        if len(files) > MAX_IMAGES:
            notes.append(f"{len(files)} files: the first {MAX_IMAGES} are used")
        uploads = []
        for path in files[:MAX_IMAGES]:
            try:
                uploads.append(load_upload(path))
            except PageError as e:
                notes.append(f"skipped {e}")
        for upload in uploads:
            if upload.notice:
                notes.append(upload.notice)
        if not uploads:
            return PageResult(message="; ".join(notes))
        vocab = self.vocabulary(text)
        with self._lock:
            found, timing = self._run(vocab, [u.rgb for u in uploads], threshold)
        result = PageResult()
        for image_id, (upload, dets) in enumerate(zip(uploads, found)):
            groups = [self.group(n) for n in dets.class_names]
            result.images.append(draw_for_page(upload.rgb, dets, groups))
            result.rows.extend([upload.name, n, g, round(float(s), 3), *_rounded(b)]
                               for n, g, s, b in zip(dets.class_names, groups, dets.scores, dets.boxes))
            result.coco.extend(dets.to_coco(image_id))
        count = sum(len(d) for d in found)
        result.message = "; ".join([f"{count} detections in {len(uploads)} image(s); {timing}", *notes])
        return result

    def compare(self, file: str | os.PathLike | None, text_a: str, text_b: str, threshold: float) -> PageResult:
        """Detect the words of ``text_a`` and of ``text_b`` in one image; ``images`` are A and B drawn, each box
        without a counterpart on the other side (`unpaired`) marked; ``coco`` holds A's results then B's."""
        if not file:
            return PageResult(message="upload an image or pick an example")
        upload = load_upload(file)
        vocab_a, vocab_b = self.vocabulary(text_a), self.vocabulary(text_b)
        with self._lock:
            (dets_a,), timing_a = self._run(vocab_a, [upload.rgb], threshold)
            (dets_b,), timing_b = self._run(vocab_b, [upload.rgb], threshold)
        only_a, only_b = unpaired(dets_a.boxes, dets_b.boxes)
        result = PageResult()
        for side, dets, only in (("A", dets_a, only_a), ("B", dets_b, only_b)):
            groups = [self.group(n) for n in dets.class_names]
            result.images.append(draw_for_page(upload.rgb, dets, groups, marked=only))
            result.rows.extend([side, n, g, round(float(s), 3), *_rounded(b),
                                "none at IoU>=0.5" if o else "found"]
                               for n, g, s, b, o in zip(dets.class_names, groups, dets.scores, dets.boxes, only))
            result.coco.extend(dict(d, side=side) for d in dets.to_coco(0))
        result.message = "; ".join(filter(None, [
            f"A: {len(dets_a)} boxes, {int(only_a.sum())} with no B box at IoU>=0.5 (starred); "
            f"B: {len(dets_b)} boxes, {int(only_b.sum())} with no A box; A {timing_a}; B {timing_b}",
            upload.notice]))
        return result


def _rounded(box: np.ndarray) -> list[float]:
    return [round(float(v), 1) for v in box]


def _legend() -> str:
    swatch = '<span style="background:rgb{};padding:0 0.6em;margin:0 0.3em">&nbsp;</span>{}'
    return ("Colours: " + " ".join(swatch.format(GROUP_COLORS[g], text) for g, text in (
        ("base", "base (a training class with boxes)"), ("novel", "novel (a training class never boxed)"),
        ("new", "new (not in the training vocabulary)"))))


def build_app(demo: WebDemo, *, examples: Sequence[Path] = (), threshold: float = 0.5) -> Any:
    """The Gradio page (a ``gr.Blocks``) over ``demo``: tab "Detect" and tab "Compare two vocabularies".

    Launch it with ``launch_kwargs()``."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported
    import gradio as gr

    presets = demo.presets
    training_text = ", ".join(demo.training.names)
    out_dir = Path(tempfile.mkdtemp(prefix="ovd_web_"))

    def safe(fn, n_outputs: int):
        # a message instead of a traceback, and the server stays up for the next request
        def wrapped(*args):
            try:
                return fn(*args)
            except PageError as e:
                return (*[gr.update()] * (n_outputs - 1), f"**{e}**")
            except Exception as e:  # noqa: BLE001 - anything else is logged with its traceback, reported briefly
                logger.exception("request failed")
                return (*[gr.update()] * (n_outputs - 1), f"**error: {type(e).__name__}: {e}**")
        return wrapped

    def on_detect(files, text, thr):
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        res = demo.detect(paths, text, float(thr))
        download = None
        if res.images:
            download = Path(tempfile.mkdtemp(dir=out_dir)) / "detections.json"  # one folder per request
            download.write_text(json.dumps(res.coco))
        return res.images, res.rows, json.dumps(res.coco), str(download) if download else None, res.message

    def on_compare(file, text_a, text_b, thr):
        res = demo.compare(file, text_a, text_b, float(thr))
        if not res.images:
            return None, None, [], res.message
        return res.images[0], res.images[1], res.rows, res.message

    def preset_text(name):
        return ", ".join(presets[name].names)

    with gr.Blocks(title="ovd: open-vocabulary detection", analytics_enabled=False) as app:
        gr.Markdown("## ovd: detect objects named by any words\n" + _legend())
        with gr.Tab("Detect"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="images", file_count="multiple", elem_id="upload")
                    example_gallery = gr.Gallery([str(p) for p in examples], label="examples (click one)",
                                                 columns=4, height=180, allow_preview=False, elem_id="examples")
                    preset = gr.Dropdown(list(presets), value="training", label="preset vocabulary")
                    words = gr.Textbox(training_text, label="vocabulary (comma-separated)", lines=3,
                                       elem_id="vocabulary")
                    score = gr.Slider(0.0, 1.0, value=threshold, step=0.01, label="score threshold")
                    run = gr.Button("Detect", variant="primary", elem_id="detect")
                with gr.Column():
                    status = gr.Markdown(elem_id="status")
                    gallery = gr.Gallery(label="detections", columns=1, format="png", object_fit="contain",
                                         height=600, elem_id="result")
            table = gr.Dataframe(headers=TABLE_HEADERS, label="detections", interactive=False, elem_id="table")
            with gr.Row():
                coco = gr.Textbox(label="COCO results (JSON)", lines=6, max_lines=12, elem_id="coco-json")
                download = gr.File(label="download detections.json", elem_id="download")
        with gr.Tab("Compare two vocabularies"):
            gr.Markdown("The same image under vocabulary A and vocabulary B. A box with no box of the other side at "
                        "IoU >= 0.5 (whatever its name) is drawn thick and starred.")
            with gr.Row():
                with gr.Column():
                    cmp_file = gr.File(label="image", file_count="single", elem_id="cmp-upload")
                    words_a = gr.Textbox(training_text, label="vocabulary A", lines=2, elem_id="vocab-a")
                    words_b = gr.Textbox("", label="vocabulary B", lines=2, elem_id="vocab-b")
                    cmp_score = gr.Slider(0.0, 1.0, value=threshold, step=0.01, label="score threshold")
                    cmp_run = gr.Button("Compare", variant="primary", elem_id="compare")
                cmp_status = gr.Markdown(elem_id="cmp-status")
            with gr.Row():
                image_a = gr.Image(label="A", type="numpy", format="png", interactive=False, elem_id="image-a")
                image_b = gr.Image(label="B", type="numpy", format="png", interactive=False, elem_id="image-b")
            cmp_table = gr.Dataframe(headers=COMPARE_HEADERS, label="boxes", interactive=False, elem_id="cmp-table")

        def pick_example(evt):
            path = str(examples[evt.index])
            return [path], path

        # gradio passes the clicked item to a parameter annotated SelectData; this module's postponed annotations
        # are strings it cannot resolve, so the annotation is the class itself
        pick_example.__annotations__["evt"] = gr.SelectData

        example_gallery.select(pick_example, None, [files, cmp_file])
        preset.change(preset_text, preset, words)
        run.click(safe(on_detect, 5), [files, words, score], [gallery, table, coco, download, status])
        cmp_run.click(safe(on_compare, 4), [cmp_file, words_a, words_b, cmp_score],
                      [image_a, image_b, cmp_table, cmp_status])
    app.ovd_out_dir = out_dir
    return app


def launch_kwargs(*, port: int, examples: Sequence[Path] = ()) -> dict[str, Any]:
    """``app.launch`` arguments that keep the server local and offline: no share link, no server-side rendering
    (it would start Node), system fonts (no Google Fonts request), example files allowed to be served."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return {"server_name": "127.0.0.1", "server_port": port, "share": False, "ssr_mode": False, "theme": theme,
            "allowed_paths": sorted({str(Path(p).parent) for p in examples}), "max_file_size": "50mb",
            "show_error": False, "quiet": True}
