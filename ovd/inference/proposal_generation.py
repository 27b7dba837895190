"""Class-agnostic proposals of every image of a dataset from a proposal model (DESIGN §2, §4): batched, resumable
after a kill, sharded over machines.

Images are taken in increasing id order and cut into chunks of ``chunk_size`` consecutive images; shard ``i/n``
takes every chunk ``c`` with ``c % n == i``. Batches never cross a chunk, and a chunk is saved only when whole (in
``<out>.parts/``), so a run resumed after a kill computes each remaining chunk exactly as an uninterrupted run would,
and merged shards equal an unsharded run byte for byte (on the same device, batch size and thread count).

Output: the proposals file (:mod:`ovd.data.proposals`' format, written atomically) and its sidecar
``<out stem>.meta.json``: the settings of the run (model, weights, dataset, top-k, NMS, batch and chunk size, shard),
counts, and the images that could not be read. The sidecar is written last: it marks a finished file, and it is
what a rerun (nothing to do) and a merge (shards of one run, each once) check.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import nms
from tqdm import tqdm

from ovd.config import Config, config_to_yaml
from ovd.data import DetectionDataset, ImageRecord, Proposals, load_proposals, save_proposals
from ovd.engine.checkpoint import load_model_state, read_checkpoint
from ovd.engine.setup import select_device
from ovd.evaluation.proposal_recall import proposal_recall
from ovd.modeling.build import build_model
from ovd.modeling.proposal_network import ProposalNetwork
from ovd.structures import ImageSample
from ovd.utils.io import atomic_path, read_json, write_json

__all__ = [
    "GenerationSummary",
    "SkippedImage",
    "build_proposal_model",
    "evaluate_proposal_file",
    "generate_proposals",
    "merge_proposal_shards",
    "meta_path",
    "shard_records",
]

FORMAT_VERSION = 1
_CHUNK_KEYS = ("image_ids", "counts", "boxes", "scores", "skipped_ids", "skipped_files", "skipped_errors")


@dataclass
class SkippedImage:
    """An image that could not be read (missing, undecodable, or of another size than annotated): no proposals."""

    image_id: int
    file_name: str
    error: str


@dataclass
class GenerationSummary:
    """What a run (or a merge) wrote.

    Attributes:
        out: the proposals file.
        images: images of this shard, skipped and resumed ones included.
        proposals: proposals written.
        images_without_proposals: images read that got no proposal.
        images_resumed: images found done in the chunks of an interrupted run (or a finished file).
        skipped: the images that could not be read.
        seconds: wall time of this call, model loading excluded.
        images_per_second: images run through the model in this call, per second.
    """

    out: Path
    images: int
    proposals: int
    images_without_proposals: int
    images_resumed: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0

    def format(self) -> str:
        rows = {**asdict(self), "skipped": len(self.skipped)}
        return "\n".join(f"  {k:25s} {v:.1f}" if isinstance(v, float) else f"  {k:25s} {v}" for k, v in rows.items())


def build_proposal_model(cfg: Config, weights: str | os.PathLike) -> ProposalNetwork:
    """The proposal model of ``cfg`` with ``weights``, on MODEL.DEVICE, in eval mode.

    Raises:
        ValueError: ``cfg`` is not a proposal model's (MODEL.META_ARCHITECTURE).
        FileNotFoundError, CheckpointError: no such checkpoint, an unreadable one, or one of another architecture
            or other widths (the keys that do not fit listed).
    """
    if cfg.MODEL.META_ARCHITECTURE != "ProposalNetwork":
        raise ValueError(f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}: proposals come from a proposal "
                         "model (ProposalNetwork), e.g. configs/shapes/proposals_oln.yaml")
    state = read_checkpoint(weights)["model"]
    model = build_model(cfg)
    load_model_state(model, state, source=str(weights))
    return model.to(select_device(cfg)).eval()


def model_source(cfg: Config, config_file: str | os.PathLike, weights: str | os.PathLike) -> dict[str, str]:
    """What made the model, for the run's settings: the config file, the hash of the resolved config (overrides
    included) and the weights file with its hash — a retrained checkpoint at the same path is another model."""
    return {
        "config_file": str(Path(config_file).resolve()),
        "config_sha256": hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest(),
        "weights": str(Path(weights).resolve()),
        "weights_sha256": _sha256(Path(weights)),
    }


def meta_path(out: str | os.PathLike) -> Path:
    """The sidecar of a proposals file: ``props.json`` → ``props.meta.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.meta.json")


