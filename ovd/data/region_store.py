"""The region-embedding store (DESIGN §4): CLIP embeddings of each image's proposals for RKD, on disk, no pickle.

A store is a directory::

    embeddings.npy   float16 [R, D]  L2-normalised CLIP image embeddings of the regions
    boxes.npy        float32 [R, 4]  the regions, xyxy in original-image pixels
    index.npy        int64 [N, 3]    rows (image_id, start, count), sorted by image id; an image's regions are rows
                                     start .. start + count of the two arrays above (count may be 0)
    meta.json        teacher model, weights, preprocessing, dim, extraction settings, counts, format_version, and
                     "complete": true — written last, so its presence marks a finished store

All ``.npy`` files are plain arrays, memory-mapped by readers with ``allow_pickle=False``. While a store is being
written, ``chunks/`` holds ``job.json`` (the settings of the extraction) and one ``<chunk_id>.npz`` per finished chunk
(plain arrays); :meth:`RegionStoreWriter.finalize` joins the chunks and removes the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ovd.utils.io import atomic_path, read_json, write_json

__all__ = ["FORMAT_VERSION", "RegionStore", "RegionStoreWriter", "merge_stores"]

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
BOXES_FILE = "boxes.npy"
INDEX_FILE = "index.npy"
META_FILE = "meta.json"
CHUNK_DIR = "chunks"
JOB_FILE = "job.json"
# meta.json keys written by the store itself; everything else is the extraction's job description.
_COUNT_KEYS = ("num_images", "num_regions", "num_images_without_regions")
_STORE_KEYS = ("format_version", *_COUNT_KEYS, "complete")

# One block of consecutive images: (image_ids int64 [n], counts int64 [n], boxes float32 [r, 4], embeds float16 [r, D]).
_Block = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class RegionStore:
    """Read access to a finished store. Open with :meth:`open`; the arrays are memory-mapped on first use in each
    process, so a store pickles cheaply into DataLoader workers."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self._meta = meta
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        expected_model: str | None = None,
        expected_dim: int | None = None,
    ) -> RegionStore:
        """Open and validate a store.

        Args:
            expected_model: the CLIP model name the embeddings must come from (as given to the extractor).
            expected_dim: the embedding size D the caller needs.

        Raises:
            FileNotFoundError: no such folder, or it holds no store (no ``meta.json``) or misses an array file.
            ValueError: the store is incomplete (interrupted extraction), of another format version, made with another
                model or dim (both values named), or an array file is truncated or disagrees with ``meta.json`` or
                with the other arrays (the file named).
        """
        path = Path(path)
        meta = _read_meta(path)
        if expected_model is not None and meta["model_name"] != expected_model:
            raise ValueError(
                f"region store {path} holds embeddings of CLIP model {meta['model_name']!r}, "
                f"but model {expected_model!r} is expected"
            )
        if expected_dim is not None and meta["dim"] != expected_dim:
            raise ValueError(
                f"region store {path} holds embeddings of dim {meta['dim']}, but dim {expected_dim} is expected"
            )
        store = cls(path, meta)
        store._load()
        return store

    @property
    def meta(self) -> dict[str, Any]:
        """The content of ``meta.json``."""
        return self._meta

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def num_regions(self) -> int:
        return int(self._meta["num_regions"])

    @property
    def image_ids(self) -> np.ndarray:
        """int64 [N], increasing: every image of the store, those with 0 regions included."""
        return self._load()[2][:, 0]

    def __len__(self) -> int:
        return int(self._meta["num_images"])

    def __contains__(self, image_id: int) -> bool:
        return self._row(image_id) is not None

    def get(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes float32 [k, 4] xyxy original pixels, embeds float32 [k, D])``, fresh arrays; ``k = 0`` for an image
        with no regions or not in the store (check with ``in`` where that matters)."""
        embeds, boxes, index = self._load()
        row = self._row(image_id)
        if row is None:
            return np.zeros((0, 4), np.float32), np.zeros((0, self.dim), np.float32)
        start, count = int(index[row, 1]), int(index[row, 2])
        return np.array(boxes[start : start + count]), embeds[start : start + count].astype(np.float32)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps do not pickle (and would copy the arrays if they did); each worker maps the files itself.
        return {"path": self.path, "_meta": self._meta, "_arrays": None}

    def __repr__(self) -> str:
        return f"RegionStore({str(self.path)!r}, images={len(self)}, regions={self.num_regions}, dim={self.dim})"

    def _row(self, image_id: int) -> int | None:
        ids = self._load()[2][:, 0]
        row = int(np.searchsorted(ids, image_id))
        return row if row < len(ids) and ids[row] == image_id else None

    def _load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = _open_arrays(self.path, self._meta)
        return self._arrays


class RegionStoreWriter:
    """Writes a store chunk by chunk so an interrupted extraction resumes where it stopped.

    The caller splits its images into chunks with fixed ids and contents, skips those :meth:`has_chunk` reports,
    writes the others with :meth:`write_chunk` (each file atomically, so a kill leaves whole chunks only) and calls
    :meth:`finalize`. ``job`` (JSON-able: model, weights, preprocessing, ``dim``, extraction settings and inputs) goes
    into ``meta.json``; resuming with a different job is refused, so chunks of two settings never mix.
    """

    def __init__(self, path: str | os.PathLike, *, job: Mapping[str, Any], overwrite: bool = False) -> None:
        """
        Args:
            path: the store folder; created if needed.
            job: must hold ``model_name`` and ``dim``, and none of the keys the store writes itself.
            overwrite: discard a finished store or partial extraction in ``path`` made with another job.

        Raises:
            FileExistsError: ``path`` holds a store or partial extraction of another job (the differing settings
                named), or files that are not a store, and ``overwrite`` is False.
        """
        self.path = Path(path)
        self.job: dict[str, Any] = json.loads(json.dumps(dict(job)))
        missing = {"model_name", "dim"} - set(self.job)
        clashing = set(_STORE_KEYS) & set(self.job)
        if missing or clashing:
            raise ValueError(f"region store job needs model_name and dim and may not set {_STORE_KEYS}; "
                             f"missing {sorted(missing)}, clashing {sorted(clashing)}")
        self._chunk_dir = self.path / CHUNK_DIR
        meta_path = self.path / META_FILE
        self.complete = False
        if meta_path.is_file():
            meta = read_json(meta_path, what="region store metadata")
            finished = meta.get("complete") is True and meta.get("format_version") == FORMAT_VERSION
            if finished and _job_of(meta) == self.job:
                self.complete = True
                # A kill between meta.json and the clean-up leaves the chunks behind.
                shutil.rmtree(self._chunk_dir, ignore_errors=True)
                return
            if not overwrite:
                raise FileExistsError(
                    f"{self.path} holds a region store made with other settings ({_diff(_job_of(meta), self.job)}); "
                    "pass overwrite=True (--overwrite) or choose another folder"
                )
            _remove_store(self.path)
        job_path = self._chunk_dir / JOB_FILE
        if job_path.is_file():
            old = read_json(job_path, what="region store job")
            if old != self.job:
                if not overwrite:
                    raise FileExistsError(
                        f"{self.path} holds a partial extraction with other settings ({_diff(old, self.job)}); "
                        "pass overwrite=True (--overwrite) to discard it, or choose another folder"
                    )
                shutil.rmtree(self._chunk_dir)
        elif self.path.is_dir() and any(p.name != CHUNK_DIR for p in self.path.iterdir()) and not overwrite:
            raise FileExistsError(f"{self.path} is not empty and holds no region store; choose another folder")
        if not job_path.is_file():
            # A chunk folder without its job file predates any chunk (killed while starting): nothing to keep.
            shutil.rmtree(self._chunk_dir, ignore_errors=True)
            write_json(job_path, self.job, indent=2)
        _remove_temporaries(self.path)

    def has_chunk(self, chunk_id: int) -> bool:
        return self._chunk_path(chunk_id).is_file()

    def write_chunk(
        self,
        chunk_id: int,
        *,
        image_ids: np.ndarray,
        counts: np.ndarray,
        boxes: np.ndarray,
        embeds: np.ndarray,
    ) -> None:
        """Store one chunk atomically.

        Args:
            image_ids: int [n], increasing, and above those of every lower chunk id.
            counts: int [n], regions per image (0 allowed).
            boxes: float [sum(counts), 4] xyxy, images in order.
            embeds: float [sum(counts), D], L2-normalised; stored as float16.
        """
        image_ids = np.asarray(image_ids, np.int64).reshape(-1)
        counts = np.asarray(counts, np.int64).reshape(-1)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        embeds = np.asarray(embeds).astype(np.float16)
        total = int(counts.sum())
        if len(counts) != len(image_ids) or len(boxes) != total or embeds.shape != (total, self.job["dim"]):
            raise ValueError(
                f"chunk {chunk_id}: {len(image_ids)} image ids, {len(counts)} counts summing to {total}, boxes "
                f"{boxes.shape}, embeds {embeds.shape} (expected [{total}, {self.job['dim']}])"
            )
        with atomic_path(self._chunk_path(chunk_id)) as tmp, open(tmp, "wb") as f:
            np.savez(f, image_ids=image_ids, counts=counts, boxes=boxes, embeds=embeds)

    def finalize(self, chunk_ids: Sequence[int]) -> RegionStore:
        """Join chunks ``chunk_ids`` (in this order) into the final arrays, write ``meta.json`` last, remove the chunks.

        Raises:
            ValueError: a chunk is missing or unreadable, or image ids are not increasing across chunks.
        """
        if self.complete:
            return RegionStore.open(self.path)
        missing = [k for k in chunk_ids if not self.has_chunk(k)]
        if missing:
            raise ValueError(f"{self.path}: cannot finalize, chunks {missing[:10]} are not written")
        counts = [self._read_chunk(k, ("counts",))[0] for k in chunk_ids]

        def blocks() -> Iterator[_Block]:
            for k in chunk_ids:
                yield self._read_chunk(k, ("image_ids", "counts", "boxes", "embeds"))

        _write_store(self.path, blocks(), sum(len(c) for c in counts), int(sum(c.sum() for c in counts)), self.job)
        shutil.rmtree(self._chunk_dir)
        self.complete = True
        return RegionStore.open(self.path)

    def _chunk_path(self, chunk_id: int) -> Path:
        return self._chunk_dir / f"{chunk_id:06d}.npz"

    def _read_chunk(self, chunk_id: int, keys: Sequence[str]) -> list[np.ndarray]:
        path = self._chunk_path(chunk_id)
        try:
            with np.load(path, allow_pickle=False) as data:
                return [data[k] for k in keys]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"region store chunk {path} is unreadable ({e}); delete it and run again") from None


def merge_stores(
    shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike, *, overwrite: bool = False
) -> RegionStore:
    """Join the stores of ``--shard i/n`` extractions (all n of them) into one store at ``out_path``.

    The result is what one unsharded extraction with the same settings writes: rows sorted by image id, and a
    ``meta.json`` with ``shard: null`` and summed counts.

    Raises:
        ValueError: a store is not a shard, shards are missing or repeated, their settings differ (key and values
            named), or two shards hold the same image id.
        FileExistsError: ``out_path`` holds a store and ``overwrite`` is False.
    """
    if not shard_paths:
        raise ValueError("merge_stores needs at least one shard")
    stores = [RegionStore.open(p) for p in shard_paths]
    shards = [s.meta.get("shard") for s in stores]
    for store, shard in zip(stores, shards):
        if not (isinstance(shard, list) and len(shard) == 2):
            raise ValueError(f"{store.path} is not a shard of an extraction (its meta.json has shard={shard!r})")
    num_shards = shards[0][1]
    have = sorted(i for i, _ in shards)
    if any(n != num_shards for _, n in shards) or have != list(range(num_shards)):
        raise ValueError(
            f"merge needs each of the shards 0..{num_shards - 1} of one extraction exactly once; got "
            + ", ".join(f"{i}/{n} ({s.path})" for (i, n), s in zip(shards, stores))
        )
    job = {**_job_of(stores[0].meta), "shard": None}
    for store in stores[1:]:
        other = {**_job_of(store.meta), "shard": None}
        if other != job:
            raise ValueError(f"shards {stores[0].path} and {store.path} differ: {_diff(job, other)}")

    # (image_id, start, count, store) for every image, sorted by image id.
    rows = np.concatenate([
        np.concatenate([s._load()[2], np.full((len(s), 1), k, np.int64)], axis=1) for k, s in enumerate(stores)
    ])
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    duplicated = rows[1:, 0][rows[1:, 0] == rows[:-1, 0]]
    if len(duplicated):
        raise ValueError(f"shards overlap: image ids {np.unique(duplicated)[:10].tolist()} are in more than one")

    out_path = Path(out_path)
    if (out_path / META_FILE).exists():
        if not overwrite:
            raise FileExistsError(f"{out_path} already holds a region store; pass overwrite=True (--overwrite)")
        _remove_store(out_path)

    def blocks() -> Iterator[_Block]:
        # Runs of images that are consecutive in one shard are copied as one slice.
        breaks = np.flatnonzero((rows[1:, 3] != rows[:-1, 3]) | (rows[1:, 1] != rows[:-1, 1] + rows[:-1, 2])) + 1
        for run in np.split(rows, breaks) if len(rows) else []:
            embeds, boxes, _ = stores[int(run[0, 3])]._load()
            start, stop = int(run[0, 1]), int(run[-1, 1] + run[-1, 2])
            yield run[:, 0], run[:, 2], boxes[start:stop], embeds[start:stop]

    _write_store(out_path, blocks(), len(rows), int(rows[:, 2].sum()), job)
    return RegionStore.open(out_path)


def _write_store(path: Path, blocks: Iterable[_Block], num_images: int, num_regions: int, job: dict[str, Any]) -> None:
    """Stream ``blocks`` (images in increasing id order) into the final arrays, then write ``meta.json``."""
    dim = int(job["dim"])
    (path / META_FILE).unlink(missing_ok=True)
    ids, counts = [], []
    with atomic_path(path / EMBEDDINGS_FILE) as emb_tmp, atomic_path(path / BOXES_FILE) as box_tmp, \
            open(emb_tmp, "wb") as emb_file, open(box_tmp, "wb") as box_file:
        # The header first, then raw rows: what np.save writes, without holding the arrays in memory.
        _write_npy_header(emb_file, np.float16, (num_regions, dim))
        _write_npy_header(box_file, np.float32, (num_regions, 4))
        for block_ids, block_counts, boxes, embeds in blocks:
            emb_file.write(np.ascontiguousarray(embeds, np.float16).tobytes())
            box_file.write(np.ascontiguousarray(boxes, np.float32).tobytes())
            ids.append(block_ids)
            counts.append(block_counts)
    image_ids = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    counts_all = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)
    if len(image_ids) != num_images or counts_all.sum() != num_regions:
        raise ValueError(f"{path}: wrote {len(image_ids)} images / {counts_all.sum()} regions, "
                         f"expected {num_images} / {num_regions}")
    if (np.diff(image_ids) <= 0).any():
        raise ValueError(f"{path}: image ids are not increasing across chunks; the chunks belong to different runs")
    starts = np.concatenate([[0], np.cumsum(counts_all)[:-1]]).astype(np.int64)[: len(counts_all)]
    with atomic_path(path / INDEX_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, np.stack([image_ids, starts, counts_all], axis=1), allow_pickle=False)
    meta = {
        "format_version": FORMAT_VERSION,
        **job,
        "num_images": num_images,
        "num_regions": num_regions,
        "num_images_without_regions": int((counts_all == 0).sum()),
        "complete": True,
    }
    write_json(path / META_FILE, meta, indent=2)


def _write_npy_header(f: Any, dtype: type, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        if (path / CHUNK_DIR).is_dir():
            raise ValueError(
                f"region store {path} is incomplete (an extraction was interrupted); run it again to resume"
            )
        if not path.is_dir():
            raise FileNotFoundError(f"region store not found: {path}")
        raise FileNotFoundError(f"{path} is not a region store: it has no {META_FILE}")
    meta = read_json(meta_path, what="region store metadata")
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        raise ValueError(
            f"region store {path} is incomplete: {meta_path} is not marked complete; run the extractor again"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"region store {path} has format_version {meta.get('format_version')!r}; "
                         f"this code reads version {FORMAT_VERSION}")
    missing = [k for k in ("model_name", "dim", "num_images", "num_regions") if k not in meta]
    if missing:
        raise ValueError(f"region store metadata {meta_path} lacks {missing}; extract the store again")
    return meta


def _open_arrays(path: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(embeds memmap float16 [R, D], boxes memmap float32 [R, 4], index int64 [N, 3])``, checked against meta and
    each other."""
    num_regions, num_images, dim = int(meta["num_regions"]), int(meta["num_images"]), int(meta["dim"])
    embeds = _open_npy(path / EMBEDDINGS_FILE, np.float16, (num_regions, dim))
    boxes = _open_npy(path / BOXES_FILE, np.float32, (num_regions, 4))
    index = np.array(_open_npy(path / INDEX_FILE, np.int64, (num_images, 3)))
    ids, starts, counts = index.T
    expected_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[:num_images]
    if (np.diff(ids) <= 0).any() or (counts < 0).any() or not np.array_equal(starts, expected_starts) \
            or counts.sum() != num_regions:
        raise ValueError(f"region store index {path / INDEX_FILE} is inconsistent (ids not increasing, or rows not "
                         f"contiguous, or counts not summing to {num_regions} regions)")
    return embeds, boxes, index


def _open_npy(file: Path, dtype: type, shape: tuple[int, int]) -> np.ndarray:
    if not file.is_file():
        raise FileNotFoundError(f"region store file missing: {file}")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"region store file {file} is truncated or corrupt ({e}); extract the store again") from None
    if array.dtype != dtype or array.shape != shape:
        raise ValueError(f"region store file {file} holds {array.dtype} {list(array.shape)}, but {META_FILE} says "
                         f"{np.dtype(dtype)} {list(shape)}")
    return array


def _job_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in _STORE_KEYS}


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} (existing) vs {new.get(k)!r} (requested)" for k in keys)


def _remove_store(path: Path) -> None:
    (path / META_FILE).unlink(missing_ok=True)
    for name in (EMBEDDINGS_FILE, BOXES_FILE, INDEX_FILE):
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / CHUNK_DIR, ignore_errors=True)
    _remove_temporaries(path)


def _remove_temporaries(path: Path) -> None:
    """Delete what a killed process left of its atomic writes (``atomic_path`` names them ``.<name>.*.tmp``)."""
    for folder in (path, path / CHUNK_DIR):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
