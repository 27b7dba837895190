"""ONNX export of a detector: any image size, and the vocabulary either folded in or an input of the graph.

What the graph covers: inputs ``image``, uint8 [3, h, w], the image already resized by the test-time resize
(`resize_for_model`, so any h, w up to the config's max size) and in the model's channel order; ``orig_size``,
int64 [2], the (H, W) of the original image; and with ``vocabulary_input``, ``text_embeds``, float32 [C, D], the
vocabulary's text embeddings (any C; normalised in the graph). Then normalisation and padding, backbone, RPN
(anchors, pre-NMS top-k, box decoding, clipping, per-level NMS, post-NMS top-k), multi-level RoIAlign, box head,
fused classifier and box regression, and the model's own post-processing (`ROIHeads.detections`: score threshold,
top-k candidates, per-class NMS on dense class ranks, detection cap), then boxes scaled back to ``orig_size``
(`rescale`). Outputs ``boxes`` float32 [K, 4] xyxy in original pixels, ``scores`` float32 [K], ``classes`` int64
[K] (indices into the vocabulary). Not in the graph: reading and resizing the image (`OnnxDetector` does both)
and masks (a mask head is left out).

The exporter is the TorchScript tracer with dynamic axes. torch's current exporter was tried first (torch 2.14,
torchvision 0.29): ``torch.onnx.export(..., dynamo=True)`` needs onnxscript, which this environment lacks, and
``torch.export.export(strict=False)`` with dynamic h, w, C stops at data-dependent guards: first the RPN's
``if not valid.all()`` (now gone: inference always selects the finite proposals), then torchvision's
``batched_nms``, which branches on ``boxes.numel() > 4000`` where the count comes out of a boolean selection (an
unbacked size); every NMS and threshold in the pipeline is such a selection. The tracer records one run instead, so
the modelling code it runs has no Python branch on data (shapes read from tensors stay dynamic: the tracer follows
them). `ExportableDetector` replaces one step only: the multi-level RoI pooling, which skips empty levels eagerly;
here every level pools every box and the box's own level is selected (4x the RoIAlign work on FPN).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovd.inference.detector_api import Detections, Detector, resize_for_model
from ovd.inference.visualize import ImageInput, as_rgb_array
from ovd.inference.vocabulary import Vocabulary
from ovd.modeling.detector import OVDetector, rescale
from ovd.modeling.poolers import ROIPooler

__all__ = ["ExportableDetector", "OnnxDetector", "export_onnx", "pool_every_level"]

logger = logging.getLogger(__name__)

METADATA_KEY = "ovd"
INPUT_NAMES = ("image", "orig_size", "text_embeds")
OUTPUT_NAMES = ("boxes", "scores", "classes")


class ExportableDetector(nn.Module):
    """`OVDetector.predict` on one image, free of data-dependent Python control flow, for the ONNX tracer.

    forward(image uint8 Tensor[3, h, w], orig_size int64 Tensor[2][, text_embeds Tensor[C, D]]) → boxes Tensor[K, 4]
    (original pixels), scores Tensor[K], classes Tensor[K]. ``model`` must be fused for ``text_embeds``.
    """

    def __init__(self, model: OVDetector) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image: Tensor, orig_size: Tensor, text_embeds: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        m, heads = self.model, self.model.roi_heads
        # under the tracer the sizes are 0-d tensors it follows, so padding, anchors and clipping follow the input
        h, w = image.shape[-2], image.shape[-1]
        d = max(m.size_divisibility, 1)
        # OVDetector.preprocess for one image; its copy into a preallocated batch is invisible to the tracer
        padding = (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h)
        x = F.pad((image.float() - m.pixel_mean) / m.pixel_std, padding)
        features = m.backbone(x[None])
        proposals, _ = m.rpn(features, [(h, w)])
        boxes = proposals[0].proposal_boxes
        pooled = pool_every_level(heads.pooler, [features[f] for f in heads.in_features], boxes)
        logits, deltas = heads.box_predictor(heads.box_head(pooled), text_embeds)
        out = rescale(heads.detections(logits, deltas, boxes, (h, w)), orig_size)
        return out.pred_boxes, out.scores, out.pred_classes


def pool_every_level(pooler: ROIPooler, features: list[Tensor], boxes: Tensor) -> Tensor:
    """`ROIPooler` for one image's boxes (Tensor[N, 4]) → Tensor[N, C, S, S], with every level pooled for every box
    and the box's own level selected, so no branch depends on which levels are empty."""
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
    if len(features) == 1:
        return pooler._align(features[0], rois, pooler.scales[0])
    # ROIPooler's level assignment (detectron2's assign_boxes_to_levels)
    sizes = (rois[:, 3] - rois[:, 1]).mul(rois[:, 4] - rois[:, 2]).sqrt()
    levels = torch.floor(pooler.canonical_level + torch.log2(sizes / pooler.canonical_box_size + 1e-8))
    levels = levels.clamp(pooler.min_level, pooler.max_level).to(torch.int64) - pooler.min_level
    out = pooler._align(features[0], rois, pooler.scales[0])
    for lvl in range(1, len(features)):
        pooled = pooler._align(features[lvl], rois, pooler.scales[lvl])
        out = torch.where((levels == lvl)[:, None, None, None], pooled, out)
    return out


