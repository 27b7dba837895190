"""ONNX export of a detector for one fixed image size, with its vocabulary folded in (`OVDetector.fuse`).

What the graph covers: input ``image``, uint8 [3, h, w], the image already resized by the test-time resize
(`resize_for_model`) and in the model's channel order; then normalisation and padding, backbone, RPN (anchors,
pre-NMS top-k, box decoding, clipping, per-level NMS, post-NMS top-k), multi-level RoIAlign, box head, fused
classifier and box regression, and detectron2's post-processing (score threshold, top-k candidates, per-class NMS,
detection cap), then boxes scaled back to the original (H, W) fixed at export. Outputs ``boxes`` float32 [K, 4]
xyxy in original pixels, ``scores`` float32 [K], ``classes`` int64 [K] (indices into the baked vocabulary). Not in
the graph: reading and resizing the image (`OnnxDetector` does both) and masks (a mask head is left out).

The TorchScript tracer records one run, so every data-dependent Python branch would be frozen at its trace-time
value. `ExportableDetector` therefore reuses the model's modules but replaces the three steps that branch on data:
the multi-level RoI pooling (skips empty levels; here every level pools every box and the box's own level is
selected, 4x the RoIAlign work on FPN), the detection top-k (only when there are more candidates than k) and
torchvision's batched NMS (returns early when there is no box). One branch stays frozen: the RPN drops proposals
with non-finite coordinates only when there are some, so the graph never drops them (only a diverged model makes
them).
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
from torchvision.models.detection._utils import _topk_min
from torchvision.ops import clip_boxes_to_image, nms

from ovd.data.mapper import shortest_edge_size
from ovd.inference.detector_api import Detections, Detector, resize_for_model
from ovd.inference.visualize import ImageInput, as_rgb_array
from ovd.modeling.detector import OVDetector, rescale
from ovd.modeling.poolers import ROIPooler
from ovd.structures import Instances

__all__ = ["ExportableDetector", "OnnxDetector", "export_onnx", "pool_every_level"]

logger = logging.getLogger(__name__)

METADATA_KEY = "ovd"
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "classes")


class ExportableDetector(nn.Module):
    """`OVDetector.predict` on one image of a fixed size, free of data-dependent Python control flow.

    image_size: (H, W) of the original images; the input is their resize to ``input_size`` (h, w).
    """

    def __init__(self, model: OVDetector, *, image_size: tuple[int, int], min_size: int, max_size: int) -> None:
        super().__init__()
        self.model = model
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.input_size = shortest_edge_size(*self.image_size, min_size, max_size)
        h, w = self.input_size
        d = max(model.size_divisibility, 1)
        self.padding = (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """image: uint8 Tensor[3, h, w] → boxes Tensor[K, 4] (original pixels), scores Tensor[K], classes
        Tensor[K]."""
        m, heads = self.model, self.model.roi_heads
        # OVDetector.preprocess for one image; its copy into a preallocated batch is invisible to the tracer
        x = F.pad((image.float() - m.pixel_mean) / m.pixel_std, self.padding)[None]
        features = m.backbone(x)
        proposals, _ = m.rpn(features, [self.input_size])
        boxes = proposals[0].proposal_boxes
        pooled = pool_every_level(heads.pooler, [features[f] for f in heads.in_features], boxes)
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        scores = torch.sigmoid(logits) if heads.use_sigmoid_ce else torch.softmax(logits, dim=1)
        detections = self.postprocess(heads.box_coder.decode_single(deltas, boxes), scores)
        out = rescale(detections, self.image_size)
        return out.pred_boxes, out.scores, out.pred_classes

    def postprocess(self, boxes: Tensor, scores: Tensor) -> Instances:
        """`ROIHeads.postprocess` (boxes Tensor[N, 4], scores Tensor[N, C + 1]) as one graph: the top-k of all
        (proposal, class) scores, then the threshold, selects the same candidates as the threshold then the top-k."""
        heads = self.model.roi_heads
        # a row's sum is finite exactly when all its scores (in [0, 1]) are: one reduction instead of C + 1 checks
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores.sum(dim=1))
        boxes, scores = clip_boxes_to_image(boxes[valid], self.input_size), scores[valid, :-1]
        num_classes = scores.shape[1]
        flat = scores.flatten()
        if heads.topk_candidates:
            cand_scores, idx = flat.topk(_topk_min(flat, heads.topk_candidates, 0))
            keep = cand_scores > heads.score_thresh
            cand_scores, idx = cand_scores[keep], idx[keep]
        else:
            idx = torch.nonzero(flat > heads.score_thresh)[:, 0]
            cand_scores = flat[idx]
        cand_boxes, classes = boxes[idx // num_classes], idx % num_classes
        # torchvision's batched_nms (its coordinate trick, which it also runs eagerly for up to 1000 candidates on
        # CPU) without its early return on no boxes; boxes are clipped to >= 0, so the appended 0 changes no maximum
        max_coordinate = torch.cat([cand_boxes.flatten(), cand_boxes.new_zeros(1)]).max()
        offsets = classes.to(cand_boxes.dtype) * (max_coordinate + 1)
        keep = nms(cand_boxes + offsets[:, None], cand_scores, heads.nms_thresh)[: heads.detections_per_image]
        return Instances(self.input_size, pred_boxes=cand_boxes[keep], scores=cand_scores[keep],
                         pred_classes=classes[keep])


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
    detector: Detector, path: str | os.PathLike, *, image_size: tuple[int, int], opset: int = 17
) -> Path:
    """Write ``detector`` (fused, on CPU, its current vocabulary) as an ONNX graph for original images of
    ``image_size`` (H, W); see the module docstring for what the graph covers. The vocabulary, channel order and
    sizes are stored in the model's metadata (key ``"ovd"``) for `OnnxDetector`. ``detector`` is left unchanged.

    opset ≥ 16: RoIAlign's ``aligned`` mode (half-pixel coordinates) needs it.
    """
    if opset < 16:
        raise ValueError(f"opset {opset} is too old: aligned RoIAlign needs opset 16 or later")
    model = copy.deepcopy(detector.model).cpu().eval().fuse()
    if model.roi_heads.mask_head is not None:
        logger.warning("the ONNX graph gives boxes only: the mask head is not exported")
    module = ExportableDetector(model, image_size=image_size, min_size=detector.min_size, max_size=detector.max_size)
    example = torch.zeros((3, *module.input_size), dtype=torch.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES))
    import onnx  # the export extra; only needed here

    graph = onnx.load(str(path))
    vocab = detector.vocabulary
    meta = {
        "class_names": list(vocab.names),
        "category_ids": list(vocab.category_ids),
        "input_format": model.input_format,
        "image_size": list(module.image_size),
        "input_size": list(module.input_size),
        "min_size": detector.min_size,
        "max_size": detector.max_size,
    }
    graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    onnx.save(graph, str(path))
    return path


class OnnxDetector:
    """An exported detector run by onnxruntime: ``OnnxDetector(path)(image)`` → `Detections`, as `Detector`."""

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime  # the export extra; only needed here

        self.session = onnxruntime.InferenceSession(str(path), providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise ValueError(f"{path} was not written by ovd's export_onnx (no {METADATA_KEY!r} metadata)")
        self.meta = json.loads(meta)
        self.image_size = tuple(self.meta["image_size"])

    def __call__(self, image: ImageInput, *, input_format: str = "RGB") -> Detections:
        """Detections in ``image`` (path, PIL or uint8 array in ``input_format``) of the exported size."""
        rgb = as_rgb_array(image, input_format)
        if rgb.shape[:2] != self.image_size:
            raise ValueError(f"this ONNX model was exported for {self.image_size[0]}x{self.image_size[1]} images, "
                             f"got {rgb.shape[0]}x{rgb.shape[1]}; export again with that size")
        chw = resize_for_model(rgb, min_size=self.meta["min_size"], max_size=self.meta["max_size"],
                               model_format=self.meta["input_format"])
        boxes, scores, classes = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: chw})
        names = self.meta["class_names"]
        return Detections(
            boxes=boxes.astype(np.float32),
            scores=scores.astype(np.float32),
            class_ids=classes.astype(np.int64),
            class_names=[names[i] for i in classes.tolist()],
            category_ids=np.asarray(self.meta["category_ids"], dtype=np.int64)[classes],
            image_size=self.image_size,
        )
