"""Region crops → CLIP image embeddings (DESIGN §2 RKD, offline part): select, crop, preprocess, encode."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transform import MaybeConvertMode
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.ops import nms
from torchvision.transforms.functional import pil_modes_mapping

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
    float.

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
        self._resize_crop = _plain_resize_crop(transforms[:split])
        normalize = transforms[-1]
        self._mean = torch.tensor(normalize.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(normalize.std, dtype=torch.float32).view(1, 3, 1, 1)
        # ToTensor + Normalize of each possible byte, by the same float32 operations: a table lookup gives the same
        # numbers without torch's thread pool, whose syncs cost more than this memory-bound work on a busy CPU.
        levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256)
        self._table = self._arithmetic(levels).view(3, 256).numpy()
        size = bundle.model.visual.preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def geometry(self, crops: Sequence[np.ndarray]) -> Tensor:
        """uint8 crops [h_i, w_i, 3] → uint8 Tensor[K, S, S, 3], resized and centre-cropped as CLIP does."""
        if self._resize_crop is not None:
            size, resample = self._resize_crop
            out = [_resize_centre_crop(c, size, resample) for c in crops]
        else:
            out = [np.asarray(self._geometry(Image.fromarray(np.ascontiguousarray(c)))) for c in crops]
        if not out:
            return torch.zeros((0, *self.image_size, 3), dtype=torch.uint8)
        return torch.from_numpy(np.stack(out))

    def normalize(self, crops: Tensor, *, out: Tensor | None = None) -> Tensor:
        """uint8 Tensor[K, S, S, 3] (any device) → float32 Tensor[K, 3, S, S], CLIP-normalised.

        ``out``: float32 Tensor[K, 3, S, S] on the same device to write into (a reused buffer spares the allocation,
        which costs as much as the arithmetic here).
        """
        if out is None:
            out = torch.empty((len(crops), 3, *crops.shape[1:3]), dtype=torch.float32, device=crops.device)
        if crops.device.type != "cpu":
            return out.copy_(self._arithmetic(crops.permute(0, 3, 1, 2)))
        pixels, values = crops.numpy(), out.numpy()
        for c in range(3):
            # mode="clip" skips numpy's bounds-check buffering; a byte is always a valid index.
            np.take(self._table[c], pixels[..., c], out=values[:, c], mode="clip")
        return out

    def __call__(self, crops: Sequence[np.ndarray]) -> Tensor:
        """uint8 crops [h_i, w_i, 3] → float32 Tensor[K, 3, S, S], equal to stacking ``bundle.preprocess`` of each."""
        return self.normalize(self.geometry(crops))

    def _arithmetic(self, pixels: Tensor) -> Tensor:
        """ToTensor's and Normalize's float32 operations, in their order, on uint8 [..., 3, h, w]."""
        x = pixels.float().div_(255)
        return x.sub_(self._mean.to(x.device)).div_(self._std.to(x.device))


def _plain_resize_crop(transforms: list) -> tuple[int, int] | None:
    """``(S, PIL resample)`` when ``transforms`` are torchvision's ``Resize(S)`` and ``CenterCrop(S)`` (and open_clip's
    RGB conversion), as every CLIP's eval transform is; None otherwise. Their per-call bookkeeping costs as much as the
    resize itself on small crops, so :func:`_resize_centre_crop` does the same in direct PIL calls."""
    kinds = [type(t) for t in transforms]
    if kinds != [T.Resize, T.CenterCrop, MaybeConvertMode] or transforms[2].mode != "RGB":
        return None
    resize, crop = transforms[0], transforms[1]
    size = resize.size if isinstance(resize.size, int) else resize.size[0] if len(resize.size) == 1 else None
    if size is None or resize.max_size is not None or list(crop.size) != [size, size]:
        return None
    return size, pil_modes_mapping[resize.interpolation]


def _resize_centre_crop(crop: np.ndarray, size: int, resample: int) -> np.ndarray:
    """``CenterCrop(size)(Resize(size)(Image.fromarray(crop)))`` as uint8 [size, size, 3], pixel for pixel: the same
    output-size and offset rules as torchvision, the same PIL resize."""
    h, w = crop.shape[:2]
    # torchvision: short side to `size`, long side truncated; no resize when the size is already right.
    new_h, new_w = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    image = Image.fromarray(np.ascontiguousarray(crop))
    if (new_h, new_w) != (h, w):
        image = image.resize((new_w, new_h), resample)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(image)[top : top + size, left : left + size]


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
