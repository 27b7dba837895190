"""Batch samplers. Training: an endless, seeded stream that a run resumes at any iteration and DDP ranks split.

The global stream is the concatenation of seeded permutations of the dataset (one per epoch); iteration ``i``
takes positions ``[i·B, (i+1)·B)`` of it, rank ``r`` the slice ``[r·b, (r+1)·b)`` of those (b = B / world size).
Each item carries an augmentation seed derived from (seed, position), so an image's augmentation does not depend
on the worker, the world size or where the run was resumed.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class TrainingBatchSampler(Sampler):
    """Yields lists of ``(dataset_index, augmentation_seed)`` from iteration ``start_iter`` on, forever."""

    def __init__(
        self,
        size: int,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
        repeat_factors: np.ndarray | None = None,
    ) -> None:
        if size <= 0:
            raise ValueError("the training dataset is empty")
        if batch_size % world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH={batch_size} is not divisible by the number of workers {world_size}")
        if repeat_factors is not None and (len(repeat_factors) != size or (np.asarray(repeat_factors) < 1).any()):
            raise ValueError(f"repeat factors must be one per image (got {len(repeat_factors)} for {size}) and >= 1")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter
        self.repeat_factors = None if repeat_factors is None else torch.as_tensor(repeat_factors, dtype=torch.float64)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)
        self._epoch_starts = [0]  # position where each epoch begins; epochs vary in length with repeat factors

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The dataset indices of one epoch in their seeded order: a permutation, or with repeat factors each
        image ``floor(r)`` times plus once more with probability ``r - floor(r)`` (detectron2's stochastic
        rounding, drawn anew each epoch), shuffled."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.repeat_factors is None:
            return torch.randperm(self.size, generator=g)
        r = self.repeat_factors
        reps = r.floor() + (torch.rand(self.size, generator=g, dtype=torch.float64) < r - r.floor())
        indices = torch.repeat_interleave(torch.arange(self.size), reps.to(torch.int64))
        return indices[torch.randperm(len(indices), generator=g)]

    def index_at(self, position: int) -> int:
        if self.repeat_factors is None:
            epoch, offset = divmod(position, self.size)
        else:
            while self._epoch_starts[-1] <= position:
                self._epoch_starts.append(self._epoch_starts[-1] + len(self._epoch_order(len(self._epoch_starts) - 1)))
            epoch = int(np.searchsorted(self._epoch_starts, position, side="right")) - 1
            offset = position - self._epoch_starts[epoch]
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self._epoch_order(epoch)
        return int(self._perm[offset])

    def batch_at(self, iteration: int) -> list[tuple[int, int]]:
        per_rank = self.batch_size // self.world_size
        start = iteration * self.batch_size + self.rank * per_rank
        return [(self.index_at(p), self.seed * 1_000_003 + p) for p in range(start, start + per_rank)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it = self.start_iter
        while True:
            yield self.batch_at(it)
            it += 1


class InferenceBatchSampler(Sampler):
    """Each image once, in order, split across ranks (rank r takes images r, r + world, …)."""

    def __init__(self, size: int, *, batch_size: int = 1, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[tuple[int, None]]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield [(j, None) for j in self.indices[i : i + self.batch_size]]

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size


class MultiSourceBatchSampler(Sampler):
    """Batches from several datasets, each batch from one source, so that the sources supply *images* in
    proportion to ``ratios`` — the original code's meaning (Detic's multi-dataset sampler draws images by ratio and
    groups them into per-source batches): a batch comes from source k with probability ∝ ratio_k / batch_size_k.
    The paper's 1:4 with 2 and 8 images per batch is one box batch per image-labelled batch.
    Yields lists of ``(source, index, augmentation_seed)``.

    The source of iteration ``i`` is the ``i``-th draw of a generator seeded by ``seed``, identical on every rank
    (all workers run the same kind of batch, so DDP sees the same losses); each source keeps its own endless
    stream (`TrainingBatchSampler`), advanced only on its own iterations. Resuming at ``start_iter`` replays the
    draws before it, so the continuation equals an uninterrupted run.
    """

    def __init__(
        self,
        sizes: list[int],
        *,
        ratios: list[float],
        batch_sizes: list[int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
        repeat_factors: list[np.ndarray | None] | None = None,
    ) -> None:
        if not (len(sizes) == len(ratios) == len(batch_sizes)):
            raise ValueError(
                f"{len(sizes)} training datasets but DATALOADER.DATASET_RATIO has {len(ratios)} entries and "
                f"DATALOADER.DATASET_BS {len(batch_sizes)}; give one per dataset"
            )
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError(f"DATALOADER.DATASET_RATIO must be non-negative with a positive sum, got {ratios}")
        factors = repeat_factors or [None] * len(sizes)
        self.streams = [
            TrainingBatchSampler(n, batch_size=b * world_size, seed=seed + 1_000_003 * k, rank=rank,
                                 world_size=world_size, repeat_factors=f)
            for k, (n, b, f) in enumerate(zip(sizes, batch_sizes, factors))
        ]
        if any(b <= 0 for b in batch_sizes):
            raise ValueError(f"DATALOADER.DATASET_BS must be positive, got {batch_sizes}")
        per_batch = np.asarray(ratios, dtype=np.float64) / np.asarray(batch_sizes, dtype=np.float64)
        self.cum = np.cumsum(per_batch / per_batch.sum())
        self.seed, self.start_iter = seed, start_iter

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        rng = np.random.default_rng(self.seed)
        counts = np.bincount(self._sources(rng, self.start_iter), minlength=len(self.streams))
        while True:
            k = int(self._sources(rng, 1)[0])
            yield [(k, i, s) for i, s in self.streams[k].batch_at(int(counts[k]))]
            counts[k] += 1

    def _sources(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cum, rng.random(n), side="right"), len(self.cum) - 1)


def repeat_factors(category_ids_per_image: list[np.ndarray], threshold: float) -> np.ndarray:
    """LVIS repeat-factor sampling (Gupta et al. 2019, detectron2's ``RepeatFactorTrainingSampler``): a category
    seen in a fraction ``f`` of the images gets ``r = max(1, sqrt(threshold / f))``; an image repeats by the
    largest ``r`` of its categories (1 for an image without annotations). Returns float64 [num_images]."""
    if threshold <= 0:
        raise ValueError(f"DATALOADER.REPEAT_THRESHOLD must be positive, got {threshold}")
    num_images = len(category_ids_per_image)
    present = [np.unique(c) for c in category_ids_per_image]
    cats, counts = np.unique(np.concatenate(present) if present else np.zeros(0, np.int64), return_counts=True)
    cat_factor = np.maximum(1.0, np.sqrt(threshold / (counts / num_images)))
    lookup = dict(zip(cats.tolist(), cat_factor.tolist()))
    return np.array([max((lookup[c] for c in p.tolist()), default=1.0) for p in present], dtype=np.float64)
