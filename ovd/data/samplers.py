"""Batch samplers. Training: an endless, seeded stream that a run resumes at any iteration and DDP ranks split.

The global stream is the concatenation of seeded permutations of the dataset (one per epoch); iteration ``i``
takes positions ``[i·B, (i+1)·B)`` of it, rank ``r`` the slice ``[r·b, (r+1)·b)`` of those (b = B / world size).
Each item carries an augmentation seed derived from (seed, position), so an image's augmentation does not depend
on the worker, the world size or where the run was resumed.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class TrainingBatchSampler(Sampler):
    """Yields lists of ``(dataset_index, augmentation_seed)`` from iteration ``start_iter`` on, forever."""

    def __init__(
        self, size: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_iter: int = 0
    ) -> None:
        if size <= 0:
            raise ValueError("the training dataset is empty")
        if batch_size % world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH={batch_size} is not divisible by the number of workers {world_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
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
