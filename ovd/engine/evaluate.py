"""Evaluation of a detector on the datasets of DATASETS.TEST, with per-dataset vocabularies."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ovd.clip.text import load_text_embeddings
from ovd.config import Config
from ovd.data.build import build_test_loader, load_dataset
from ovd.data.datasets import DetectionDataset
from ovd.evaluation import COCOEvaluator, format_results_table
from ovd.modeling.detector import OVDetector
from ovd.utils.comm import get_rank, get_world_size

logger = logging.getLogger("ovd.eval")


def test_vocabulary(cfg: Config, dataset: DetectionDataset) -> torch.Tensor:
    """Text embeddings (Tensor[C, D]) for the classes of ``dataset``, checked against its category count."""
    path = cfg.MODEL.TEST_ZEROSHOT_WEIGHT_PATH or cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH
    key = "MODEL.TEST_ZEROSHOT_WEIGHT_PATH" if cfg.MODEL.TEST_ZEROSHOT_WEIGHT_PATH else "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH"
    if not path:
        raise ValueError(f"{key} is empty: evaluation needs text embeddings of the {dataset.name} classes")
    try:
        emb = load_text_embeddings(path, expected_names=dataset.class_names)
    except ValueError as e:
        raise ValueError(f"{key}: {e} (dataset {dataset.name}, {dataset.json_file})") from None
    return torch.from_numpy(emb.embeds)


@torch.no_grad()
def evaluate_dataset(cfg: Config, model: OVDetector, dataset: DetectionDataset, output_dir: Path) -> dict:
    """Run ``model`` on every image of ``dataset`` (split across workers) and return the COCO metrics."""
    rank, world = get_rank(), get_world_size()
    train_vocab = model.roi_heads.box_predictor.cls_score.text_embeds.clone()
    model.set_vocabulary(test_vocabulary(cfg, dataset))
    evaluator = COCOEvaluator(dataset.json_file, novel_category_ids=dataset.novel_category_ids, output_dir=output_dir)
    loader = build_test_loader(cfg, dataset, rank=rank, world_size=world)
    was_training = model.training
    model.eval()
    t0, n = time.perf_counter(), 0
    try:
        for batch in loader:
            for sample, result in zip(batch, model.predict(batch)):
                cats = torch.tensor(dataset.category_ids)[result.pred_classes.cpu()]
                evaluator.add(sample.image_id, result.pred_boxes.cpu(), result.scores.cpu(), cats)
                n += 1
    finally:
        model.set_vocabulary(train_vocab)
        model.train(was_training)
    dt = time.perf_counter() - t0
    logger.info("inference on %s: %d images on this worker in %.1f s (%.1f ms/image)", dataset.name, n, dt, 1e3 * dt / max(n, 1))
    results = evaluator.evaluate()
    if rank == 0:
        logger.info("\n%s", format_results_table(results, title=f"{dataset.name} (bbox)"))
    return results


def evaluate(cfg: Config, model: OVDetector) -> dict[str, dict]:
    """Metrics per dataset of DATASETS.TEST; detections are written to OUTPUT_DIR/inference/<dataset>/."""
    out = {}
    for name in cfg.DATASETS.TEST:
        dataset = load_dataset(name)
        out[name] = evaluate_dataset(cfg, model, dataset, Path(cfg.OUTPUT_DIR) / "inference" / name)
    return out
