"""Data loaders built from the config: the only place in `ovd.data` that reads it."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ovd.config import Config
from ovd.data.catalog import get_dataset
from ovd.data.datasets import DetectionDataset, load_coco_json
from ovd.data.mapper import DatasetMapper
from ovd.data.region_store import RegionStore
from ovd.data.samplers import InferenceBatchSampler, TrainingBatchSampler
from ovd.structures import ImageSample


class MappedDataset(Dataset):
    """Records mapped on access; an index is ``(record_index, augmentation_seed or None)``."""

    def __init__(self, dataset: DetectionDataset, mapper: DatasetMapper) -> None:
        self.dataset, self.mapper = dataset, mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: tuple[int, int | None]) -> ImageSample:
        i, seed = index
        rng = np.random.default_rng(seed) if seed is not None else None
        return self.mapper(self.dataset.records[i], rng)


def _as_list(batch: list[ImageSample]) -> list[ImageSample]:
    return batch


def load_dataset(name: str) -> DetectionDataset:
    return load_coco_json(get_dataset(name))


def load_train_dataset(cfg: Config) -> DetectionDataset:
    """The box-labelled training set (DATASETS.TRAIN[0]); empty images dropped if FILTER_EMPTY_ANNOTATIONS."""
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty")
    dataset = load_dataset(cfg.DATASETS.TRAIN[0])
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        dataset.records = [r for r in dataset.records if len(r.boxes)]
        if not dataset.records:
            raise ValueError(f"dataset {dataset.name}: no image has annotations ({dataset.json_file})")
    return dataset


def open_region_store(cfg: Config, *, expected_model: str | None = None) -> RegionStore:
    """The RKD region store of MODEL.RKD_FEAT_PATH, checked against the classifier's embedding size (and the
    teacher model that made the text embeddings, where known)."""
    if not cfg.MODEL.RKD_FEAT_PATH:
        raise ValueError("MODEL.DISTILLATION is on but MODEL.RKD_FEAT_PATH (the region-embedding store) is empty")
    try:
        return RegionStore.open(cfg.MODEL.RKD_FEAT_PATH, expected_model=expected_model,
                                expected_dim=cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"MODEL.RKD_FEAT_PATH: {e}") from None


def build_train_loader(
    cfg: Config,
    dataset: DetectionDataset,
    *,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    region_store: RegionStore | None = None,
) -> DataLoader:
    """Endless loader of lists of `ImageSample` (IMS_PER_BATCH / world_size per rank), resumable at ``start_iter``;
    with ``region_store``, each sample carries its distillation regions."""
    mapper = DatasetMapper(
        is_train=True,
        min_sizes=cfg.INPUT.MIN_SIZE_TRAIN,
        max_size=cfg.INPUT.MAX_SIZE_TRAIN,
        size_sampling=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
        random_flip=cfg.INPUT.RANDOM_FLIP == "horizontal",
        input_format=cfg.INPUT.FORMAT,
        category_ids=dataset.category_ids,
        region_store=region_store,
        num_regions=cfg.MODEL.NUM_DISTIL_PROP,
    )
    sampler = TrainingBatchSampler(
        len(dataset),
        batch_size=cfg.SOLVER.IMS_PER_BATCH,
        seed=cfg.SEED,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
    )
    return _loader(MappedDataset(dataset, mapper), sampler, cfg.DATALOADER.NUM_WORKERS)


def build_test_loader(
    cfg: Config, dataset: DetectionDataset, *, rank: int = 0, world_size: int = 1, region_store: RegionStore | None = None
) -> DataLoader:
    mapper = DatasetMapper(
        is_train=False,
        min_sizes=[cfg.INPUT.MIN_SIZE_TEST],
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        input_format=cfg.INPUT.FORMAT,
        category_ids=dataset.category_ids,
        region_store=region_store,
        num_regions=cfg.MODEL.NUM_DISTIL_PROP,
    )
    sampler = InferenceBatchSampler(len(dataset), batch_size=cfg.TEST.IMS_PER_BATCH, rank=rank, world_size=world_size)
    return _loader(MappedDataset(dataset, mapper), sampler, cfg.DATALOADER.NUM_WORKERS)


def _loader(dataset: Dataset, batch_sampler, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=_as_list,
        persistent_workers=False,
        # a private generator: creating the iterator must not consume the global RNG that the model's
        # proposal sampling uses (exact resume); augmentation seeds come with the indices
        generator=torch.Generator(),
    )
