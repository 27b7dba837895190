"""`Detector`: a trained detector with a vocabulary you choose, on images from files, arrays or PIL (DESIGN §1 job 3).

    det = ovd.Detector.from_config("configs/shapes/base.yaml", "output/shapes/base/model_final.pth")
    det.set_vocabulary(["red circle", "blue star"])
    for d in det(["a.png", "b.png"]):
        print(d.class_names, d.scores)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovd.clip.models import LOCAL_DIR_PREFIX
from ovd.clip.text import TextEmbeddings, load_text_embeddings
from ovd.config import load_config
from ovd.data import test_transform
from ovd.engine.checkpoint import CheckpointError, load_model_state, read_checkpoint
from ovd.evaluation import coco_results
from ovd.inference.visualize import ImageInput, as_rgb_array, draw_detections
from ovd.inference.vocabulary import PRESETS, TextEncoder, Vocabulary, preset_vocabulary, resolve_templates
from ovd.modeling.build import build_model
from ovd.modeling.detector import OVDetector
from ovd.structures import ImageSample, Instances
from ovd.utils.io import read_json

__all__ = ["Detections", "Detector", "resize_for_model"]

logger = logging.getLogger(__name__)
TEXT_EMBEDS_KEY = "roi_heads.box_predictor.cls_score.text_embeds"


@dataclass
class Detections:
    """The detections in one image, in its original pixels, best first.

    boxes: float32 [N, 4] xyxy; scores: float32 [N]; class_ids: int64 [N], indices into the vocabulary;
    class_names: N names; category_ids: int64 [N], the vocabulary's COCO category ids; image_size: (H, W);
    masks: bool [N, H, W] where the model predicts masks, else None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: list[str]
    category_ids: np.ndarray
    image_size: tuple[int, int]
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, keep: np.ndarray | slice) -> Detections:
        """The detections selected by a boolean mask, an index array or a slice."""
        names = np.array(self.class_names, dtype=object)[keep].tolist()
        return Detections(self.boxes[keep], self.scores[keep], self.class_ids[keep], names, self.category_ids[keep],
                          self.image_size, None if self.masks is None else self.masks[keep])

    def to_coco(self, image_id: int = 0) -> list[dict[str, Any]]:
        """COCO results dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``, RLE ``segmentation`` with
        masks), plus ``category_name`` for readers without the category list; pycocotools' ``loadRes`` takes them."""
        return coco_results(image_id, self.boxes, self.scores, self.category_ids, masks=self.masks,
                            category_names=self.class_names, score_decimals=5)

    def draw(self, image: ImageInput, *, input_format: str = "RGB") -> np.ndarray:
        """``image`` (the one these detections came from) with them drawn on: uint8 RGB [H, W, 3]."""
        rgb = as_rgb_array(image, input_format)
        if rgb.shape[:2] != self.image_size:
            raise ValueError(f"the image is {rgb.shape[0]}x{rgb.shape[1]}, the detections belong to a "
                             f"{self.image_size[0]}x{self.image_size[1]} image")
        labels = [f"{n} {s:.2f}" for n, s in zip(self.class_names, self.scores)]
        return draw_detections(rgb, self.boxes, labels, self.class_ids, masks=self.masks)


