"""The shapes world's CLIP teacher (DESIGN §6): a small open_clip model trained contrastively on box crops.

It plays web-scale CLIP, so it is trained on crops of *all* categories, base and novel (``train_all.json``), with
captions ``"a photo of a {name}"``, and judged by zero-shot accuracy on crops of the held-out val images. It is the
registered ``ovd-toy-vit`` architecture written with :func:`~ovd.clip.models.save_clip`, so everything downstream
loads it exactly as it loads real CLIP weights: ``load_clip("local-dir:<folder>")``.

A crop is the exact box cut from the original image, without context, then the model's own eval preprocessing
(``bundle.preprocess``: short side resized, centre crop, CLIP normalisation) — what region embeddings use too.
Training adds a small random jitter of the box edges and horizontal flips, so the teacher is steady on the jittered
proposal boxes it embeds at distillation time.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovd.clip.models import CONFIG_FILENAME, WEIGHTS_FILENAME, ClipBundle, load_clip, save_clip
from ovd.clip.text import DEFAULT_TEMPLATES, encode_text
from ovd.data.images import read_image
from ovd.data.shapes import default_shapes_root, load_shapes_meta, shapes_split_paths
from ovd.utils.io import read_json, write_json

__all__ = [
    "TOY_CLIP_MODEL",
    "BoxCrops",
    "crop_box",
    "default_toy_clip_dir",
    "encode_crops",
    "evaluate_zero_shot",
    "load_box_crops",
    "multi_positive_clip_loss",
    "preprocess_crops",
    "toy_clip_params",
    "train_toy_clip",
    "zero_shot_accuracy",
]

TOY_CLIP_MODEL = "ovd-toy-vit"
METRICS_FILENAME = "metrics.json"
FORMAT_VERSION = 1
# The recipe's fixed parts; they go into the params that decide whether a finished run can be reused.
BOX_JITTER = 0.05  # each box edge moves by up to this fraction of the box's width / height
WEIGHT_DECAY = 0.1
WARMUP_FRACTION = 0.1
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on the learnable temperature


def default_toy_clip_dir() -> Path:
    """``$OVD_DATASETS/shapes/toy_clip``, with ``OVD_DATASETS`` defaulting to ``./datasets``."""
    return default_shapes_root() / "toy_clip"


@dataclass
class BoxCrops:
    """The labelled boxes of one split of a shapes world, with their images decoded in memory.

    Attributes:
        images: the split's images, each uint8 RGB [H, W, 3].
        image_index: int64 [N], which image each box is in.
        boxes: float32 [N, 4], xyxy in pixels.
        labels: int64 [N], index into ``names``.
        names: the C category names, in category-id order.
        novel: bool [C], which categories are novel.
    """

    images: list[np.ndarray]
    image_index: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    names: list[str]
    novel: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_box_crops(world_root: str | os.PathLike, split: str) -> BoxCrops:
    """All boxes of ``split`` (``"train_all"``, ``"val"``, ...) of the shapes world at ``world_root``."""
    image_dir, annotation_path = shapes_split_paths(world_root, split)
    coco = read_json(annotation_path, what=f"shapes {split} annotations")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    row_of = {image["id"]: i for i, image in enumerate(coco["images"])}
    images = [read_image(image_dir / image["file_name"], what=f"shapes {split} image") for image in coco["images"]]
    annotations = coco["annotations"]
    xywh = np.array([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4)
    return BoxCrops(
        images=images,
        image_index=np.array([row_of[a["image_id"]] for a in annotations], dtype=np.int64),
        boxes=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
        labels=np.array([label_of[a["category_id"]] for a in annotations], dtype=np.int64),
        names=[c["name"] for c in categories],
        novel=np.array([c.get("split") == "novel" for c in categories]),
    )


def crop_box(image: np.ndarray, box: Sequence[float]) -> Image.Image:
    """Cut ``box`` (xyxy, float pixels) out of ``image`` (uint8 [H, W, 3]) without context.

    The crop covers every pixel the box touches (edges rounded outwards), clipped to the image, at least 1 px.
    """
    h, w = image.shape[:2]
    x0 = min(max(math.floor(box[0]), 0), w - 1)
    y0 = min(max(math.floor(box[1]), 0), h - 1)
    x1 = max(min(math.ceil(box[2]), w), x0 + 1)
    y1 = max(min(math.ceil(box[3]), h), y0 + 1)
    return Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))


def preprocess_crops(
    preprocess: Callable[[Image.Image], torch.Tensor],
    crops: BoxCrops,
    indices: Sequence[int] | None = None,
    *,
    boxes: np.ndarray | None = None,
    flips: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Crop boxes and run the model's preprocessing on each.

    Args:
        preprocess: ``bundle.preprocess`` (PIL image -> Tensor[3, S, S]).
        crops: the boxes and their images.
        indices: which boxes (K of them); all by default.
        boxes: float [K, 4] xyxy to cut instead of the stored ones (jittered), one per index.
        flips: K booleans, mirror the crop horizontally.

    Returns:
        Tensor[K, 3, S, S] float32.
    """
    indices = range(len(crops)) if indices is None else indices
    pixels = []
    for k, i in enumerate(indices):
        crop = crop_box(crops.images[crops.image_index[i]], crops.boxes[i] if boxes is None else boxes[k])
        if flips is not None and flips[k]:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels.append(preprocess(crop))
    if not pixels:
        raise ValueError("no boxes to crop")
    return torch.stack(pixels)