def shard_records(
    records: Sequence[ImageRecord], *, chunk_size: int, shard: tuple[int, int]
) -> dict[int, list[ImageRecord]]:
    """``{chunk id: its records}`` of shard ``(i, n)``: records sorted by image id, cut into chunks of ``chunk_size``,
    the chunks ``i, i + n, ...``."""
    index, num_shards = shard
    if not 0 <= index < num_shards:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{num_shards}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ordered = sorted(records, key=lambda r: r.image_id)
    return {c: ordered[c * chunk_size : (c + 1) * chunk_size]
            for c in range(index, math.ceil(len(ordered) / chunk_size), num_shards)}


def generate_proposals(
    model: torch.nn.Module,
    dataset: DetectionDataset,
    out: str | os.PathLike,
    *,
    mapper: Callable[[ImageRecord], ImageSample],
    source: Mapping[str, Any],
    top_k: int = 100,
    nms_thresh: float | None = None,
    batch_size: int = 1,
    chunk_size: int = 256,
    shard: tuple[int, int] = (0, 1),
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> GenerationSummary:
    """Run ``model`` over every image of ``dataset`` (of this shard) and write their proposals to ``out``.

    Per image: the model's boxes (``predict``: ``pred_boxes`` xyxy in original pixels, ``scores`` descending), then
    class-agnostic NMS at ``nms_thresh`` if given, then the ``top_k`` best. An image that cannot be read is skipped,
    counted and listed (in the summary and the sidecar); the file is written for the others.

    Resumable: chunks an interrupted call finished (with the same settings) are kept and the rest computed; a
    finished file with the same settings is returned as is.

    Args:
        model: a proposal model in eval mode (:func:`build_proposal_model`).
        dataset: the images (boxes not used).
        out: the proposals file; its sidecar and ``<out>.parts/`` go beside it.
        mapper: record → model input (:func:`ovd.data.build.build_test_mapper`); raises OSError/ValueError for an unreadable image.
        source: what made the model (:func:`model_source`), part of the run's settings.
        batch_size: images per forward pass; batches never cross a chunk.
        chunk_size: images per resumable chunk; shards and the run they are merged into must use the same.
        shard: ``(i, n)``: this run's chunks (see the module docstring).
        num_workers: DataLoader processes reading and resizing images (0: in this process).
        overwrite: replace a file or partial run made with other settings (or not by this function).
        on_chunk: called with each chunk id once it is saved.

    Raises:
        FileExistsError: ``out`` holds another run's file or partial run (the differing settings named), or a file
            this function did not write, and ``overwrite`` is False.
    """
    start_time = time.perf_counter()
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if nms_thresh is not None and not 0.0 < nms_thresh <= 1.0:
        raise ValueError(f"nms_thresh must be in (0, 1], got {nms_thresh}")
    out = Path(out)
    chunks = shard_records(dataset.records, chunk_size=chunk_size, shard=shard)
    shard_size = sum(len(c) for c in chunks.values())
    device = next(model.parameters()).device
    job = {
        "model": dict(source),
        "dataset": dataset.name,
        "dataset_file": str(Path(dataset.json_file).resolve()),
        "dataset_sha256": _sha256(Path(dataset.json_file)),
        "top_k": top_k,
        "nms_thresh": nms_thresh,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "device": device.type,
        "shard": list(shard) if shard[1] > 1 else None,
    }
    parts = _Parts(out, job, overwrite=overwrite)
    if parts.finished is not None:
        return _summary(out, parts.finished, images_resumed=shard_size)

    pending = [c for c in chunks if not parts.has(c)]
    records = [r for c in pending for r in chunks[c]]
    batches, first = [], 0
    for c in pending:
        batches.extend(list(range(first + s, first + min(s + batch_size, len(chunks[c]))))
                       for s in range(0, len(chunks[c]), batch_size))
        first += len(chunks[c])
    loader = DataLoader(_Images(records, mapper), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_as_list)
    loaded = (batch for batch in loader)
    # Closing the generator shuts the loader's workers down at once, also when a chunk fails.
    with contextlib.closing(loaded), tqdm(total=len(records), desc="proposals", unit="img",
                                          disable=not progress) as bar:
        for c in pending:
            found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            skipped: list[SkippedImage] = []
            for _ in range(math.ceil(len(chunks[c]) / batch_size)):
                batch = next(loaded)
                samples = [s for s in batch if isinstance(s, ImageSample)]
                skipped.extend(s for s in batch if isinstance(s, SkippedImage))
                if samples:
                    with torch.no_grad():
                        results = model.predict(samples)
                    selected = _select([(r.pred_boxes, r.scores) for r in results], top_k, nms_thresh)
                    found.update(zip((s.image_id for s in samples), selected))
                bar.update(len(batch))
            parts.write(c, [r.image_id for r in chunks[c] if r.image_id in found], found, skipped)
            if on_chunk is not None:
                on_chunk(c)
    meta = parts.finalize(list(chunks))
    seconds = time.perf_counter() - start_time
    return _summary(out, meta, images_resumed=shard_size - len(records), seconds=seconds,
                    images_per_second=len(records) / seconds if seconds > 0 else 0.0)


def merge_proposal_shards(
    shards: Sequence[str | os.PathLike], out: str | os.PathLike, *, overwrite: bool = False
) -> GenerationSummary:
    """Join the files of all ``--shard i/n`` runs of one job into what the unsharded run writes (file and sidecar).

    Raises:
        ValueError: a file is not a finished shard (no sidecar), shards are missing or repeated, their settings differ
            (key and values named), or two hold the same image.
        FileExistsError: ``out`` exists and ``overwrite`` is False.
    """
    if not shards:
        raise ValueError("merge needs at least one shard file")
    metas = []
    for path in map(Path, shards):
        meta = _read_meta(path)
        if meta is None:
            raise ValueError(f"{path} is not a finished generate_proposals shard: its sidecar {meta_path(path)} "
                             "is missing")
        shard = meta["job"].get("shard")
        if not (isinstance(shard, list) and len(shard) == 2):
            raise ValueError(f"{path} is not a shard: its sidecar says shard={shard!r}")
        metas.append(meta)
    num_shards = metas[0]["job"]["shard"][1]
    have = sorted(m["job"]["shard"][0] for m in metas)
    if any(m["job"]["shard"][1] != num_shards for m in metas) or have != list(range(num_shards)):
        got = ", ".join(f"{i}/{n} ({p})" for (i, n), p in zip((m["job"]["shard"] for m in metas), shards))
        raise ValueError(f"merge needs each of the shards 0..{num_shards - 1} of one run exactly once; got {got}")
    job = {**metas[0]["job"], "shard": None}
    for meta, path in zip(metas[1:], shards[1:]):
        other = {**meta["job"], "shard": None}
        if other != job:
            raise ValueError(f"shards {shards[0]} and {path} were made with other settings: {_diff(job, other)}")
    out = Path(out)
    if (out.exists() or meta_path(out).exists()) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) or choose another file")

    entries, owner = [], {}
    for path in shards:
        for e in read_json(path, what="proposals file"):
            if owner.setdefault(e["image_id"], path) != path:
                raise ValueError(f"shards {owner[e['image_id']]} and {path} both have proposals of image "
                                 f"{e['image_id']}")
            entries.append(e)
    entries.sort(key=lambda e: e["image_id"])  # stable: an image's proposals keep their order
    skipped = sorted((s for m in metas for s in m["skipped"]), key=lambda s: s["image_id"])
    meta = _meta(job, num_images=sum(m["num_images"] for m in metas), num_proposals=len(entries),
                 num_images_without_proposals=sum(m["num_images_without_proposals"] for m in metas), skipped=skipped)
    meta_path(out).unlink(missing_ok=True)
    write_json(out, entries)
    write_json(meta_path(out), meta, indent=2)
    return _summary(out, meta)