class Detector:
    """An `OVDetector` in eval mode with a vocabulary of class names and the test-time resize of its config.

    Build one with `from_config`. ``text_encoder`` embeds new vocabularies (`set_vocabulary`); ``vocabulary``
    names the classes the model currently scores.
    """

    def __init__(
        self,
        model: OVDetector,
        *,
        vocabulary: Vocabulary,
        text_encoder: TextEncoder,
        min_size: int,
        max_size: int,
        batch_size: int = 1,
    ) -> None:
        num_classes = model.roi_heads.num_classes
        if len(vocabulary) != num_classes:
            raise ValueError(f"the vocabulary has {len(vocabulary)} names, the model scores {num_classes} classes")
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.min_size, self.max_size, self.batch_size = min_size, max_size, batch_size
        self._vocabulary = vocabulary

    @classmethod
    def from_config(
        cls,
        config_file: str | os.PathLike,
        weights: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        overrides: Sequence[str] = (),
        text_encoder: str | None = None,
        text_encoder_weights: str | None = None,
    ) -> Detector:
        """The detector of ``config_file`` (+ ``overrides``, `KEY VALUE` pairs) with ``weights`` (default
        MODEL.WEIGHTS) on ``device`` (default MODEL.DEVICE; "auto" picks CUDA where available).

        The vocabulary starts as the training one (names from the sidecar of MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH,
        embeddings from the checkpoint), or MODEL.TEST_ZEROSHOT_WEIGHT_PATH where set. New names are embedded by the
        CLIP text model named in that sidecar, or by ``text_encoder`` (an open_clip name with
        ``text_encoder_weights``, a tag such as "openai" or a file; or ``local-dir:<folder>``).

        Raises:
            ValueError: no weights, or a text encoder without weights. FileNotFoundError: a missing file.
            CheckpointError: an unreadable checkpoint, or one for another architecture (the mismatched keys listed).
        """
        cfg = load_config(config_file, overrides)
        weights = str(weights or cfg.MODEL.WEIGHTS)
        if not weights:
            raise ValueError("no detector weights: pass weights= (a checkpoint) or set MODEL.WEIGHTS")
        if text_encoder is not None and text_encoder_weights is None and not text_encoder.startswith(LOCAL_DIR_PREFIX):
            # a randomly initialised text tower gives embeddings that look valid; never fall into one by omission
            raise ValueError(f"text_encoder={text_encoder!r} needs text_encoder_weights= (an open_clip tag such as "
                             f"'openai', or a checkpoint file); only local-dir: models carry their weights")
        device = _resolve_device(str(device or cfg.MODEL.DEVICE))
        state = read_checkpoint(weights)["model"]
        text_embeds = state.get(TEXT_EMBEDS_KEY)
        try:
            model = build_model(cfg, text_embeds=text_embeds)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {weights} does not fit the config {config_file}: {e}") from None
        load_model_state(model, state, source=weights)
        train_path = cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH
        known = _training_vocabulary(model.roi_heads.box_predictor.cls_score.text_embeds, train_path)
        encoder = TextEncoder.for_embeddings(known, source=train_path or "the training vocabulary",
                                             model_name=text_encoder, pretrained=text_encoder_weights, device=device)
        names = known.names or [f"class {i}" for i in range(len(known.embeds))]
        detector = cls(model.to(device), vocabulary=Vocabulary.of(names), text_encoder=encoder,
                       min_size=cfg.INPUT.MIN_SIZE_TEST, max_size=cfg.INPUT.MAX_SIZE_TEST)
        if cfg.MODEL.TEST_ZEROSHOT_WEIGHT_PATH:
            detector.set_vocabulary(cfg.MODEL.TEST_ZEROSHOT_WEIGHT_PATH)
        return detector

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    @property
    def device(self) -> torch.device:
        return self.model.device

    def set_vocabulary(
        self,
        vocabulary: Sequence[str] | Vocabulary | str | os.PathLike,
        *,
        templates: Sequence[str] | str | os.PathLike | None = None,
    ) -> None:
        """Detect these classes from now on: a list of names, a `Vocabulary`, a preset ("coco", "lvis", "shapes"),
        or a ready embeddings file (``.npy`` [C, D], names from its sidecar).

        ``templates``: prompt templates with ``{}`` (a list, whose embeddings are averaged, or a file with one per
        line); default: those of the training vocabulary. Embeddings are cached on disk (`TextEncoder`).
        """
        if isinstance(vocabulary, (str, os.PathLike)):
            spec = str(vocabulary)
            if spec.endswith(".npy"):
                if templates is not None:
                    raise ValueError("templates apply to class names, not to a ready embeddings file")
                loaded = load_text_embeddings(spec)
                dim = self.model.roi_heads.box_predictor.cls_score.text_embeds.shape[1]
                if loaded.embeds.shape[1] != dim:
                    raise ValueError(f"text embeddings file {spec} holds {loaded.embeds.shape[1]}-d embeddings; this "
                                     f"detector scores {dim}-d ones (embed with its CLIP text model)")
                vocab = Vocabulary.of(loaded.names or [f"class {i}" for i in range(len(loaded.embeds))])
                self._apply(vocab, torch.from_numpy(loaded.embeds))
                return
            if spec not in PRESETS:
                raise ValueError(f"a vocabulary given as a string must be a preset ({', '.join(PRESETS)}) or a .npy "
                                 f"embeddings file, got {spec!r}; pass class names as a list, e.g. [{spec!r}]")
            vocab = preset_vocabulary(spec)
        elif isinstance(vocabulary, Vocabulary):
            vocab = vocabulary
        else:
            vocab = Vocabulary.of(list(vocabulary))
        self._apply(vocab, self.text_encoder.encode(vocab.names, resolve_templates(templates)))

    def _apply(self, vocab: Vocabulary, embeds: torch.Tensor) -> None:
        self.model.set_vocabulary(embeds.to(self.device))
        self._vocabulary = vocab

    def fuse(self) -> Detector:
        """Fold the classifier and the frozen norms for deployment (`OVDetector.fuse`): the same detections up to
        float rounding, in place; returns self."""
        self.model.fuse()
        return self

    def to_sample(self, image: ImageInput, *, input_format: str = "RGB") -> ImageSample:
        """The model input for ``image``: resized as the test-time `DatasetMapper` does, in the model's channel
        order."""
        rgb = as_rgb_array(image, input_format)
        chw = resize_for_model(rgb, min_size=self.min_size, max_size=self.max_size,
                               model_format=self.model.input_format)
        return ImageSample(image=torch.from_numpy(chw), image_id=0, orig_size=rgb.shape[:2])

    @torch.no_grad()
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        input_format: str = "RGB",
        score_threshold: float | None = None,
    ) -> Detections | list[Detections]:
        """Detect in one image (→ `Detections`) or a list of them (→ a list), ``batch_size`` images per forward.

        images: file paths, PIL images, or uint8 arrays [H, W, 3] in ``input_format`` order ("RGB", or "BGR" for
        OpenCV arrays). score_threshold: drop detections scoring below it (on top of the model's own threshold).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), self.batch_size):
            samples = [self.to_sample(im, input_format=input_format) for im in items[start : start + self.batch_size]]
            results.extend(self._detections(r, score_threshold) for r in self.model.predict(samples))
        return results[0] if single else results

    def _detections(self, result: Instances, score_threshold: float | None) -> Detections:
        result = result.to("cpu")
        if score_threshold is not None:
            result = result[result.scores >= score_threshold]
        class_ids = result.pred_classes.numpy().astype(np.int64)
        vocab = self._vocabulary
        return Detections(
            boxes=result.pred_boxes.numpy().astype(np.float32),
            scores=result.scores.numpy().astype(np.float32),
            class_ids=class_ids,
            class_names=[vocab.names[i] for i in class_ids.tolist()],
            category_ids=np.asarray(vocab.category_ids, dtype=np.int64)[class_ids],
            image_size=result.image_size,
            masks=result.pred_masks.numpy() if result.has("pred_masks") else None,
        )


def resize_for_model(image: np.ndarray, *, min_size: int, max_size: int, model_format: str) -> np.ndarray:
    """uint8 [3, h, w] in ``model_format`` channel order from uint8 RGB [H, W, 3]: the test-time resize of
    `DatasetMapper` (shortest edge to ``min_size``, long edge at most ``max_size``, PIL bilinear)."""
    h, w = image.shape[:2]
    resized = test_transform(h, w, min_size=min_size, max_size=max_size).apply_image(image)
    if model_format == "BGR":
        resized = resized[:, :, ::-1]
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def _training_vocabulary(text_embeds: torch.Tensor, path: str) -> TextEmbeddings:
    """The model's training vocabulary: its embeddings (Tensor[C, D]) with names and text model from the sidecar of
    ``path`` (MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH) where it exists and fits."""
    embeds = F.normalize(text_embeds.detach().float().cpu(), dim=1).numpy()
    sidecar = Path(path).with_suffix(".json") if path else None
    meta = read_json(sidecar, what="text embeddings sidecar") if sidecar is not None and sidecar.is_file() else {}
    names = meta.get("names")
    if names is not None and len(names) != len(embeds):
        logger.warning("%s lists %d names but the checkpoint has %d classes; names not used",
                       sidecar, len(names), len(embeds))
        names = None
    return TextEmbeddings(embeds=embeds, names=names, meta=meta)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} requested but CUDA is not available; use device='cpu' (MODEL.DEVICE cpu)")
    return torch.device(name)
