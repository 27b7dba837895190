"""Offline RKD teacher targets (DESIGN §2): CLIP embeddings of each image's top proposals → a region store (§4).

Images are taken in increasing id order and cut into chunks of ``chunk_size`` consecutive images; chunk ``c`` of shard
``i/n`` is every chunk with ``c % n == i``. Encoder batches never cross a chunk, and a chunk is written only when whole,
so a resumed run encodes each remaining chunk exactly as an uninterrupted run would, and merged shards equal an
unsharded run byte for byte (on the same device and thread count).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from ovd.clip.models import ClipBundle
from ovd.clip.regions import RegionPreprocessor, crop_regions, encode_regions, select_regions
from ovd.data.catalog import DatasetSpec
from ovd.data.datasets import load_coco_json
from ovd.data.images import read_image
from ovd.data.proposals import load_proposals
from ovd.data.region_store import RegionStoreWriter

__all__ = ["ExtractionSummary", "RegionCropDataset", "extract_region_embeddings"]

_REGIONS_PER_LOADER_ITEM = 32


@dataclass
class ExtractionSummary:
    """What one call of :func:`extract_region_embeddings` did.

    Attributes:
        store: the store folder.
        images: images of this shard (all of them, resumed ones included).
        regions: regions stored for them.
        images_without_proposals: images with no proposal in the file (stored with 0 regions).
        images_resumed: images found already done in chunks of an interrupted run (or a finished store).
        proposals_skipped: proposals for image ids not in the dataset, skipped (``unknown_images="skip"``).
        proposals_clipped: proposals clipped to their image.
        proposals_zero_area: proposals dropped for having no area after clipping.
        seconds: wall time of this call, model loading excluded.
        regions_per_second: regions encoded in this call per second.
    """

    store: Path
    images: int
    regions: int
    images_without_proposals: int
    images_resumed: int
    proposals_skipped: int
    proposals_clipped: int
    proposals_zero_area: int
    seconds: float
    regions_per_second: float

    def format(self) -> str:
        return "\n".join(
            f"  {k:25s} {v:.1f}" if isinstance(v, float) else f"  {k:25s} {v}" for k, v in asdict(self).items()
        )


class RegionCropDataset(Dataset):
    """Images → their selected regions cut from the original image, resized and centre-cropped for CLIP.

    Item ``i``: ``(image_id, uint8 Tensor[k, S, S, 3])`` (normalisation happens batched, where the encoder runs).
    """

    def __init__(
        self, items: list[tuple[int, Path, tuple[int, int], np.ndarray]], preprocessor: RegionPreprocessor
    ) -> None:
        """items: ``(image_id, file, (height, width) from the annotations, boxes float32 [k, 4] xyxy)``."""
        self.items = items
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        image_id, file_name, size, boxes = self.items[i]
        if len(boxes) == 0:
            return image_id, self.preprocessor.geometry([])
        image = read_image(file_name, what=f"image {image_id}")
        if image.shape[:2] != size:
            # Proposals are in the annotated frame; cropping another one would embed the wrong pixels.
            raise ValueError(f"image {file_name} is {image.shape[0]}x{image.shape[1]} but its annotation says "
                             f"{size[0]}x{size[1]}")
        return image_id, self.preprocessor.geometry(crop_regions(image, boxes))


def extract_region_embeddings(
    bundle: ClipBundle,
    *,
    dataset_json: str | os.PathLike,
    image_root: str | os.PathLike,
    proposals_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    top_k: int = 5,
    nms_thresh: float = 0.5,
    batch_size: int = 256,
    num_workers: int = 0,
    chunk_size: int = 256,
    shard: tuple[int, int] = (0, 1),
    unknown_images: Literal["error", "skip"] = "error",
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> ExtractionSummary:
    """Encode the top proposals of every image of a COCO dataset with CLIP's image tower into a region store.

    Per image: proposals clipped to the image (zero-area ones dropped), class-agnostic NMS at ``nms_thresh``, the
    ``top_k`` best by score kept; each is cut from the original image (no resize, no context), preprocessed as the
    bundle's eval transform does, and encoded in batches of ``batch_size`` regions (fp16 autocast on CUDA). Stored
    boxes are the clipped proposal boxes, in original-image pixels, by decreasing score.

    Resumable: chunks finished by an interrupted call are kept (if the settings are the same) and the rest are done;
    a finished store with the same settings is returned as is.

    Args:
        bundle: the teacher, on the device to encode on.
        dataset_json: COCO file whose images to process (boxes not used).
        image_root: folder of its images.
        proposals_file: class-agnostic proposals (:mod:`ovd.data.proposals`).
        out_dir: the store folder.
        num_workers: DataLoader processes that read, crop and resize (0: in this process).
        chunk_size: images per resumable chunk; shards and the run they are merged into must use the same.
        shard: ``(i, n)``: process chunks ``i::n`` (see the module docstring).
        unknown_images: proposals for image ids not in the dataset raise (``"error"``) or are counted and skipped.
        overwrite: replace a store or partial run in ``out_dir`` made with other settings.
        on_chunk: called with each chunk id once it is written.

    Returns:
        the summary (also has what was clipped, dropped, skipped).
    """
    start_time = time.perf_counter()
    index, num_shards = shard
    if not (0 <= index < num_shards):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{num_shards}")
    for name, value in (("top_k", top_k), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    dataset_json, image_root, proposals_file = Path(dataset_json), Path(image_root), Path(proposals_file)
    dataset = load_coco_json(DatasetSpec(dataset_json.stem, dataset_json, image_root))
    records = sorted(dataset.records, key=lambda r: r.image_id)
    proposals, proposal_stats = load_proposals(
        proposals_file, image_sizes={r.image_id: (r.height, r.width) for r in records}, unknown=unknown_images
    )
    device = next(bundle.model.parameters()).device
    job = {
        "model_name": bundle.model_name,
        "pretrained": bundle.pretrained,
        "dim": bundle.embed_dim,
        "preprocess": {"crop": "exact box, no context, widened to whole pixels", **bundle.model.visual.preprocess_cfg},
        "precision": "fp16 autocast" if device.type == "cuda" else "fp32",
        "device": device.type,
        "top_k": top_k,
        "nms_thresh": nms_thresh,
        "dataset_file": str(dataset_json.resolve()),
        "dataset_sha256": _sha256(dataset_json),
        "image_root": str(image_root.resolve()),
        "proposals_file": str(proposals_file.resolve()),
        "proposals_sha256": _sha256(proposals_file),
        "unknown_images": unknown_images,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "shard": [index, num_shards] if num_shards > 1 else None,
    }
    writer = RegionStoreWriter(out_dir, job=job, overwrite=overwrite)

    chunk_ids = list(range(index, math.ceil(len(records) / chunk_size), num_shards))
    chunks = {c: records[c * chunk_size : (c + 1) * chunk_size] for c in chunk_ids}
    shard_records = [r for c in chunk_ids for r in chunks[c]]
    pending = [] if writer.complete else [c for c in chunk_ids if not writer.has_chunk(c)]
    empty = np.zeros((0, 4), np.float32)
    selected = {}
    for c in pending:
        for r in chunks[c]:
            boxes, scores = proposals.get(r.image_id, (empty, empty[:, 0]))
            selected[r.image_id] = boxes[select_regions(boxes, scores, top_k=top_k, nms_thresh=nms_thresh)]

    preprocessor = RegionPreprocessor(bundle)
    items = [(r.image_id, r.file_name, (r.height, r.width), selected[r.image_id]) for c in pending for r in chunks[c]]
    crops = _iter_crops(RegionCropDataset(items, preprocessor), top_k=top_k, batch_size=batch_size,
                        num_workers=num_workers)
    encoder = _BatchEncoder(bundle, preprocessor, batch_size)
    encoded = 0
    # Closing the generator shuts the loader's workers down at once, also when a chunk fails.
    with contextlib.closing(crops), tqdm(total=len(items), desc="region embeddings", unit="img",
                                         disable=not progress) as bar:
        for c in pending:
            ids = np.array([r.image_id for r in chunks[c]], np.int64)
            counts = []
            for image_id in ids.tolist():
                got_id, image_crops = next(crops)
                if got_id != image_id:
                    raise RuntimeError(f"data loader returned image {got_id} where {image_id} was expected")
                counts.append(len(image_crops))
                encoder.add(image_crops)
                bar.update()
            embeds = encoder.flush()
            writer.write_chunk(c, image_ids=ids, counts=np.array(counts, np.int64),
                               boxes=np.concatenate([selected[i] for i in ids.tolist()]), embeds=embeds)
            encoded += len(embeds)
            if on_chunk is not None:
                on_chunk(c)
    store = writer.finalize(chunk_ids)
    seconds = time.perf_counter() - start_time
    return ExtractionSummary(
        store=store.path,
        images=len(shard_records),
        regions=store.num_regions,
        images_without_proposals=sum(r.image_id not in proposals for r in shard_records),
        images_resumed=len(shard_records) - len(items),
        proposals_skipped=proposal_stats.num_unknown,
        proposals_clipped=proposal_stats.num_clipped,
        proposals_zero_area=proposal_stats.num_zero_area,
        seconds=seconds,
        regions_per_second=encoded / seconds if seconds > 0 else 0.0,
    )


def _iter_crops(
    dataset: RegionCropDataset, *, top_k: int, batch_size: int, num_workers: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """The dataset's items in order. Workers hand over small groups of images (the first arrives soon, so encoding
    starts early) and all of them together stay about two encoder batches ahead (more would only fill shared memory)."""
    images_per_item = max(1, _REGIONS_PER_LOADER_ITEM // top_k)
    loader = DataLoader(
        dataset,
        batch_size=images_per_item,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_crops,
        prefetch_factor=max(2, math.ceil(2 * batch_size / (images_per_item * top_k * num_workers)))
        if num_workers else None,
    )
    for image_ids, counts, crops in loader:
        yield from zip(image_ids, crops.split(counts))


def _collate_crops(items: list[tuple[int, torch.Tensor]]) -> tuple[list[int], list[int], torch.Tensor]:
    """``(image_ids, counts, crops uint8 [sum(counts), S, S, 3])``: one tensor per batch, because every tensor a
    worker hands over costs a shared-memory segment of its own."""
    crops = [c for _, c in items]
    out = torch.empty((sum(len(c) for c in crops), *crops[0].shape[1:]), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()  # written in place where the main process will read it, instead of copied there
    # numpy copies: torch's would be split over threads, and syncing them costs more than these small copies.
    np.concatenate([c.numpy() for c in crops], out=out.numpy())
    return [i for i, _ in items], [len(c) for c in crops], out


class _BatchEncoder:
    """Encodes crops as they arrive, in batches of ``batch_size``; :meth:`flush` also encodes a partial batch, so
    calling it at the end of each chunk makes a chunk's embeddings depend on the chunk alone (encoder numerics vary
    slightly with the make-up of a batch). Staging and input buffers are reused across batches."""

    def __init__(self, bundle: ClipBundle, preprocessor: RegionPreprocessor, batch_size: int) -> None:
        self.bundle, self.preprocessor = bundle, preprocessor
        self.device = next(bundle.model.parameters()).device
        height, width = preprocessor.image_size
        self.staging = torch.empty((batch_size, height, width, 3), dtype=torch.uint8,
                                   pin_memory=self.device.type == "cuda")
        self.pixels = torch.empty((batch_size, 3, height, width), dtype=torch.float32, device=self.device)
        self.num_staged = 0
        self.done: list[torch.Tensor] = []

    def add(self, crops: torch.Tensor) -> None:
        """crops: uint8 Tensor[k, S, S, 3]."""
        while len(crops):
            take = min(len(crops), len(self.staging) - self.num_staged)
            self.staging.numpy()[self.num_staged : self.num_staged + take] = crops[:take].numpy()
            self.num_staged += take
            crops = crops[take:]
            if self.num_staged == len(self.staging):
                self._encode()

    def flush(self) -> np.ndarray:
        """float32 [regions, D]: the embeddings of everything added since the last flush."""
        if self.num_staged:
            self._encode()
        out = torch.cat(self.done).numpy() if self.done else np.zeros((0, self.bundle.embed_dim), np.float32)
        self.done = []
        return out

    def _encode(self) -> None:
        n = self.num_staged
        pixels = self.preprocessor.normalize(self.staging[:n].to(self.device), out=self.pixels[:n])
        self.done.append(encode_regions(self.bundle, pixels))
        self.num_staged = 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

