"""The training loop, top to bottom: build, (resume), iterate, log, checkpoint, evaluate."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ovd.config import Config, save_config
from ovd.data.build import build_train_loader, load_train_datasets, open_region_store, train_ann_types
from ovd.data.catalog import get_dataset, register_config_datasets
from ovd.data.datasets import DetectionDataset
from ovd.data.region_store import RegionStore
from ovd.engine.checkpoint import Checkpointer, load_model_state, read_checkpoint
from ovd.engine.evaluate import dataset_vocabulary, evaluate
from ovd.engine.events import MetricsWriter
from ovd.engine.setup import select_device
from ovd.modeling.build import build_model
from ovd.modeling.detector import ImageModel, OVDetector
from ovd.utils.comm import get_rank, get_world_size, is_main_process, reduce_mean, synchronize
from ovd.utils.io import write_json

logger = logging.getLogger("ovd.train")


def loss_weights(cfg: Config) -> dict[str, float]:
    """The one place where loss weights are applied (DESIGN §3)."""
    return {
        "loss_rpn_cls": cfg.MODEL.RPN.LOSS_WEIGHT,
        "loss_rpn_loc": cfg.MODEL.RPN.LOSS_WEIGHT,
        "loss_rpn_ctr": cfg.MODEL.RPN.LOSS_WEIGHT,  # OLN's objectness
        "loss_box_iou": 1.0,  # proposal models' RoI stage (OLN: predicted IoU; RPN: object vs background)
        "loss_objectness": 1.0,
        "loss_cls": 1.0,
        "loss_box_reg": 1.0,
        "loss_mask": 1.0,
        # the paper scales both RKD weights by 100
        "loss_distil_l1": cfg.MODEL.DISTIL_L1_LOSS_WEIGHT * 100,
        "loss_irm": cfg.MODEL.IRM_LOSS_WEIGHT * 100,
        "loss_pms": cfg.MODEL.ROI_BOX_HEAD.PMS_LOSS_WEIGHT,
    }


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    s = cfg.SOLVER
    if s.OPTIMIZER == "SGD":
        return torch.optim.SGD(params, lr=s.BASE_LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY)
    if s.OPTIMIZER == "AdamW":
        return torch.optim.AdamW(params, lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY)
    raise ValueError(f"SOLVER.OPTIMIZER: unknown optimizer {s.OPTIMIZER!r}; expected SGD or AdamW")


def lr_factor(cfg: Config, iteration: int) -> float:
    """Linear warm-up from WARMUP_FACTOR, then ×GAMMA at each of STEPS (detectron2's WarmupMultiStepLR)."""
    s = cfg.SOLVER
    factor = s.GAMMA ** sum(iteration >= step for step in s.STEPS)
    if iteration < s.WARMUP_ITERS:
        alpha = iteration / s.WARMUP_ITERS
        factor *= s.WARMUP_FACTOR * (1 - alpha) + alpha
    return factor


def region_stores(cfg: Config, datasets: list, *, teacher: str | None) -> list[RegionStore]:
    """One RKD region store per training source; the store must come from the CLIP model that embedded the class
    names (``teacher``, from their sidecar)."""
    stores = []
    for dataset, ann in zip(datasets, train_ann_types(cfg)):
        key, path = "MODEL.RKD_FEAT_PATH", cfg.MODEL.RKD_FEAT_PATH
        if ann == "image" and cfg.MODEL.RKD_ILS_FEAT_PATH:
            key, path = "MODEL.RKD_ILS_FEAT_PATH", cfg.MODEL.RKD_ILS_FEAT_PATH
        store = open_region_store(path, cfg, key=key, expected_model=teacher)
        missing = sum(r.image_id not in store for r in dataset.records)
        if missing:
            logger.warning("%d of %d images of %s have no entry in the region store %s (no distillation for them)",
                           missing, len(dataset), dataset.name, store.path)
        stores.append(store)
    return stores


def check_no_novel_boxes(cfg: Config, datasets: list[DetectionDataset]) -> None:
    """The leak guard of proposal models: no training box may belong to a class that a training or test dataset
    calls novel (MODEL.PROPOSAL_GENERATOR.ALLOW_NOVEL_BOXES lifts it, e.g. for an upper bound)."""
    if cfg.MODEL.PROPOSAL_GENERATOR.ALLOW_NOVEL_BOXES:
        return
    novel = {cid for d in datasets for cid in d.novel_category_ids}
    for name in cfg.DATASETS.TEST:
        novel.update(get_dataset(name).novel_category_ids)
    for dataset in datasets:
        seen: dict[int, int] = {}
        for r in dataset.records:
            for cid in r.category_ids.tolist():
                if cid in novel:
                    seen[cid] = seen.get(cid, 0) + 1
        if seen:
            names = {c["id"]: c["name"] for c in dataset.categories}
            listed = ", ".join(f"{names.get(c, c)!r} (id {c}, {n} boxes)" for c, n in sorted(seen.items()))
            raise ValueError(
                f"dataset {dataset.name} ({dataset.json_file}) has boxes of classes that are novel in "
                f"{', '.join([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST])}: {listed}. A proposal model trained on them "
                "has seen the novel objects; train it on the base-class boxes only, or set "
                "MODEL.PROPOSAL_GENERATOR.ALLOW_NOVEL_BOXES true for a labelled upper bound"
            )


def build_for_training(cfg: Config, datasets: list[DetectionDataset]) -> tuple[ImageModel, str | None]:
    """The model to train and the CLIP model of its vocabulary (None for a proposal model, which has none):
    the detector over the training vocabulary, classes without box-labelled images weighted 0."""
    if cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork":
        if len(datasets) > 1 or train_ann_types(cfg) != ["box"] or cfg.MODEL.DISTILLATION:
            raise ValueError("a proposal model (MODEL.META_ARCHITECTURE ProposalNetwork) trains on one box-labelled "
                             "dataset, without MODEL.DISTILLATION")
        check_no_novel_boxes(cfg, datasets)
        torch.manual_seed(cfg.SEED)
        return build_model(cfg), None
    vocab = dataset_vocabulary(cfg, datasets[0], train=True)
    counts = sum(d.class_image_counts() for d, ann in zip(datasets, train_ann_types(cfg)) if ann == "box")
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg, text_embeds=torch.from_numpy(vocab.embeds), class_image_counts=torch.from_numpy(counts))
    return model, vocab.meta.get("model")