def evaluate_proposal_file(
    path: str | os.PathLike, dataset: DetectionDataset, *, records: Sequence[ImageRecord] | None = None
) -> dict[str, float]:
    """:func:`~ovd.evaluation.proposal_recall.proposal_recall` of a written proposals file on ``dataset`` (its novel
    classes), over ``records`` only where given (a shard's images)."""
    if records is not None:
        dataset = DetectionDataset(dataset.name, dataset.json_file, list(records), dataset.categories,
                                   dataset.novel_category_ids)
    proposals, _ = load_proposals(path, image_sizes={r.image_id: (r.height, r.width) for r in dataset.records})
    return proposal_recall(dataset, proposals)


class _Images(Dataset):
    """Records → model inputs, or a `SkippedImage` where the image cannot be read."""

    def __init__(self, records: list[ImageRecord], mapper: Callable[[ImageRecord], ImageSample]) -> None:
        self.records, self.mapper = records, mapper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageSample | SkippedImage:
        record = self.records[i]
        try:
            return self.mapper(record)
        except (OSError, ValueError) as e:
            return SkippedImage(record.image_id, str(record.file_name), str(e))


def _as_list(batch: list) -> list:
    return batch


def _select(
    predictions: list[tuple[torch.Tensor, torch.Tensor]], top_k: int, nms_thresh: float | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, the ``top_k`` best proposals after optional class-agnostic NMS, as ``(boxes float32 [k, 4],
    scores float32 [k])``; ``predictions``: per image ``(boxes Tensor[K, 4], scores Tensor[K] descending)``."""
    kept = []
    for boxes, scores in predictions:
        if nms_thresh is not None:
            keep = nms(boxes.float(), scores.float(), nms_thresh)
            boxes, scores = boxes[keep], scores[keep]
        kept.append((boxes[:top_k], scores[:top_k]))
    # One copy off the device per batch, not two per image.
    splits = np.cumsum([len(s) for _, s in kept])[:-1]
    boxes = torch.cat([b for b, _ in kept]).float().cpu().numpy()
    scores = torch.cat([s for _, s in kept]).float().cpu().numpy()
    return list(zip(np.split(boxes, splits), np.split(scores, splits)))


class _Parts:
    """The chunks of a run in ``<out>.parts/`` (``job.json`` and one ``<chunk>.npz`` each, written atomically), and
    the final file and sidecar made from them."""

    def __init__(self, out: Path, job: dict[str, Any], *, overwrite: bool) -> None:
        self.out, self.job, self.dir = out, job, out.with_name(f"{out.name}.parts")
        self.finished: dict[str, Any] | None = None
        meta = _read_meta(out)
        if meta is not None and meta["job"] == job and out.is_file():
            self.finished = meta
            # a kill between the sidecar and the clean-up leaves the chunks behind
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        job_file = self.dir / "job.json"
        old = read_json(job_file, what="partial proposals run") if job_file.is_file() else None
        if old is not None and old != job:
            if not overwrite:
                raise FileExistsError(f"{self.dir} holds a partial run with other settings ({_diff(old, job)}); "
                                      "pass overwrite=True (--overwrite) to discard it, or choose another file")
            shutil.rmtree(self.dir)
        # A file of this run's own is there when a kill came between writing it and its sidecar.
        if old != job and (out.exists() or (meta is not None and meta["job"] != job)) and not overwrite:
            why = f"made with other settings ({_diff(meta['job'], job)})" if meta else "not written by this tool"
            raise FileExistsError(f"{out} exists, {why}; pass overwrite=True (--overwrite) or choose another file")
        if old != job:
            # a folder without its job file was killed while starting: nothing to keep
            shutil.rmtree(self.dir, ignore_errors=True)
            write_json(job_file, job, indent=2)

    def _path(self, chunk: int) -> Path:
        return self.dir / f"{chunk:06d}.npz"

    def has(self, chunk: int) -> bool:
        return self._path(chunk).is_file()

    def write(self, chunk: int, image_ids: list[int], found: Mapping[int, tuple[np.ndarray, np.ndarray]],
              skipped: list[SkippedImage]) -> None:
        """``image_ids``: the chunk's images that were read, in order; ``found``: their proposals."""
        arrays = {
            "image_ids": np.array(image_ids, np.int64),
            "counts": np.array([len(found[i][1]) for i in image_ids], np.int64),
            "boxes": np.concatenate([np.zeros((0, 4), np.float32), *(found[i][0] for i in image_ids)]),
            "scores": np.concatenate([np.zeros(0, np.float32), *(found[i][1] for i in image_ids)]),
            "skipped_ids": np.array([s.image_id for s in skipped], np.int64),
            "skipped_files": np.array([s.file_name for s in skipped], dtype=str),
            "skipped_errors": np.array([s.error for s in skipped], dtype=str),
        }
        with atomic_path(self._path(chunk)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def finalize(self, chunk_ids: list[int]) -> dict[str, Any]:
        """Write the proposals file from the chunks, then the sidecar; remove the chunks. Returns the sidecar."""
        proposals: Proposals = {}
        skipped, num_images = [], 0
        for c in chunk_ids:
            path = self._path(c)
            try:
                with np.load(path, allow_pickle=False) as data:
                    ids, counts, boxes, scores, s_ids, s_files, s_errors = (data[k] for k in _CHUNK_KEYS)
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"proposals chunk {path} is unreadable ({e}); delete it and run again") from None
            starts = np.concatenate([[0], np.cumsum(counts)])
            proposals.update((int(i), (boxes[a:b], scores[a:b]))
                             for i, a, b in zip(ids.tolist(), starts[:-1], starts[1:]) if b > a)
            skipped.extend({"image_id": int(i), "file_name": str(f), "error": str(e)}
                           for i, f, e in zip(s_ids.tolist(), s_files, s_errors))
            num_images += len(ids) + len(s_ids)
        meta = _meta(self.job, num_images=num_images, num_proposals=sum(len(s) for _, s in proposals.values()),
                     num_images_without_proposals=num_images - len(skipped) - len(proposals), skipped=skipped)
        meta_path(self.out).unlink(missing_ok=True)
        save_proposals(self.out, proposals)
        write_json(meta_path(self.out), meta, indent=2)
        shutil.rmtree(self.dir)
        return meta


def _meta(job: dict[str, Any], *, num_images: int, num_proposals: int, num_images_without_proposals: int,
          skipped: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "job": job, "num_images": num_images, "num_proposals": num_proposals,
            "num_images_without_proposals": num_images_without_proposals, "num_skipped": len(skipped),
            "skipped": skipped}


def _read_meta(out: Path) -> dict[str, Any] | None:
    path = meta_path(out)
    if not path.is_file():
        return None
    meta = read_json(path, what="proposals sidecar")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "job" not in meta:
        raise ValueError(f"{path} is not the sidecar of a generate_proposals file (format_version {FORMAT_VERSION})")
    return meta


def _summary(out: Path, meta: Mapping[str, Any], **timing: Any) -> GenerationSummary:
    return GenerationSummary(
        out=out, images=meta["num_images"], proposals=meta["num_proposals"],
        images_without_proposals=meta["num_images_without_proposals"],
        skipped=[SkippedImage(**s) for s in meta["skipped"]], **timing,
    )


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