def export_onnx(
    detector: Detector,
    path: str | os.PathLike,
    *,
    vocabulary_input: bool = False,
    opset: int = 17,
) -> Path:
    """Write ``detector`` (fused, on CPU) as an ONNX graph for images of any size up to its max size; see the
    module docstring for what the graph covers. ``vocabulary_input``: the text embeddings are an input (any
    vocabulary, no re-export); else the current vocabulary is folded in. The vocabulary (when folded), channel order
    and sizes are stored in the model's metadata (key ``"ovd"``) for `OnnxDetector`. ``detector`` is left unchanged.

    opset ≥ 16: RoIAlign's ``aligned`` mode (half-pixel coordinates) needs it.
    """
    if opset < 16:
        raise ValueError(f"opset {opset} is too old: aligned RoIAlign needs opset 16 or later")
    model = copy.deepcopy(detector.model).cpu().eval().fuse()
    if model.roi_heads.mask_head is not None:
        logger.warning("the ONNX graph gives boxes only: the mask head is not exported")
    module = ExportableDetector(model)
    # traced on one square example of the test size; the sizes stay dynamic. Random pixels: a blank image gives a
    # random model no proposals, and the tracer needs every step to run
    h = w = detector.min_size
    example = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
               torch.tensor([h, w], dtype=torch.int64)]
    dynamic = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in OUTPUT_NAMES}}
    if vocabulary_input:
        example.append(model.roi_heads.box_predictor.cls_score.text_embeds.clone())
        dynamic["text_embeds"] = {0: "classes"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, tuple(example), str(path), dynamo=False, opset_version=opset,
                          input_names=list(INPUT_NAMES[: len(example)]), output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic)
    import onnx  # the export extra; only needed here

    graph = onnx.load(str(path))
    vocab = detector.vocabulary
    meta = {
        "vocabulary_input": vocabulary_input,
        "class_names": None if vocabulary_input else list(vocab.names),
        "category_ids": None if vocabulary_input else list(vocab.category_ids),
        "embed_dim": int(model.roi_heads.box_predictor.cls_score.logit_weight.shape[1]),
        "input_format": model.input_format,
        "min_size": detector.min_size,
        "max_size": detector.max_size,
    }
    graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    onnx.save(graph, str(path))
    return path


class OnnxDetector:
    """An exported detector run by onnxruntime: ``OnnxDetector(path)(image)`` → `Detections`, as `Detector`.

    A graph with its vocabulary as an input needs `set_vocabulary` (names and their text embeddings) first.
    """

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime  # the export extra; only needed here

        self.session = onnxruntime.InferenceSession(str(path), providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise ValueError(f"{path} was not written by ovd's export_onnx (no {METADATA_KEY!r} metadata)")
        self.meta = json.loads(meta)
        self.vocabulary: Vocabulary | None = None
        self.text_embeds: np.ndarray | None = None
        if not self.meta["vocabulary_input"]:
            self.vocabulary = Vocabulary(tuple(self.meta["class_names"]), tuple(self.meta["category_ids"]))

    def set_vocabulary(self, vocabulary: Vocabulary | Sequence[str], text_embeds: np.ndarray) -> None:
        """Detect these classes from now on: their names and text embeddings ([C, D], from the detector's CLIP text
        model, e.g. `Detector.text_encoder` or tools/dump_text_embeddings.py). Needs a ``--vocabulary-input`` graph."""
        if not self.meta["vocabulary_input"]:
            raise ValueError("this ONNX graph has its vocabulary folded in; export with vocabulary_input=True "
                             "(--vocabulary-input) to change it")
        vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary.of(list(vocabulary))
        embeds = np.ascontiguousarray(text_embeds, dtype=np.float32)
        if embeds.shape != (len(vocab), self.meta["embed_dim"]):
            raise ValueError(f"text embeddings must be [{len(vocab)}, {self.meta['embed_dim']}] for {len(vocab)} "
                             f"names, got {list(embeds.shape)}")
        self.vocabulary, self.text_embeds = vocab, embeds

    def __call__(self, image: ImageInput, *, input_format: str = "RGB") -> Detections:
        """Detections in ``image`` (path, PIL or uint8 array in ``input_format``)."""
        if self.vocabulary is None:
            raise ValueError("this ONNX graph takes the vocabulary as an input: call set_vocabulary(names, "
                             "text_embeds) first")
        rgb = as_rgb_array(image, input_format)
        chw = resize_for_model(rgb, min_size=self.meta["min_size"], max_size=self.meta["max_size"],
                               model_format=self.meta["input_format"])
        feeds = {"image": chw, "orig_size": np.asarray(rgb.shape[:2], dtype=np.int64)}
        if self.text_embeds is not None:
            feeds["text_embeds"] = self.text_embeds
        boxes, scores, classes = self.session.run(list(OUTPUT_NAMES), feeds)
        names = self.vocabulary.names
        return Detections(
            boxes=boxes.astype(np.float32),
            scores=scores.astype(np.float32),
            class_ids=classes.astype(np.int64),
            class_names=[names[i] for i in classes.tolist()],
            category_ids=np.asarray(self.vocabulary.category_ids, dtype=np.int64)[classes],
            image_size=rgb.shape[:2],
        )
