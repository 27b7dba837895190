"""The method's chain of runs (DESIGN §2) as data: what each stage is, where the offline products live.

One config describes a user's whole run (`tools/run_chain.py`): the model, DATASETS.TRAIN (one box-labelled source and
optionally one image-labelled source, told apart by DATALOADER.DATASET_ANN or the datasets' own type), DATASETS.TEST
and the CHAIN keys. Each stage is that config plus the overrides below, passed to `tools/train_net.py` on its command
line, so every stage can be rerun by hand:

    proposals   the class-agnostic proposal model (OLN or RPN), trained on the box source only
    base        the box source only, no distillation, no image labels
    control     base's losses for the fine-tuning schedule, from base (does the method beat more iterations?)
    rkd         + region-based knowledge distillation, from base
    pis         + pseudo image-level supervision (the image-labelled source), from base
    rkd_pis     both, from base
    rkd_pis_wt  both with weight transfer, from rkd

Stages after base use CHAIN.FINETUNE's schedule. The shapes stage files (configs/shapes/<stage>.yaml) are these
recipes applied to configs/shapes/chain.yaml (pinned by a test).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ovd.config import Config
from ovd.data.build import train_ann_types

STAGES = ("base", "control", "rkd", "pis", "rkd_pis", "rkd_pis_wt")
INIT_FROM = {"control": "base", "rkd": "base", "pis": "base", "rkd_pis": "base", "rkd_pis_wt": "rkd"}
PROPOSAL_SOURCES = ("oln", "rpn", "oracle")
_RKD_STAGES = ("rkd", "rkd_pis", "rkd_pis_wt")
_PIS_STAGES = ("pis", "rkd_pis", "rkd_pis_wt")


@dataclass(frozen=True)
class ChainSources:
    """The training sources of a chain config: one box-labelled dataset, at most one image-labelled one."""

    box: str
    image: str | None
    test: str


def chain_sources(cfg: Config) -> ChainSources:
    types = train_ann_types(cfg)
    box = [n for n, t in zip(cfg.DATASETS.TRAIN, types) if t == "box"]
    image = [n for n, t in zip(cfg.DATASETS.TRAIN, types) if t == "image"]
    if len(box) != 1 or len(image) > 1:
        raise ValueError(f"the chain needs DATASETS.TRAIN = one box-labelled dataset and at most one image-labelled one "
                         f"(DATALOADER.DATASET_ANN tells which); got box: {box}, image: {image}")
    if len(cfg.DATASETS.TEST) != 1:
        raise ValueError(f"the chain reports on one test dataset; DATASETS.TEST has {list(cfg.DATASETS.TEST)}")
    return ChainSources(box[0], image[0] if image else None, cfg.DATASETS.TEST[0])


def text_embeddings_path(cfg: Config) -> Path:
    """Where the chain writes the teacher's embeddings of the vocabulary (one file per teacher)."""
    model = cfg.CHAIN.CLIP_MODEL
    if model.startswith("local-dir:"):
        slug = Path(model[len("local-dir:"):]).name
    else:
        pretrained = Path(cfg.CHAIN.CLIP_PRETRAINED).stem if cfg.CHAIN.CLIP_PRETRAINED else "random"
        slug = f"{model}_{pretrained}"
    return work_dir(cfg) / "text_embeddings" / f"{slug.replace('/', '-')}.npy"


def work_dir(cfg: Config) -> Path:
    return Path(cfg.CHAIN.WORK_DIR or Path(cfg.OUTPUT_DIR) / "offline")


def source_paths(cfg: Config, source: str, *, separate_image_store: bool = False) -> dict[str, Path]:
    """The offline products of one proposal source. ``separate_image_store``: the image-labelled images are not all
    among the box source's, so they get proposals and a region store of their own."""
    root = work_dir(cfg)
    paths = {
        "train_proposals": root / "proposals" / source / "train.json",
        "val_proposals": root / "proposals" / source / "val.json",
        "train_regions": root / "region_embeddings" / source / "train",
        "val_regions": root / "region_embeddings" / source / "val",
        "pseudo": root / "pseudo_boxes" / source / "train.json",
    }
    if separate_image_store:
        paths["image_proposals"] = root / "proposals" / source / "image_labels.json"
        paths["image_regions"] = root / "region_embeddings" / source / "image_labels"
    return paths


