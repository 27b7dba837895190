"""The training loop, top to bottom: build, (resume), iterate, log, checkpoint, evaluate."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ovd.config import Config, save_config
from ovd.data.build import build_train_loader, load_train_datasets, open_region_store, train_ann_types
from ovd.data.region_store import RegionStore
from ovd.engine.checkpoint import Checkpointer, load_model_state, read_checkpoint
from ovd.engine.evaluate import dataset_vocabulary, evaluate
from ovd.engine.events import MetricsWriter
from ovd.modeling.build import build_model
from ovd.modeling.detector import OVDetector
from ovd.utils.comm import get_rank, get_world_size, is_main_process, reduce_mean
from ovd.utils.io import write_json

logger = logging.getLogger("ovd.train")


def select_device(cfg: Config) -> torch.device:
    name = cfg.MODEL.DEVICE
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available; use MODEL.DEVICE cpu")
        if get_world_size() > 1:
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def loss_weights(cfg: Config) -> dict[str, float]:
    """The one place where loss weights are applied (DESIGN §3)."""
    return {
        "loss_rpn_cls": cfg.MODEL.RPN.LOSS_WEIGHT,
        "loss_rpn_loc": cfg.MODEL.RPN.LOSS_WEIGHT,
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


def load_weights(model: OVDetector, path: str) -> None:
    """Initialise from MODEL.WEIGHTS (an `ovd`, bare or detectron2-format checkpoint); parts the checkpoint lacks
    (e.g. the weight-transfer layers when starting from the RKD model) keep their initialisation."""
    missing = load_model_state(model, read_checkpoint(path)["model"], source=path, allow_missing=True)
    logger.info("loaded weights from %s%s", path, f"; not in it, kept as initialised: {', '.join(missing)}" if missing else "")


def _check_finite(losses: dict[str, torch.Tensor], iteration: int) -> None:
    bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(
            f"non-finite loss at iteration {iteration}: " + ", ".join(f"{k}={losses[k].item()}" for k in bad)
        )


def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train ``cfg`` (in this process, as one of the DDP workers if any); returns the final evaluation."""
    rank, world = get_rank(), get_world_size()
    device = select_device(cfg)
    out_dir = Path(cfg.OUTPUT_DIR)
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    datasets = load_train_datasets(cfg)
    dataset = datasets[0]
    vocab = dataset_vocabulary(cfg, dataset, train=True)
    # classes without training boxes (novel) get no classification loss: count box-labelled images only
    counts = sum(d.class_image_counts() for d, ann in zip(datasets, train_ann_types(cfg)) if ann == "box")
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg, text_embeds=torch.from_numpy(vocab.embeds), class_image_counts=torch.from_numpy(counts))
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    amp = cfg.SOLVER.AMP.ENABLED and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    checkpointer = Checkpointer(out_dir, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    start_iter = checkpointer.resume() if resume else 0
    if start_iter == 0 and cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS)
    max_iter = cfg.SOLVER.MAX_ITER
    ddp = model
    if world > 1:
        # image-labelled batches leave the RPN (and the box regressor) without gradients
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=len(datasets) > 1)
    stores = region_stores(cfg, datasets, teacher=vocab.meta.get("model")) if cfg.MODEL.DISTILLATION else None
    if cfg.TEST.RKD_FEAT_PATH:  # fail now, not after training, if the fidelity evaluation cannot run
        open_region_store(cfg.TEST.RKD_FEAT_PATH, cfg, key="TEST.RKD_FEAT_PATH", expected_model=vocab.meta.get("model"))
    loader = build_train_loader(cfg, datasets, rank=rank, world_size=world, start_iter=start_iter, region_stores=stores)
    writer = MetricsWriter(out_dir, max_iter=max_iter, start_iter=start_iter) if is_main_process() else None
    weights = loss_weights(cfg)
    logger.info("training on %s from iteration %d to %d on %s (%d worker(s))", ", ".join(d.name for d in datasets),
                start_iter, max_iter, device, world)

    model.train()
    window: dict[str, list[float]] = {}
    data_iter = iter(loader)
    for iteration in range(start_iter, max_iter):
        torch.manual_seed(hash((cfg.SEED, rank, iteration)) % (1 << 63))
        batch = next(data_iter)
        with torch.autocast(device.type, enabled=amp):
            losses = ddp(batch)
        total = sum(weights[k] * v for k, v in losses.items())
        _check_finite(losses, iteration)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if cfg.SOLVER.CLIP_GRADIENTS > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRADIENTS)
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        done = iteration + 1
        for k, v in [*losses.items(), ("total_loss", total)]:
            window.setdefault(k, []).append(v.item())
        if done % cfg.LOG_PERIOD == 0 or done == max_iter or iteration == start_iter:
            # each loss averaged over the iterations since the last line (where it occurred: PIS losses only on
            # image-labelled batches)
            metrics = reduce_mean({k: sum(v) / len(v) for k, v in window.items()}, device)
            window.clear()
            metrics["lr"] = lr
            if writer is not None:
                writer.write(iteration, metrics)
                writer.console(iteration, metrics)
        if is_main_process() and done < max_iter and cfg.SOLVER.CHECKPOINT_PERIOD > 0 and done % cfg.SOLVER.CHECKPOINT_PERIOD == 0:
            checkpointer.save(f"model_{iteration:07d}", done)
        if cfg.TEST.EVAL_PERIOD > 0 and done % cfg.TEST.EVAL_PERIOD == 0 and done < max_iter:
            _log_eval(writer, iteration, evaluate(cfg, model))

    if is_main_process():
        checkpointer.save("model_final", max_iter)
    results = evaluate(cfg, model) if cfg.DATASETS.TEST else {}
    _log_eval(writer, max_iter - 1, results)
    if writer is not None:
        writer.close()
        write_json(out_dir / "final_metrics.json", results, indent=2)
    return results


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
    device = select_device(cfg)
    data = read_checkpoint(cfg.MODEL.WEIGHTS)
    text = data["model"].get("roi_heads.box_predictor.cls_score.text_embeds")
    freq = data["model"].get("roi_heads.box_predictor.freq_weight")
    model = build_model(cfg, text_embeds=text, class_image_counts=None if freq is None else freq**2)
    load_model_state(model, data["model"], source=cfg.MODEL.WEIGHTS)
    model.to(device).eval()
    results = evaluate(cfg, model)
    if is_main_process():
        write_json(Path(cfg.OUTPUT_DIR) / "eval_metrics.json", results, indent=2)
    return results
