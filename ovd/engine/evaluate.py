"""Evaluation of a detector on the datasets of DATASETS.TEST, with per-dataset vocabularies."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torchvision.ops import box_iou

from ovd.clip.text import TextEmbeddings, load_text_embeddings
from ovd.config import Config
from ovd.data.build import build_test_loader, load_dataset, open_region_store
from ovd.data.datasets import DetectionDataset
from ovd.evaluation import (
    COCOEvaluator,
    DetectionEvaluator,
    LVISEvaluator,
    distillation_fidelity,
    format_lvis_table,
    format_results_table,
)
from ovd.data.proposals import save_proposals
from ovd.evaluation.proposal_recall import format_recall_table, proposal_recall
from ovd.modeling.detector import ImageModel, OVDetector
from ovd.modeling.proposal_network import ProposalNetwork
from ovd.utils.comm import get_rank, get_world_size

logger = logging.getLogger("ovd.eval")


def dataset_vocabulary(cfg: Config, dataset: DetectionDataset, *, train: bool) -> TextEmbeddings:
    """Text embeddings of the classes of ``dataset``, checked against its categories: the training vocabulary
    (MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH) or the test one (MODEL.TEST_ZEROSHOT_WEIGHT_PATH, else the training one)."""
    key = "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH"
    path = cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH
    if not train and cfg.MODEL.TEST_ZEROSHOT_WEIGHT_PATH:
        key, path = "MODEL.TEST_ZEROSHOT_WEIGHT_PATH", cfg.MODEL.TEST_ZEROSHOT_WEIGHT_PATH
    if not path:
        raise ValueError(f"{key} is empty: the classifier needs text embeddings of the {dataset.name} classes")
    try:
        return load_text_embeddings(path, expected_names=dataset.class_names)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{key}: {e} (dataset {dataset.name}, {dataset.json_file})") from None


@torch.no_grad()
def evaluate_dataset(cfg: Config, model: OVDetector, dataset: DetectionDataset, output_dir: Path) -> dict:
    """Run ``model`` on every image of ``dataset`` (split across workers) and return its metrics: the COCO
    open-vocabulary ones (novel/base/all), or LVIS's (APr/APc/APf) for a file whose categories carry a
    ``frequency``. Box metrics under their names; with MODEL.MASK_ON, mask metrics too, as ``segm/<name>``."""
    rank, world = get_rank(), get_world_size()
    train_vocab = model.roi_heads.box_predictor.cls_score.text_embeds.clone()
    model.set_vocabulary(torch.from_numpy(dataset_vocabulary(cfg, dataset, train=False).embeds))
    evaluators = dataset_evaluators(cfg, dataset, output_dir)
    loader = build_test_loader(cfg, dataset, rank=rank, world_size=world)
    was_training = model.training
    model.eval()
    t0, n = time.perf_counter(), 0
    try:
        for batch in loader:
            for sample, result in zip(batch, model.predict(batch)):
                cats = torch.tensor(dataset.category_ids)[result.pred_classes.cpu()]
                masks = result.pred_masks.cpu() if cfg.MODEL.MASK_ON else None
                for evaluator in evaluators.values():
                    evaluator.add(sample.image_id, result.pred_boxes.cpu(), result.scores.cpu(), cats, masks=masks)
                n += 1
    finally:
        model.set_vocabulary(train_vocab)
        model.train(was_training)
    dt = time.perf_counter() - t0
    logger.info("inference on %s: %d images on this worker in %.1f s (%.1f ms/image)", dataset.name, n, dt, 1e3 * dt / max(n, 1))
    results: dict[str, float] = {}
    for iou_type, evaluator in evaluators.items():
        metrics = evaluator.evaluate()
        if rank == 0:
            table = format_lvis_table if isinstance(evaluator, LVISEvaluator) else format_results_table
            logger.info("\n%s", table(metrics, title=f"{dataset.name} ({iou_type})"))
        prefix = "" if iou_type == "bbox" else f"{iou_type}/"
        results.update({f"{prefix}{k}": v for k, v in metrics.items()})
    return results


def dataset_evaluators(cfg: Config, dataset: DetectionDataset, output_dir: Path) -> dict[str, DetectionEvaluator]:
    """One evaluator per IoU type ("bbox", and "segm" with MODEL.MASK_ON): LVIS's rules for a dataset whose
    categories carry a ``frequency`` (LVIS v1), else COCO's with the dataset's novel classes. The first writes the
    detections (masks included) to ``output_dir``."""
    lvis = bool(dataset.categories) and all("frequency" in c for c in dataset.categories)
    evaluators: dict[str, DetectionEvaluator] = {}
    for iou_type in ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",):
        out = output_dir if not evaluators else None
        if lvis:
            evaluators[iou_type] = LVISEvaluator(dataset.json_file, output_dir=out, iou_type=iou_type)
        else:
            evaluators[iou_type] = COCOEvaluator(dataset.json_file, novel_category_ids=dataset.novel_category_ids,
                                                 output_dir=out, iou_type=iou_type)
    return evaluators


@torch.no_grad()
def evaluate_distillation(cfg: Config, model: OVDetector, dataset: DetectionDataset) -> dict[str, float]:
    """Distillation fidelity on the regions of TEST.RKD_FEAT_PATH: student vs teacher cosine and zero-shot agreement
    over the dataset's vocabulary, for regions covering (IoU ≥ 0.5) a base or a novel object."""
    store = open_region_store(cfg.TEST.RKD_FEAT_PATH, cfg, key="TEST.RKD_FEAT_PATH")
    rank, world = get_rank(), get_world_size()
    loader = build_test_loader(cfg, dataset, rank=rank, world_size=world, region_store=store)
    records = {r.image_id: r for r in dataset.records}
    class_index = {cid: i for i, cid in enumerate(dataset.category_ids)}
    was_training = model.training
    model.eval()
    student, teacher, classes = [], [], []
    try:
        for batch in loader:
            batch = [s for s in batch if len(s.regions)]
            if not batch:
                continue
            student.append(model.embed_regions(batch).cpu())
            for s in batch:
                teacher.append(s.regions.embeds)
                boxes, _ = store.get(s.image_id)
                rec = records[s.image_id]
                cls = torch.full((len(s.regions),), -1, dtype=torch.int64)
                if len(rec.boxes):
                    iou = box_iou(torch.from_numpy(boxes[: len(s.regions)]), torch.from_numpy(rec.boxes))
                    best, j = iou.max(dim=1)
                    gt = torch.tensor([class_index[c] for c in rec.category_ids.tolist()])
                    cls = torch.where(best >= 0.5, gt[j], cls)
                classes.append(cls)
    finally:
        model.train(was_training)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (student, teacher, classes))
        student, teacher, classes = (sum((g[i] for g in gathered), []) for i in range(3))
    novel_ids = set(dataset.novel_category_ids)
    novel = torch.tensor([cid in novel_ids for cid in dataset.category_ids])
    vocab = torch.from_numpy(dataset_vocabulary(cfg, dataset, train=False).embeds)
    if not student:
        raise ValueError(f"TEST.RKD_FEAT_PATH {cfg.TEST.RKD_FEAT_PATH} has no regions for the images of {dataset.name}")
    return distillation_fidelity(torch.cat(student), torch.cat(teacher), vocab, torch.cat(classes), novel)


