"""Region crops → CLIP image embeddings (DESIGN §2 RKD, offline part): select, crop, preprocess, encode."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.ops import nms

from ovd.clip.models import ClipBundle

__all__ = ["RegionPreprocessor", "crop_regions", "encode_regions", "select_regions"]


def select_regions(boxes: np.ndarray, scores: np.ndarray, *, top_k: int, nms_thresh: float) -> np.ndarray:
    """Indices of the regions to distil: class-agnostic NMS at IoU ``nms_thresh``, then the ``top_k`` best by score.

    Args:
        boxes: float [N, 4] xyxy.
        scores: float [N].

    Returns:
        int64 [min(top_k, kept)], by decreasing score.
    """
    if len(boxes) == 0 or top_k <= 0:
        return np.zeros(0, np.int64)
    keep = nms(torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32), nms_thresh)
    return keep[:top_k].numpy()


def crop_regions(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Cut each box out of ``image``: the exact box, no context, widened to whole pixels (floor of the low edges,
    ceil of the high ones), clipped to the image and at least 1 px wide and high.

    Args:
        image: uint8 [H, W, 3].
        boxes: float [K, 4] xyxy in ``image`` pixels.

    Returns:
        K uint8 arrays [h_i, w_i, 3], views into ``image``.
    """
    h, w = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1 = np.clip(np.floor(boxes[:, 0]), 0, w - 1).astype(np.int64)
    y1 = np.clip(np.floor(boxes[:, 1]), 0, h - 1).astype(np.int64)
    x2 = np.clip(np.ceil(boxes[:, 2]), x1 + 1, w).astype(np.int64)
    y2 = np.clip(np.ceil(boxes[:, 3]), y1 + 1, h).astype(np.int64)
    return [image[b:d, a:c] for a, b, c, d in zip(x1.tolist(), y1.tolist(), x2.tolist(), y2.tolist())]


class RegionPreprocessor:
    """The bundle's own eval transform (CLIP's: short side to S bicubic, centre crop S, normalisation), applied to
    crops in two steps with exactly its numbers: :meth:`geometry` (PIL resize + crop → uint8, per crop, in data
    workers) and :meth:`normalize` (batched, where the encoder runs). Moving uint8 between processes is 4× cheaper than
    float, and the batched normalisation does the same float32 operations as ``ToTensor`` + ``Normalize``.

    Holds only the transforms, so it pickles cheaply into workers.
    """

    def __init__(self, bundle: ClipBundle) -> None:
        transforms = list(getattr(bundle.preprocess, "transforms", []))
        split = next((i for i, t in enumerate(transforms) if isinstance(t, T.ToTensor)), None)
        if split is None or len(transforms) != split + 2 or not isinstance(transforms[-1], T.Normalize):
            raise ValueError(
                f"expected the CLIP eval transform to end with ToTensor, Normalize; got {bundle.preprocess}"
            )
        self._geometry = T.Compose(transforms[:split])
        normalize = transforms[-1]
        self._mean = torch.tensor(normalize.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(normalize.std, dtype=torch.float32).view(1, 3, 1, 1)
        size = bundle.model.visual.preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def geometry(self, crops: Sequence[np.ndarray]) -> Tensor:
        """uint8 crops [h_i, w_i, 3] → uint8 Tensor[K, S, S, 3], resized and centre-cropped as CLIP does."""
        out = [np.asarray(self._geometry(Image.fromarray(np.ascontiguousarray(c)))) for c in crops]
        if not out:
            return torch.zeros((0, *self.image_size, 3), dtype=torch.uint8)
        return torch.from_numpy(np.stack(out))

    def normalize(self, crops: Tensor, *, out: Tensor | None = None) -> Tensor:
        """uint8 Tensor[K, S, S, 3] (any device) → float32 Tensor[K, 3, S, S], CLIP-normalised.

        ``out``: float32 Tensor[K, 3, S, S] on the same device to write into (a reused buffer spares the allocation,
        which costs as much as the arithmetic here).
        """
        pixels = crops.permute(0, 3, 1, 2)
        x = pixels.float() if out is None else out.copy_(pixels)
        return x.div_(255).sub_(self._mean.to(x.device)).div_(self._std.to(x.device))

    def __call__(self, crops: Sequence[np.ndarray]) -> Tensor:
        """uint8 crops [h_i, w_i, 3] → float32 Tensor[K, 3, S, S], equal to stacking ``bundle.preprocess`` of each."""
        return self.normalize(self.geometry(crops))


@torch.no_grad()
def encode_regions(bundle: ClipBundle, crops: Tensor) -> Tensor:
    """CLIP image embeddings of preprocessed crops.

    Args:
        crops: float32 Tensor[N, 3, S, S] from :class:`RegionPreprocessor` (any device; moved to the model's).

    Returns:
        float32 Tensor[N, D] on the CPU, rows L2-normalised. fp16 autocast on CUDA.
    """
    if len(crops) == 0:
        return torch.zeros((0, bundle.embed_dim), dtype=torch.float32)
    device = next(bundle.model.parameters()).device
    with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        feats = bundle.model.encode_image(crops.to(device, non_blocking=True))
    return F.normalize(feats.float(), dim=-1).cpu()