# Buffers that describe this run's training data, not learned weights: a model initialised from another run's
# checkpoint keeps its own (fine-tuning on data that boxes fewer classes must not inherit their counts, or the classes
# it never sees become negatives everywhere; IGNORE_ZERO_CATS needs this run's zeros).
RUN_DATA_BUFFERS = ("roi_heads.box_predictor.freq_weight",)


def load_weights(model: ImageModel, path: str) -> None:
    """Initialise from MODEL.WEIGHTS (an `ovd`, bare or detectron2-format checkpoint); parts the checkpoint lacks
    (e.g. the weight-transfer layers when starting from the RKD model) keep their initialisation, and so do the
    buffers of this run's training data (`RUN_DATA_BUFFERS`)."""
    state = {k: v for k, v in read_checkpoint(path)["model"].items() if k not in RUN_DATA_BUFFERS}
    missing = load_model_state(model, state, source=path, allow_missing=True)
    missing = [k for k in missing if k not in RUN_DATA_BUFFERS]
    logger.info("loaded weights from %s%s", path, f"; not in it, kept as initialised: {', '.join(missing)}" if missing else "")


def _on_any_worker(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over the DDP workers: a step is skipped by all of them or by none (a worker skipping its
    backward alone would leave the others waiting in the gradient all-reduce)."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _report_nonfinite(out_dir: Path, iteration: int, batch: list, losses: dict[str, torch.Tensor], bad: list[str],
                      *, action: str) -> Path:
    """Write what it takes to look into a non-finite loss (the batch's images, every loss) to
    ``OUTPUT_DIR/nonfinite_iter_<iteration>.json`` (``_rank<r>`` added on the other DDP workers)."""
    rank = get_rank()
    values = {k: v.item() for k, v in losses.items()}
    path = out_dir / f"nonfinite_iter_{iteration:07d}{f'_rank{rank}' if rank else ''}.json"
    write_json(path, {
        "iteration": iteration,
        "rank": rank,
        "action": action,
        "nonfinite": bad,  # empty where only another worker's losses were
        "losses": {k: v if math.isfinite(v) else str(v) for k, v in values.items()},  # NaN is not JSON
        "image_ids": [s.image_id for s in batch],
        "file_names": [str(s.file_name) for s in batch],
    }, indent=2)
    return path