@torch.no_grad()
def evaluate_proposals(cfg: Config, model: ProposalNetwork, dataset: DetectionDataset, output_dir: Path) -> dict:
    """Class-agnostic recall of ``model``'s proposals on ``dataset`` (AR@k and recall@0.5, for all, base and
    novel boxes; `ovd.evaluation.proposal_recall`); the proposals are written to ``output_dir/proposals.json``."""
    rank, world = get_rank(), get_world_size()
    loader = build_test_loader(cfg, dataset, rank=rank, world_size=world)
    was_training = model.training
    model.eval()
    found: dict[int, tuple] = {}
    try:
        for batch in loader:
            for sample, result in zip(batch, model.predict(batch)):
                found[sample.image_id] = (result.pred_boxes.cpu().numpy(), result.scores.cpu().numpy())
    finally:
        model.train(was_training)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, found)
        found = {k: v for g in gathered for k, v in g.items()}
    metrics = proposal_recall(dataset, found)
    if rank == 0:
        save_proposals(output_dir / "proposals.json", found)
        logger.info("\n%s", format_recall_table(metrics, title=f"{dataset.name} proposals"))
    return metrics


def evaluate(cfg: Config, model: ImageModel) -> dict[str, dict]:
    """Metrics per dataset of DATASETS.TEST; detections are written to OUTPUT_DIR/inference/<dataset>/. With
    TEST.RKD_FEAT_PATH, the first dataset's results also hold the distillation fidelity (``fidelity/…``).
    A proposal model is evaluated by its recall instead."""
    out = {}
    for i, name in enumerate(cfg.DATASETS.TEST):
        dataset = load_dataset(name)
        if isinstance(model, ProposalNetwork):
            out[name] = evaluate_proposals(cfg, model, dataset, Path(cfg.OUTPUT_DIR) / "inference" / name)
            continue
        out[name] = evaluate_dataset(cfg, model, dataset, Path(cfg.OUTPUT_DIR) / "inference" / name)
        if i == 0 and cfg.TEST.RKD_FEAT_PATH:
            fidelity = evaluate_distillation(cfg, model, dataset)
            out[name].update({f"fidelity/{k}": v for k, v in fidelity.items()})
            if get_rank() == 0:
                logger.info("distillation fidelity on %s: %s", name,
                            "  ".join(f"{k} {v:.3f}" for k, v in fidelity.items() if not k.startswith("regions")))
    return out