def _scaled_steps(steps: list[int], max_iter: int, new_max_iter: int) -> list[int]:
    return [int(round(s * new_max_iter / max_iter)) for s in steps]


def _box_only(sources: ChainSources) -> list[str]:
    return ["DATASETS.TRAIN", f"[{sources.box}]", "DATALOADER.DATASET_ANN", "[]", "DATALOADER.DATASET_RATIO", "[]",
            "DATALOADER.DATASET_BS", "[]"]


def proposal_overrides(cfg: Config, generator: str) -> list[str]:
    """The proposal model's stage: the config's backbone and schedule, ``generator`` ("OLN" or "RPN") on the box
    source only, refined by the class-agnostic box stage; recall is its evaluation."""
    if generator not in ("OLN", "RPN"):
        raise ValueError(f"CHAIN.PROPOSALS {generator!r}: a proposal model is OLN or RPN")
    opts = ["MODEL.META_ARCHITECTURE", "ProposalNetwork", "MODEL.PROPOSAL_GENERATOR.NAME", generator,
            "MODEL.PROPOSAL_GENERATOR.REFINE_BOXES", "true", "MODEL.ROI_HEADS.NMS_THRESH_TEST", "0.7",
            "TEST.DETECTIONS_PER_IMAGE", "100", "TEST.RKD_FEAT_PATH", "", "MODEL.DISTILLATION", "false",
            *_box_only(chain_sources(cfg))]
    if generator == "OLN":
        opts += ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]"]  # OLN: one anchor per position
    iters = cfg.CHAIN.PROPOSAL_ITERS
    if iters:
        steps = _scaled_steps(cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER, iters)
        opts += ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps)]
    return opts


def stage_overrides(cfg: Config, stage: str, paths: dict[str, Path], text: Path) -> list[str]:
    """``stage``'s overrides of the chain config (module docstring), reading the offline products at ``paths``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    sources = chain_sources(cfg)
    opts = ["MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", str(text), "TEST.RKD_FEAT_PATH", str(paths["val_regions"])]
    if stage in _PIS_STAGES:
        if sources.image is None:
            raise ValueError(f"stage {stage} needs an image-labelled dataset in DATASETS.TRAIN (DATALOADER.DATASET_ANN "
                             "image)")
        opts += ["MODEL.PIS_PROP_PATH", str(paths["pseudo"])]
        if "image_regions" in paths and stage in _RKD_STAGES:
            opts += ["MODEL.RKD_ILS_FEAT_PATH", str(paths["image_regions"])]
    else:
        opts += _box_only(sources)
    opts += ["MODEL.DISTILLATION", str(stage in _RKD_STAGES).lower()]
    if stage in _RKD_STAGES:
        opts += ["MODEL.RKD_FEAT_PATH", str(paths["train_regions"])]
    opts += ["MODEL.ROI_BOX_HEAD.WEIGHT_TRANSFER", str(stage == "rkd_pis_wt").lower()]
    if stage != "base":
        ft, solver = cfg.CHAIN.FINETUNE, cfg.SOLVER
        max_iter = ft.MAX_ITER or solver.MAX_ITER
        steps = list(ft.STEPS) or _scaled_steps(solver.STEPS, solver.MAX_ITER, max_iter)
        opts += ["SOLVER.BASE_LR", str(ft.BASE_LR or solver.BASE_LR), "SOLVER.MAX_ITER", str(max_iter),
                 "SOLVER.STEPS", str(steps), "SOLVER.WARMUP_ITERS", str(ft.WARMUP_ITERS or solver.WARMUP_ITERS)]
    return opts


def with_inits(stages: list[str]) -> list[str]:
    """``stages`` in order, each preceded by the stages its weights come from."""
    order: list[str] = []

    def add(stage: str) -> None:
        if stage not in order:
            if stage in INIT_FROM:
                add(INIT_FROM[stage])
            order.append(stage)

    for stage in stages:
        add(stage)
    return order