def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train ``cfg`` (in this process, as one of the DDP workers if any); returns the final evaluation."""
    rank, world = get_rank(), get_world_size()
    device = select_device(cfg)
    out_dir = Path(cfg.OUTPUT_DIR)
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    register_config_datasets(cfg.DATASETS.CUSTOM)
    datasets = load_train_datasets(cfg)
    model, teacher = build_for_training(cfg, datasets)
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    amp = cfg.SOLVER.AMP.ENABLED and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    checkpointer = Checkpointer(out_dir, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    start_iter, state = checkpointer.resume() if resume else (0, {})
    if start_iter == 0 and cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS)
    max_iter = cfg.SOLVER.MAX_ITER
    ddp = model
    if world > 1:
        # image-labelled batches leave the RPN (and the box regressor) without gradients
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=len(datasets) > 1)
    stores = region_stores(cfg, datasets, teacher=teacher) if cfg.MODEL.DISTILLATION else None
    if cfg.TEST.RKD_FEAT_PATH and isinstance(model, OVDetector):  # fail now, not after training, if it cannot run
        open_region_store(cfg.TEST.RKD_FEAT_PATH, cfg, key="TEST.RKD_FEAT_PATH", expected_model=teacher)
    loader = build_train_loader(cfg, datasets, rank=rank, world_size=world, start_iter=start_iter, region_stores=stores)
    writer = MetricsWriter(out_dir, max_iter=max_iter, start_iter=start_iter) if is_main_process() else None
    weights = loss_weights(cfg)
    logger.info("training on %s from iteration %d to %d on %s (%d worker(s))", ", ".join(d.name for d in datasets),
                start_iter, max_iter, device, world)

    model.train()
    window: dict[str, list[float]] = {}
    # non-finite steps skipped in all, and in a row up to now; kept in the checkpoints
    counts = {k: state.get(k, 0) for k in ("nonfinite_skipped", "nonfinite_streak")}
    data_iter = iter(loader)
    for iteration in range(start_iter, max_iter):
        torch.manual_seed(hash((cfg.SEED, rank, iteration)) % (1 << 63))
        batch = next(data_iter)
        try:
            with torch.autocast(device.type, enabled=amp):
                losses = ddp(batch)
            bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
        except FloatingPointError as e:  # the model's own check (RPN outputs) found a diverged state
            losses, bad = {}, [f"forward ({e})"]
        if _on_any_worker(bool(bad), device):
            limit = cfg.SOLVER.NONFINITE_SKIP_LIMIT
            stop = not cfg.SOLVER.SKIP_NONFINITE_LOSS or 0 < limit <= counts["nonfinite_streak"] + 1
            report = _report_nonfinite(out_dir, iteration, batch, losses, bad, action="stopped" if stop else "skipped")
            if stop:
                _stop_nonfinite(cfg, checkpointer, iteration, losses, bad, report, counts=counts)
            counts = {k: v + 1 for k, v in counts.items()}
            logger.warning("iteration %d: non-finite %s; step skipped (%d skipped, %d in a row); batch in %s",
                           iteration, ", ".join(bad) or "loss on another worker", *counts.values(), report)
        else:
            counts["nonfinite_streak"] = 0
            total = sum(weights[k] * v for k, v in losses.items())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.SOLVER.CLIP_GRADIENTS > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRADIENTS)
            scaler.step(optimizer)
            scaler.update()
            for k, v in [*losses.items(), ("total_loss", total)]:
                window.setdefault(k, []).append(v.item())
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()  # also after a skipped step: the schedule follows the iteration, as the data does

        done = iteration + 1
        period = cfg.SOLVER.CHECKPOINT_PERIOD
        checkpoint_due = done < max_iter and period > 0 and done % period == 0
        # a checkpoint also closes the averaging window, so a run resumed from it logs the lines of an uninterrupted one
        if done % cfg.LOG_PERIOD == 0 or done == max_iter or iteration == 0 or checkpoint_due:
            # each loss averaged over the iterations since the last line (where it occurred: PIS losses only on
            # image-labelled batches)
            metrics = reduce_mean({k: sum(v) / len(v) for k, v in window.items()}, device)
            window.clear()
            metrics["lr"] = lr
            if cfg.SOLVER.SKIP_NONFINITE_LOSS:
                metrics["nonfinite_skipped"] = counts["nonfinite_skipped"]
            if writer is not None:
                writer.write(iteration, metrics)
                writer.console(iteration, metrics)
        if checkpoint_due and is_main_process():
            checkpointer.save(f"model_{iteration:07d}", done, state=counts)
        if cfg.TEST.EVAL_PERIOD > 0 and done % cfg.TEST.EVAL_PERIOD == 0 and done < max_iter:
            _log_eval(writer, iteration, evaluate(cfg, model))

    if is_main_process():
        checkpointer.save("model_final", max_iter, state=counts)
    results = evaluate(cfg, model) if cfg.DATASETS.TEST else {}
    _log_eval(writer, max_iter - 1, results)
    if writer is not None:
        writer.close()
        write_json(out_dir / "final_metrics.json", results, indent=2)
    return results


def _stop_nonfinite(cfg: Config, checkpointer: Checkpointer, iteration: int, losses: dict[str, torch.Tensor],
                    bad: list[str], report: Path, *, counts: dict[str, int]) -> None:
    """Keep the state before the failing step beside the report (not as a checkpoint to resume from: it may be
    diverged already) and raise FloatingPointError naming the iteration, the loss terms and the files."""
    snapshot = report.with_name(f"nonfinite_iter_{iteration:07d}.pth")
    if is_main_process():
        checkpointer.save(snapshot.stem, iteration, state=counts, latest=False)
    synchronize()  # the other workers wait for it before they stop
    terms = ", ".join(f"{k}={losses[k].item()}" if k in losses else k for k in bad) or "on another worker"
    why = (f"{counts['nonfinite_streak'] + 1} non-finite steps in a row (SOLVER.NONFINITE_SKIP_LIMIT)"
           if cfg.SOLVER.SKIP_NONFINITE_LOSS else "SOLVER.SKIP_NONFINITE_LOSS true would skip such steps")
    raise FloatingPointError(
        f"non-finite loss at iteration {iteration}: {terms}; {why}. The batch and its losses are in {report}, the "
        f"model before this step in {snapshot} (MODEL.WEIGHTS loads it); --resume replays from the last checkpoint."
    )


def _log_eval(writer: MetricsWriter | None, iteration: int, results: dict[str, dict]) -> None:
    if writer is None:
        return
    flat = {}
    for name, res in results.items():
        for k, v in res.items():
            if isinstance(v, float) and not math.isnan(v):
                flat[f"{name}/{k}"] = v
    if flat:
        writer.write(iteration, flat)


def evaluate_only(cfg: Config) -> dict:
    """`--eval-only`: build the model, load MODEL.WEIGHTS, evaluate on DATASETS.TEST."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("--eval-only needs MODEL.WEIGHTS (a checkpoint to evaluate)")
    register_config_datasets(cfg.DATASETS.CUSTOM)
    device = select_device(cfg)
    data = read_checkpoint(cfg.MODEL.WEIGHTS)
    if cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork":
        model = build_model(cfg)
    else:
        text = data["model"].get("roi_heads.box_predictor.cls_score.text_embeds")
        freq = data["model"].get("roi_heads.box_predictor.freq_weight")
        model = build_model(cfg, text_embeds=text, class_image_counts=None if freq is None else freq**2)
    load_model_state(model, data["model"], source=cfg.MODEL.WEIGHTS)
    model.to(device).eval()
    results = evaluate(cfg, model)
    if is_main_process():
        write_json(Path(cfg.OUTPUT_DIR) / "eval_metrics.json", results, indent=2)
    return results
