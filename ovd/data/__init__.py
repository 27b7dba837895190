"""Datasets, images and vocabularies: what the layers above (engine, inference, tools) ask of `ovd.data` by name.

Where each idea lives: `catalog` (dataset names → files, DATASETS.CUSTOM), `datasets` (COCO and image-label files →
records), `images` (the image reader and the train/test resize), `mapper` (record → model input), `build` (loaders
from the config), `samplers`, `proposals` (proposal files), `region_store` (RKD targets on disk), `vocabularies`
(named class lists), `ov_splits` (the COCO/LVIS open-vocabulary splits), `shapes` (the synthetic world).
"""

from ovd.data.catalog import DatasetSpec, get_dataset, register_config_datasets, register_dataset
from ovd.data.datasets import DetectionDataset, ImageRecord, load_coco_json, load_image_labels
from ovd.data.images import ResizeFlip, read_image, shortest_edge_size, test_transform
from ovd.data.proposals import Proposals, load_proposals, save_proposals
from ovd.data.vocabularies import VOCABULARY_NAMES, named_vocabulary

__all__ = [
    "VOCABULARY_NAMES",
    "DatasetSpec",
    "DetectionDataset",
    "ImageRecord",
    "Proposals",
    "ResizeFlip",
    "get_dataset",
    "load_coco_json",
    "load_image_labels",
    "load_proposals",
    "named_vocabulary",
    "read_image",
    "register_config_datasets",
    "register_dataset",
    "save_proposals",
    "shortest_edge_size",
    "test_transform",
]
