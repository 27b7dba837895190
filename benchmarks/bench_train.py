"""ms per training step (forward + backward + SGD step) of our R50-FPN against torchvision's fasterrcnn_resnet50_fpn.

Both with random weights on the same random images and boxes (batch 2, ``--size`` H W, no resize inside either
model), the same thread count, SGD (lr 1e-4, momentum 0.9, weight decay 1e-4). torchvision's model is built as
``fasterrcnn_resnet50_fpn`` builds it for fine-tuning (FrozenBatchNorm2d, 3 trainable stages), which is what our
config does (NORM FrozenBN, FREEZE_AT 2): with ``weights_backbone=None`` torchvision would switch to trainable
BatchNorm and 5 trainable stages, a different (slower) network. 80 classes; our pixel std set to torchvision's
(see `main`). Rows, each a ratio to torchvision's step:

- base: configs/bench/r50_fpn.yaml, a box-labelled batch (RPN + RoI losses);
- RKD: + distillation of 5 regions per image read from a region store (a synthetic one in a temp dir; the reads
  are inside the timed step), pooled through the RoI path, L1 + IRM losses;
- RKD+PIS+WT box / image: weight transfer on, a box-labelled batch with RKD, and an image-labelled batch (2 pseudo
  boxes per image, PIS loss, no RPN) with RKD.

Then the data pipeline alone (`DatasetMapper` with the region store over PNG files in a temp dir, through a
DataLoader with 0 and 2 workers): images/s against the base step's images/s. All variants alternate run by run in
one process, in an order that rotates; medians.

``--profile CONFIG`` instead profiles (torch.profiler) training steps of CONFIG on random images of its training
size with 2-5 random boxes each, batch SOLVER.IMS_PER_BATCH, and prints the ops that take the time, e.g. the shapes
world's ``configs/shapes/base.yaml``.

    python benchmarks/bench_train.py [--size 320 480] [--runs 5] [--threads 1]
    python benchmarks/bench_train.py --profile configs/shapes/base.yaml [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.ops.misc import FrozenBatchNorm2d

from ovd.config import load_config
from ovd.data.datasets import ImageRecord
from ovd.data.mapper import DatasetMapper
from ovd.data.region_store import RegionStore, RegionStoreWriter
from ovd.engine.trainer import build_optimizer, loss_weights
from ovd.modeling.build import build_model
from ovd.structures import ImageSample, Instances

REPO = Path(__file__).resolve().parents[1]
R50_FPN = "configs/bench/r50_fpn.yaml"
NUM_CLASSES, DIM, BATCH, REGIONS = 80, 512, 2, 5
# a small learning rate keeps repeated steps of a random-init model finite; the step costs the same at any rate
SGD = dict(lr=1e-4, momentum=0.9, weight_decay=1e-4)


def random_boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """n float32 [n, 4] xyxy boxes of 32..h/2 px inside an h x w image."""
    size = rng.uniform(32, min(h, w) / 2, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([w, h]) - size)
    return np.concatenate([xy, xy + size], axis=1).astype(np.float32)


def make_store(path: Path, num_images: int, h: int, w: int) -> RegionStore:
    """A region store of REGIONS random boxes and unit embeddings per image (ids 0..num_images-1)."""
    rng = np.random.default_rng(1)
    writer = RegionStoreWriter(path, job={"model_name": "bench", "dim": DIM})
    embeds = rng.standard_normal((num_images * REGIONS, DIM)).astype(np.float32)
    writer.write_chunk(0, image_ids=np.arange(num_images), counts=np.full(num_images, REGIONS),
                       boxes=np.concatenate([random_boxes(rng, REGIONS, h, w) for _ in range(num_images)]),
                       embeds=embeds / np.linalg.norm(embeds, axis=1, keepdims=True))
    return writer.finalize([0])


def ours_step(overrides: list[str], batch: Callable[[], list[ImageSample]], *, config: str = R50_FPN,
              num_classes: int = NUM_CLASSES) -> Callable[[], None]:
    cfg = load_config(REPO / config, overrides)
    torch.manual_seed(0)
    dim = cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM
    model = build_model(cfg, text_embeds=torch.randn(num_classes, dim)).train()
    optimizer = build_optimizer(cfg, model)
    weights = loss_weights(cfg)

    def step() -> None:
        losses = model(batch())
        loss = sum(weights[k] * v for k, v in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def torchvision_step(images: list[torch.Tensor], targets: list[dict]) -> Callable[[], None]:
    torch.manual_seed(0)
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    h, w = images[0].shape[-2:]
    model = torchvision.models.detection.FasterRCNN(backbone, num_classes=NUM_CLASSES + 1, min_size=min(h, w),
                                                    max_size=max(h, w)).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], **SGD)

    def step() -> None:
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def alternate(steps: dict[str, Callable[[], None]], runs: int) -> dict[str, float]:
    """Median ms of each step, the steps interleaved run by run (one warm-up each); the order rotates every run so
    no step always follows the same one (cache and allocator state)."""
    for fn in steps.values():
        fn()
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(runs):
        for k in names[i % len(names):] + names[: i % len(names)]:
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def loader_rate(mapper: DatasetMapper, records: list[ImageRecord], workers: int) -> float:
    """Images/s of the mapper over ``records`` through a DataLoader (after its workers start)."""
    loader = DataLoader(records, batch_size=BATCH, num_workers=workers, collate_fn=lambda b: [mapper(r) for r in b])
    it = iter(loader)
    next(it)  # workers started, first batch out
    t, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch)
    return n / (time.perf_counter() - t)


def profile(config: str, runs: int) -> None:
    """Profile ``runs`` training steps of ``config`` (box-labelled batches) and print the ops by self CPU time."""
    cfg = load_config(REPO / config)
    h = w = cfg.INPUT.MIN_SIZE_TRAIN[0]
    rng = np.random.default_rng(0)
    def sample(i: int, n: int) -> ImageSample:
        gt = Instances((h, w), gt_boxes=torch.from_numpy(random_boxes(rng, n, h, w)),
                       gt_classes=torch.from_numpy(rng.integers(0, 11, n)))  # the shapes world's 11 base classes
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        return ImageSample(image=image, image_id=i, orig_size=(h, w), gt=gt)

    batches = [[sample(i, n) for i, n in enumerate(rng.integers(2, 6, cfg.SOLVER.IMS_PER_BATCH))]
               for _ in range(runs + 1)]
    it = iter(batches)
    step = ours_step([], lambda: next(it), config=config, num_classes=16)
    step()  # warm-up
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            step()
    print(f"{config}: {(time.perf_counter() - t) / runs * 1e3:.0f} ms per step under the profiler, "
          f"{torch.get_num_threads()} thread(s), batch {cfg.SOLVER.IMS_PER_BATCH} of {h}x{w}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(320, 480), metavar=("H", "W"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--loader-images", type=int, default=64)
    p.add_argument("--profile", metavar="CONFIG", help="profile training steps of this config instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args.profile, args.runs)
        return
    h, w = args.size
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for _ in range(BATCH)]
    gt_boxes = [torch.from_numpy(random_boxes(rng, 4, h, w)) for _ in range(BATCH)]
    gt_classes = [torch.from_numpy(rng.integers(0, NUM_CLASSES, 4)) for _ in range(BATCH)]
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "regions", max(args.loader_images, BATCH), h, w)

        def regions(i: int) -> Instances:
            boxes, embeds = store.get(i)  # the store read, as the mapper does it
            return Instances((h, w), boxes=torch.from_numpy(boxes), embeds=torch.from_numpy(embeds))

        def box_batch(rkd: bool) -> Callable[[], list[ImageSample]]:
            return lambda: [ImageSample(image=images[i], image_id=i, orig_size=(h, w),
                                        gt=Instances((h, w), gt_boxes=gt_boxes[i], gt_classes=gt_classes[i]),
                                        regions=regions(i) if rkd else None) for i in range(BATCH)]

        def image_batch() -> list[ImageSample]:
            return [ImageSample(image=images[i], image_id=i, orig_size=(h, w), regions=regions(i),
                                image_labels=Instances((h, w), boxes=gt_boxes[i][:2], classes=gt_classes[i][:2]))
                    for i in range(BATCH)]

        # torchvision's pixel std (in 0-255 units) instead of the LVIS config's 1.0: a random-init R50 with
        # identity FrozenBN on unscaled pixels reaches activations whose RPN boxes overflow after a few steps; the
        # step's work does not depend on the scale
        lr = ["SOLVER.BASE_LR", str(SGD["lr"]), "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]"]
        rkd = lr + ["MODEL.DISTILLATION", "true", "MODEL.DISTIL_L1_LOSS_WEIGHT", "0.25",
                    "MODEL.IRM_LOSS_WEIGHT", "0.13"]
        wt = rkd + ["MODEL.ROI_BOX_HEAD.WEIGHT_TRANSFER", "true"]
        tv_targets = [{"boxes": b, "labels": c + 1} for b, c in zip(gt_boxes, gt_classes)]
        steps = {
            "torchvision": torchvision_step([im.float() / 255 for im in images], tv_targets),
            "base": ours_step(lr, box_batch(False)),
            "RKD": ours_step(rkd, box_batch(True)),
            "RKD+PIS+WT box batch": ours_step(wt, box_batch(True)),
            "RKD+PIS+WT image batch": ours_step(wt, image_batch),
        }
        ms = alternate(steps, args.runs)

        files = Path(tmp) / "images"
        files.mkdir()
        records = []
        for i in range(args.loader_images):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files / f"{i}.png")
            records.append(ImageRecord(i, files / f"{i}.png", h, w, random_boxes(rng, 4, h, w),
                                       rng.integers(1, NUM_CLASSES + 1, 4)))
        mapper = DatasetMapper(is_train=True, min_sizes=[h], max_size=max(h, w), random_flip=True,
                               category_ids=list(range(1, NUM_CLASSES + 1)), region_store=store)
        rates = {n: loader_rate(mapper, records, n) for n in (0, 2)}

    print(f"CPU, {args.threads} thread(s), batch {BATCH} of {h}x{w}, {NUM_CLASSES} classes, random weights; "
          f"median of {args.runs} steps, variants alternated")
    print(f"{'step':<24} {'ms':>7} {'vs torchvision':>15}")
    for k, v in ms.items():
        print(f"{k:<24} {v:>7.0f} {v / ms['torchvision']:>15.2f}")
    step_rate = BATCH / ms["base"] * 1e3
    print(f"data pipeline (PNG decode, resize, flip, region store), {h}x{w}: "
          + ", ".join(f"{n} workers {r:.0f} images/s" for n, r in rates.items())
          + f"; the base step trains {step_rate:.1f} images/s")


if __name__ == "__main__":
    main()