@torch.no_grad()
def encode_crops(bundle: ClipBundle, pixels: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Image-tower embeddings of preprocessed crops: pixels [N, 3, S, S] -> Tensor[N, D] float32, L2-normalised."""
    device = next(bundle.model.parameters()).device
    chunks = [bundle.model.encode_image(batch.to(device)).float().cpu() for batch in pixels.split(batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1)


def multi_positive_clip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric contrastive loss where a row or column may have several positives.

    Captions repeat within a batch (many crops of one category), so plain InfoNCE would push identical captions
    apart. Each image's target is uniform over its positive texts and each text's over its positive images
    (soft cross-entropy both ways, averaged); rows / columns with no positive are left out. With ``positives``
    the identity it equals open_clip's ``ClipLoss``.

    Args:
        image_embeds: [B, D], L2-normalised.
        text_embeds: [T, D], L2-normalised.
        positives: bool [B, T], which image-text pairs match.
        logit_scale: scalar multiplier of the cosine similarities (``model.logit_scale.exp()``).

    Returns:
        scalar loss tensor.
    """
    if positives.shape != (image_embeds.shape[0], text_embeds.shape[0]):
        raise ValueError(f"positives must be [B, T] = {[image_embeds.shape[0], text_embeds.shape[0]]}, "
                         f"got {list(positives.shape)}")
    if not positives.any():
        raise ValueError("multi_positive_clip_loss needs at least one positive pair")
    logits = logit_scale * image_embeds @ text_embeds.T
    targets = positives.to(logits.dtype)
    rows, cols = positives.any(dim=1), positives.any(dim=0)
    image_to_text = F.cross_entropy(logits[rows], targets[rows] / targets[rows].sum(dim=1, keepdim=True))
    text_to_image = F.cross_entropy(logits.T[cols], targets.T[cols] / targets.T[cols].sum(dim=1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def zero_shot_accuracy(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    *,
    groups: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Zero-shot classification accuracy: each image takes the class of its most similar text.

    Args:
        image_embeds: [N, D], L2-normalised.
        text_embeds: [C, D], L2-normalised, one row per name.
        labels: int [N], the true class index of each image.
        names: the C class names.
        groups: optional named sets of class indices (``{"base": [...], "novel": [...]}``), each reported as the
            accuracy over the images whose true class is in the set (None when there are none).

    Returns:
        ``{"all": acc, <group>: acc, ..., "per_class": {name: acc or None}, "num_crops": N,
        "num_crops_per_class": {name: n}}``.
    """
    if text_embeds.shape[0] != len(names):
        raise ValueError(f"{text_embeds.shape[0]} text embeddings for {len(names)} names")
    if image_embeds.shape[0] != labels.shape[0] or image_embeds.shape[0] == 0:
        raise ValueError(f"need one label per image and at least one image, got {image_embeds.shape[0]} images "
                         f"and {labels.shape[0]} labels")
    correct = (image_embeds @ text_embeds.T).argmax(dim=1) == labels

    def accuracy(mask: torch.Tensor) -> float | None:
        return float(correct[mask].float().mean()) if mask.any() else None

    result: dict[str, Any] = {"all": accuracy(torch.ones_like(correct))}
    for group, members in (groups or {}).items():
        result[group] = accuracy(torch.isin(labels, torch.as_tensor(list(members), dtype=labels.dtype)))
    result["per_class"] = {name: accuracy(labels == c) for c, name in enumerate(names)}
    result["num_crops"] = int(labels.shape[0])
    result["num_crops_per_class"] = {name: int((labels == c).sum()) for c, name in enumerate(names)}
    return result


def evaluate_zero_shot(bundle: ClipBundle, crops: BoxCrops, *, template: str = DEFAULT_TEMPLATES[0]) -> dict[str, Any]:
    """Zero-shot accuracy of ``bundle`` on every box of ``crops`` over all C names, with base / novel groups."""
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        text_embeds = encode_text(bundle, crops.names, templates=(template,))
        image_embeds = encode_crops(bundle, preprocess_crops(bundle.preprocess, crops))
    finally:
        bundle.model.train(was_training)
    groups = {"base": np.flatnonzero(~crops.novel).tolist(), "novel": np.flatnonzero(crops.novel).tolist()}
    return zero_shot_accuracy(image_embeds, text_embeds, torch.from_numpy(crops.labels), crops.names, groups=groups)


def toy_clip_params(
    world_root: str | os.PathLike, *, steps: int = 600, batch_size: int = 64, lr: float = 1e-3, seed: int = 0
) -> dict[str, Any]:
    """The parameters that determine a toy CLIP run (stored as ``metrics.json["params"]``): the arguments, the fixed
    recipe and the world's own generation parameters, so a regenerated world invalidates a trained teacher."""
    for name, value, minimum in (("steps", steps, 1), ("batch_size", batch_size, 2), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    return {
        "model": TOY_CLIP_MODEL, "steps": steps, "batch_size": batch_size, "lr": float(lr), "seed": seed,
        "template": DEFAULT_TEMPLATES[0], "box_jitter": BOX_JITTER, "hflip": True, "weight_decay": WEIGHT_DECAY,
        "warmup_fraction": WARMUP_FRACTION, "max_logit_scale": MAX_LOGIT_SCALE, "class_balanced": True,
        "world": load_shapes_meta(world_root)["params"], "format_version": FORMAT_VERSION,
    }


def train_toy_clip(
    world_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the toy CLIP on crops of ``train_all`` of the shapes world, evaluate it on ``val``, save it.

    Recipe: ``ovd-toy-vit`` randomly initialised from ``seed``; class-balanced batches (every category about equally
    often) of jittered, randomly flipped crops; the C category prompts as the batch's texts;
    :func:`multi_positive_clip_loss`; AdamW (weight decay on matrices only) with linear warm-up and cosine decay;
    learnable logit scale capped at 100. Same seed and thread count → bit-identical weights.

    Writes ``out_dir/open_clip_config.json`` + ``open_clip_pytorch_model.bin`` (:func:`save_clip`) and then, last,
    ``metrics.json``: ``params``, ``steps``, ``seconds``, ``final_loss``, ``losses`` (per step), ``zero_shot``
    (:func:`zero_shot_accuracy` on val: ``all`` / ``base`` / ``novel`` / ``per_class``), ``num_train_crops``.
    If ``out_dir`` already holds a complete run with the same params, nothing is trained and its metrics are
    returned; with other params ``FileExistsError`` names them unless ``overwrite``.

    Returns:
        the metrics.
    """
    params = toy_clip_params(world_root, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    out_dir = Path(out_dir)
    metrics_path = out_dir / METRICS_FILENAME
    if metrics_path.is_file() and not overwrite:
        done = read_json(metrics_path, what="toy CLIP metrics")
        old = done.get("params", {})
        differing = [f"{k}: {old.get(k)!r} (existing) vs {params.get(k)!r} (requested)"
                     for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k)]
        complete = (out_dir / CONFIG_FILENAME).is_file() and (out_dir / WEIGHTS_FILENAME).is_file()
        if not differing and complete:
            log(f"toy CLIP: {out_dir} already has a trained model with these params; skipped")
            return done
        if differing:
            raise FileExistsError(f"a toy CLIP with other params exists in {out_dir} ({'; '.join(differing)}); "
                                  "pass overwrite=True (--overwrite) or choose another folder")
    # Removing the marker first means an interrupted run is never mistaken for a finished one.
    metrics_path.unlink(missing_ok=True)

    start = time.perf_counter()
    train = load_box_crops(world_root, "train_all")
    val = load_box_crops(world_root, "val")
    log(f"toy CLIP: {len(train)} training crops, {len(val)} held-out crops, {len(train.names)} categories")
    bundle = load_clip(TOY_CLIP_MODEL, seed=seed)
    model = bundle.model
    model.train()
    tokens = bundle.tokenizer([DEFAULT_TEMPLATES[0].format(name) for name in train.names])
    optimizer = _optimizer(model, lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
    generator = torch.Generator().manual_seed(seed)
    pools = [torch.from_numpy(np.flatnonzero(train.labels == c)) for c in range(len(train.names))]
    losses: list[float] = []
    for step in range(steps):
        indices = _balanced_batch(pools, batch_size, generator)
        boxes, flips = _augment(train, indices, generator)
        pixels = preprocess_crops(bundle.preprocess, train, indices.tolist(), boxes=boxes, flips=flips)
        labels = torch.from_numpy(train.labels[indices.numpy()])
        image_embeds = model.encode_image(pixels, normalize=True)
        # The batch's texts are the C category prompts: a crop's caption is its category's prompt, so the per-pair
        # captions would only repeat these rows.
        text_embeds = model.encode_text(tokens, normalize=True)
        positives = labels[:, None] == torch.arange(len(train.names))
        loss = multi_positive_clip_loss(image_embeds, text_embeds, positives, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            log(f"toy CLIP: step {step + 1}/{steps}  loss {np.mean(losses[-25:]):.4f}  "
                f"logit scale {model.logit_scale.exp().item():.1f}  {time.perf_counter() - start:.0f} s")
    model.eval()
    zero_shot = evaluate_zero_shot(bundle, val)
    save_clip(bundle, out_dir)
    metrics = {
        "params": params,
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 2),
        "threads": torch.get_num_threads(),
        "final_loss": float(np.mean(losses[-10:])),
        "losses": losses,
        "num_train_crops": len(train),
        "num_train_crops_per_class": {n: len(p) for n, p in zip(train.names, pools)},
        "zero_shot": zero_shot,
    }
    write_json(metrics_path, metrics, indent=2)
    return metrics


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # As open_clip's training: no weight decay on gains, biases and the logit scale.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate factor of step i: linear warm-up over ``WARMUP_FRACTION`` of the steps, then cosine to 0."""
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    return factor


def _balanced_batch(pools: list[torch.Tensor], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Box indices [batch_size]: categories cycled in shuffled rounds (so each appears equally often), then one
    random box of each drawn category. Categories without boxes are never drawn."""
    present = torch.tensor([c for c, pool in enumerate(pools) if len(pool)])
    if len(present) == 0:
        raise ValueError("the training split has no boxes")
    rounds = -(-batch_size // len(present))
    order = torch.cat([torch.randperm(len(present), generator=generator) for _ in range(rounds)])
    classes = present[order[:batch_size]]
    picks = torch.randint(1 << 62, (batch_size,), generator=generator)
    return torch.stack([pools[c][picks[k] % len(pools[c])] for k, c in enumerate(classes.tolist())])


def _augment(
    crops: BoxCrops, indices: torch.Tensor, generator: torch.Generator
) -> tuple[np.ndarray, list[bool]]:
    """Jittered xyxy boxes [K, 4] of boxes ``indices`` (each edge moved by up to ``BOX_JITTER`` of the box's size,
    kept inside its image) and K h-flip draws."""
    boxes = crops.boxes[indices.numpy()]
    sizes = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
    shifts = (torch.rand(len(boxes), 4, generator=generator, dtype=torch.float64).numpy() * 2 - 1) * BOX_JITTER
    jittered = boxes + shifts * sizes
    for k, i in enumerate(indices.tolist()):
        h, w = crops.images[crops.image_index[i]].shape[:2]
        jittered[k] = np.clip(jittered[k], 0, [w, h, w, h])
    flips = (torch.rand(len(boxes), generator=generator) < 0.5).tolist()
    return jittered, flips
