"""The two-stage open-vocabulary detector: backbone → RPN → RoI heads with a text-embedding classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ovd.modeling.backbone import Backbone, fold_norms
from ovd.modeling.mask_head import paste_masks
from ovd.modeling.roi_heads import ROIHeads
from ovd.modeling.rpn import RPN
from ovd.structures import ImageSample, Instances


class ImageModel(nn.Module):
    """What every model of ovd shares: uint8 images in ``input_format`` channel order (see `ImageSample`) are
    normalised and padded into one batch here."""

    def __init__(
        self,
        *,
        pixel_mean: list[float],
        pixel_std: list[float],
        input_format: str = "BGR",
        size_divisibility: int = 0,
    ) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT must be BGR or RGB, got {input_format!r}")
        self.input_format = input_format
        self.size_divisibility = size_divisibility

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, samples: list[ImageSample]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalised images padded (with zeros, bottom/right) into Tensor[B, 3, H, W], and their unpadded sizes."""
        images = [(s.image.to(self.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std for s in samples]
        sizes = [s.image_size for s in samples]
        h = max(i.shape[-2] for i in images)
        w = max(i.shape[-1] for i in images)
        if self.size_divisibility > 1:
            d = self.size_divisibility
            h, w = (h + d - 1) // d * d, (w + d - 1) // d * d
        batch = images[0].new_zeros((len(images), 3, h, w))
        for b, img in zip(batch, images):
            b[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch, sizes


class OVDetector(ImageModel):
    """Faster R-CNN whose classifier is a vocabulary of text embeddings.

    ``forward`` is the training step (it returns the dict of unweighted losses, so DDP can wrap it);
    `predict` runs inference. Normalisation and padding happen in `ImageModel.preprocess`.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        rpn: RPN,
        roi_heads: ROIHeads,
        pixel_mean: list[float],
        pixel_std: list[float],
        input_format: str = "BGR",
        size_divisibility: int = 0,
    ) -> None:
        super().__init__(pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format,
                         size_divisibility=size_divisibility)
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads

    def forward(self, samples: list[ImageSample]) -> dict[str, Tensor]:
        return self.forward_train(samples)

    def forward_train(self, samples: list[ImageSample]) -> dict[str, Tensor]:
        """Unweighted losses of a batch: box-labelled (every ``sample.gt`` set: RPN and RoI losses) or
        image-labelled (every ``sample.image_labels`` set: the PIS loss only); plus RKD where regions are given."""
        if all(s.gt is not None for s in samples):
            box_batch = True
        elif all(s.image_labels is not None for s in samples):
            box_batch = False
        else:
            raise ValueError("a training batch needs ground truth (ImageSample.gt) for every image, or image labels "
                             "with pseudo boxes (ImageSample.image_labels) for every image")
        images, sizes = self.preprocess(samples)
        features = self.backbone(images)
        if box_batch:
            gt = [s.gt.to(self.device) for s in samples]
            proposals, losses = self.rpn(features, sizes, gt)
            losses.update(self.roi_heads.losses(features, proposals, gt))
        else:
            losses = self.roi_heads.pis_losses(features, [s.image_labels.to(self.device) for s in samples])
        if any(s.regions is not None for s in samples):
            if any(s.regions is None for s in samples):
                raise ValueError("distillation regions are given for some images of the batch but not all")
            regions = [s.regions.to(self.device) for s in samples]
            losses.update(self.roi_heads.distillation_losses(features, regions))
        return losses

    @torch.no_grad()
    def predict(self, samples: list[ImageSample]) -> list[Instances]:
        """Detections per image in original-image pixels: ``pred_boxes`` (xyxy), ``scores``, ``pred_classes``."""
        images, sizes = self.preprocess(samples)
        features = self.backbone(images)
        proposals, _ = self.rpn(features, sizes)
        results = self.roi_heads.predict(features, proposals)
        return [rescale(r, s.orig_size) for r, s in zip(results, samples)]

    @torch.no_grad()
    def embed_regions(self, samples: list[ImageSample]) -> Tensor:
        """Student embeddings ``W x`` (Tensor[sum K, D]) of every sample's ``regions.boxes``, in order."""
        images, _ = self.preprocess(samples)
        features = self.backbone(images)
        return self.roi_heads.region_embeds(features, [s.regions.boxes.to(self.device) for s in samples])

    def set_vocabulary(self, text_embeds: Tensor) -> None:
        """Detect the classes whose text embeddings (Tensor[C, D]) are given, from now on."""
        self.roi_heads.box_predictor.cls_score.set_vocabulary(text_embeds)

    def fuse(self) -> OVDetector:
        """Fold for deployment, in place: the classifier (`ovd.modeling.classifier.FusedClassifier`) and every
        frozen norm into its conv (`ovd.modeling.backbone.fold_norms`). The same detections up to float rounding,
        faster; `set_vocabulary` still works, RKD (`embed_regions`, training) no longer does."""
        predictor = self.roi_heads.box_predictor
        predictor.cls_score = predictor.cls_score.fuse()
        fold_norms(self)
        return self


def rescale(results: Instances, out_size: tuple[int, int] | Tensor) -> Instances:
    """Map boxes from the resized image to ``out_size`` (h, w), clip, drop empty boxes, and paste masks at that
    size (detectron2's detector_postprocess). Trace-safe: the ONNX graph takes ``out_size`` as an input and its
    resized size from the image's shape, so both may be tensors here."""
    h, w = results.image_size
    oh, ow = out_size[0], out_size[1]
    # the scale in float64, as Python's ow / w, then float32; stacked from tensors where the tracer follows them
    sizes = torch.stack([v if isinstance(v, Tensor) else torch.tensor(v) for v in (ow, oh, w, h)]).to(torch.float64)
    scale = (sizes[:2] / sizes[2:]).to(results.pred_boxes.dtype)
    boxes = results.pred_boxes * scale.repeat(2)
    boxes = torch.minimum(boxes.clamp(min=0), sizes[:2].to(boxes.dtype).repeat(2))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    fields = {k: v[keep] for k, v in results.fields().items()}
    fields["pred_boxes"] = boxes[keep]
    probs = fields.pop("pred_mask_probs", None)
    if probs is not None:
        fields["pred_masks"] = paste_masks(probs, fields["pred_boxes"], out_size)
    return Instances(out_size, **fields)
