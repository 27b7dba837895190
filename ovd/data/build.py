"""Datasets and data loaders built from the config: the only place in `ovd.data` that reads it."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ovd.config import Config
from ovd.data.catalog import ANN_TYPES, dataset_ann_type, get_dataset
from ovd.data.datasets import DetectionDataset, load_coco_json, load_image_labels
from ovd.data.mapper import DatasetMapper
from ovd.data.region_store import RegionStore
from ovd.data.samplers import InferenceBatchSampler, MultiSourceBatchSampler, repeat_factors
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


class MultiSourceDataset(Dataset):
    """Several `MappedDataset`s addressed as ``(source, record_index, augmentation_seed)``."""

    def __init__(self, sources: list[MappedDataset]) -> None:
        self.sources = sources

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, index: tuple[int, int, int]) -> ImageSample:
        k, i, seed = index
        return self.sources[k][(i, seed)]


def _as_list(batch: list[ImageSample]) -> list[ImageSample]:
    return batch


def load_dataset(name: str, *, with_masks: bool = False) -> DetectionDataset:
    return load_coco_json(get_dataset(name), with_masks=with_masks)


def train_ann_types(cfg: Config) -> list[str]:
    """The annotation type of each DATASETS.TRAIN entry (DATALOADER.DATASET_ANN; default: each dataset's own)."""
    types = list(cfg.DATALOADER.DATASET_ANN) or [dataset_ann_type(name) for name in cfg.DATASETS.TRAIN]
    if len(types) != len(cfg.DATASETS.TRAIN):
        raise ValueError(f"DATALOADER.DATASET_ANN has {len(types)} entries for {len(cfg.DATASETS.TRAIN)} DATASETS.TRAIN")
    bad = [t for t in types if t not in ANN_TYPES]
    if bad:
        raise ValueError(f"DATALOADER.DATASET_ANN: unknown annotation type(s) {bad}; expected one of {ANN_TYPES}")
    return types


def load_train_datasets(cfg: Config) -> list[DetectionDataset]:
    """The training sources of DATASETS.TRAIN, box-labelled or image-labelled, over one shared vocabulary."""
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty")
    datasets = []
    for name, ann in zip(cfg.DATASETS.TRAIN, train_ann_types(cfg)):
        if ann == "image":
            if not cfg.MODEL.PIS_PROP_PATH:
                raise ValueError(f"dataset {name} is image-labelled but MODEL.PIS_PROP_PATH (its pseudo boxes) is empty")
            dataset = load_image_labels(get_dataset(name), cfg.MODEL.PIS_PROP_PATH)
        else:
            dataset = load_dataset(name, with_masks=cfg.MODEL.MASK_ON)
            if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
                dataset.records = [r for r in dataset.records if len(r.boxes)]
                if not dataset.records:
                    raise ValueError(f"dataset {dataset.name}: no image has annotations ({dataset.json_file})")
        if datasets and dataset.category_ids != datasets[0].category_ids:
            raise ValueError(f"datasets {datasets[0].name} and {dataset.name} have different categories; training "
                             "sources must share one vocabulary")
        datasets.append(dataset)
    return datasets


def open_region_store(path: str, cfg: Config, *, key: str, expected_model: str | None = None) -> RegionStore:
    """A region-embedding store checked against the classifier's embedding size (and the teacher model that made
    the text embeddings, where known); errors name the config key."""
    if not path:
        raise ValueError(f"MODEL.DISTILLATION is on but {key} (the region-embedding store) is empty")
    try:
        return RegionStore.open(path, expected_model=expected_model, expected_dim=cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{key}: {e}") from None


def build_train_loader(
    cfg: Config,
    datasets: list[DetectionDataset],
    *,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    region_stores: list[RegionStore | None] | None = None,
) -> DataLoader:
    """Endless loader of lists of `ImageSample`, each batch from one source (DATALOADER.DATASET_RATIO), resumable
    at ``start_iter``; with ``region_stores`` (one per source), samples carry their distillation regions."""
    d = cfg.DATALOADER
    n = len(datasets)
    per_source = {"DATASET_RATIO": d.DATASET_RATIO, "DATASET_BS": d.DATASET_BS,
                  "DATASET_MIN_SIZES": d.DATASET_MIN_SIZES, "DATASET_MAX_SIZES": d.DATASET_MAX_SIZES}
    for key, values in per_source.items():
        if values and len(values) != n:
            raise ValueError(f"DATALOADER.{key} has {len(values)} entries for {n} training datasets")
    if not d.DATASET_BS and cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by {world_size} workers")
    batch_sizes = list(d.DATASET_BS) or [cfg.SOLVER.IMS_PER_BATCH // world_size] * n
    stores = region_stores or [None] * n
    sources = []
    for k, (dataset, ann) in enumerate(zip(datasets, train_ann_types(cfg))):
        mapper = DatasetMapper(
            is_train=True,
            min_sizes=d.DATASET_MIN_SIZES[k] if d.DATASET_MIN_SIZES else cfg.INPUT.MIN_SIZE_TRAIN,
            max_size=d.DATASET_MAX_SIZES[k] if d.DATASET_MAX_SIZES else cfg.INPUT.MAX_SIZE_TRAIN,
            size_sampling=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            random_flip=cfg.INPUT.RANDOM_FLIP == "horizontal",
            input_format=cfg.INPUT.FORMAT,
            category_ids=dataset.category_ids,
            region_store=stores[k],
            num_regions=cfg.MODEL.NUM_DISTIL_PROP,
            image_labelled=ann == "image",
        )
        sources.append(MappedDataset(dataset, mapper))
    samplers = ("TrainingSampler", "RepeatFactorTrainingSampler")
    if d.SAMPLER_TRAIN not in samplers:
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN must be one of {samplers}, got {d.SAMPLER_TRAIN!r}")
    factors = [
        repeat_factors([r.category_ids for r in ds.records], d.REPEAT_THRESHOLD)
        if d.SAMPLER_TRAIN == "RepeatFactorTrainingSampler" and ann == "box" else None
        for ds, ann in zip(datasets, train_ann_types(cfg))
    ]
    sampler = MultiSourceBatchSampler(
        [len(ds) for ds in datasets],
        ratios=list(d.DATASET_RATIO) or [1.0] * n,
        batch_sizes=batch_sizes,
        seed=cfg.SEED,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
        repeat_factors=factors,
    )
    return _loader(MultiSourceDataset(sources), sampler, d.NUM_WORKERS)


def build_test_mapper(cfg: Config, dataset: DetectionDataset, *, region_store: RegionStore | None = None) -> DatasetMapper:
    """The test-time mapper of ``cfg``: INPUT.MIN/MAX_SIZE_TEST resize, INPUT.FORMAT, no flip."""
    return DatasetMapper(
        is_train=False,
        min_sizes=[cfg.INPUT.MIN_SIZE_TEST],
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        input_format=cfg.INPUT.FORMAT,
        category_ids=dataset.category_ids,
        region_store=region_store,
        num_regions=cfg.MODEL.NUM_DISTIL_PROP,
    )


def build_test_loader(
    cfg: Config, dataset: DetectionDataset, *, rank: int = 0, world_size: int = 1, region_store: RegionStore | None = None
) -> DataLoader:
    mapper = build_test_mapper(cfg, dataset, region_store=region_store)
    sampler = InferenceBatchSampler(len(dataset), batch_size=cfg.TEST.IMS_PER_BATCH, rank=rank, world_size=world_size)
    return _loader(MappedDataset(dataset, mapper), sampler, cfg.DATALOADER.NUM_WORKERS)


def _loader(dataset: Dataset, batch_sampler, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=_as_list,
        # a private generator: creating the iterator must not consume the global RNG that the model's
        # proposal sampling uses (exact resume); augmentation seeds come with the indices
        generator=torch.Generator(),
    )
