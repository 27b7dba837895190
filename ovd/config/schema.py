"""The config schema: every key `ovd` reads, its type and default.

Key names follow detectron2 and the original object-centric OVD code where the concept is the same, so their users
find `MODEL.WEIGHTS`, `SOLVER.BASE_LR` or `MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH` where they expect them.
The defaults are the COCO R50-C4 setting of DESIGN §2; `configs/` files override what differs. This module builds
nothing: `build_*` functions read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


def _list(*values):
    return field(default_factory=lambda: list(values))


@dataclass
class ResNetConfig:
    DEPTH: int = 50
    # "FrozenBN" where ImageNet weights are loaded; from random init use "BN" or "GN" (frozen identity BN diverges).
    NORM: str = "FrozenBN"
    STRIDE_IN_1X1: bool = True  # MSRA (detectron2) ResNets put the stride in the 1x1 conv; torchvision's in the 3x3
    STEM_OUT_CHANNELS: int = 64
    RES2_OUT_CHANNELS: int = 256  # for BasicBlock ResNets (18/34) this is the res2 width, 64 in torchvision
    WIDTH_PER_GROUP: int = 64
    NUM_GROUPS: int = 1
    OUT_FEATURES: List[str] = _list("res4")


@dataclass
class BackboneConfig:
    NAME: str = "resnet_c4"  # "resnet_c4" (res5 is the RoI head) or "resnet_fpn"
    FREEZE_AT: int = 2  # 0: train all; 1: freeze the stem; 2: stem and res2 (detectron2's meaning)
    # ImageNet weights of the backbone alone, applied before MODEL.WEIGHTS: detectron2's MSRA R-50.pkl (BGR, std 1,
    # STRIDE_IN_1X1 true) or a torchvision resnet .pth (RGB, normalised, STRIDE_IN_1X1 false); ovd/modeling/pretrained.py
    WEIGHTS: str = ""


@dataclass
class FPNConfig:
    IN_FEATURES: List[str] = _list("res2", "res3", "res4", "res5")
    OUT_CHANNELS: int = 256


@dataclass
class AnchorConfig:
    SIZES: List[List[float]] = field(default_factory=lambda: [[32.0, 64.0, 128.0, 256.0, 512.0]])
    ASPECT_RATIOS: List[List[float]] = field(default_factory=lambda: [[0.5, 1.0, 2.0]])
    OFFSET: float = 0.0


@dataclass
class RPNConfig:
    IN_FEATURES: List[str] = _list("res4")
    PRE_NMS_TOPK_TRAIN: int = 12000
    PRE_NMS_TOPK_TEST: int = 6000
    POST_NMS_TOPK_TRAIN: int = 2000
    POST_NMS_TOPK_TEST: int = 1000
    NMS_THRESH: float = 0.7
    MIN_SIZE: float = 0.0  # proposals with a side <= MIN_SIZE are dropped (detectron2 drops empty boxes)
    BATCH_SIZE_PER_IMAGE: int = 256
    POSITIVE_FRACTION: float = 0.5
    IOU_THRESHOLDS: List[float] = _list(0.3, 0.7)
    BBOX_REG_WEIGHTS: List[float] = _list(1.0, 1.0, 1.0, 1.0)
    SMOOTH_L1_BETA: float = 0.0
    LOSS_WEIGHT: float = 1.0


@dataclass
class ProposalGeneratorConfig:
    # "RPN": objectness classified (detectron2's RPN). "OLN": objectness as localisation quality (Kim et al., RA-L 2022):
    # the RPN regresses the centerness of each anchor's centre in its matched box, never classifies (ovd/modeling/oln.py)
    NAME: str = "RPN"
    # MODEL.META_ARCHITECTURE ProposalNetwork only: a class-agnostic RoI stage refines the first stage's boxes and
    # rescores them (RPN: an object/background classifier; OLN: the box's predicted IoU with its object)
    REFINE_BOXES: bool = False
    # Leak guard: a proposal model may not train on boxes of a class that a training or test dataset calls novel
    ALLOW_NOVEL_BOXES: bool = False


@dataclass
class ROIHeadsConfig:
    IN_FEATURES: List[str] = _list("res4")
    BATCH_SIZE_PER_IMAGE: int = 512
    POSITIVE_FRACTION: float = 0.25
    IOU_THRESHOLD: float = 0.5
    PROPOSAL_APPEND_GT: bool = True
    SCORE_THRESH_TEST: float = 0.05
    NMS_THRESH_TEST: float = 0.5
    # Candidates (proposal, class) kept by score before the per-class NMS; 0 keeps all (detectron2's behaviour).
    TOPK_CANDIDATES_TEST: int = 0


@dataclass
class ROIBoxHeadConfig:
    POOLER_RESOLUTION: int = 14
    POOLER_SAMPLING_RATIO: int = 0
    POOLER_ALIGNED: bool = True  # detectron2's ROIAlignV2
    NUM_FC: int = 2  # FPN box head only
    FC_DIM: int = 1024
    BBOX_REG_WEIGHTS: List[float] = _list(10.0, 10.0, 5.0, 5.0)
    SMOOTH_L1_BETA: float = 0.0
    ZEROSHOT_WEIGHT_PATH: str = ""  # text embeddings [C, D] of the training vocabulary (.npy)
    ZEROSHOT_WEIGHT_DIM: int = 512
    NORM_TEMP: float = 50.0
    USE_SIGMOID_CE: bool = True  # False: softmax cross-entropy over C + 1 columns
    USE_BIAS: float = 0.0  # < 0: a learnable scalar logit bias initialised to this value (the original code's key)
    IGNORE_ZERO_CATS: bool = True  # classes without training boxes get zero loss weight
    CAT_FREQ_PATH: str = ""  # [{"id", "image_count"}]; empty: counted from the training annotations
    USE_FED_LOSS: bool = False  # LVIS: the classification loss covers the batch's classes + sampled others
    FED_LOSS_NUM_CAT: int = 50
    WEIGHT_TRANSFER: bool = False  # the weight-transfer classifier (DESIGN §2), W_rkd frozen
    PMS_LOSS_WEIGHT: float = 0.1  # weight of the PIS loss on image-labelled batches


@dataclass
class ROIMaskHeadConfig:
    NUM_CONV: int = 4
    CONV_DIM: int = 256
    POOLER_RESOLUTION: int = 14
    POOLER_SAMPLING_RATIO: int = 0
    POOLER_ALIGNED: bool = True


@dataclass
class ModelConfig:
    # "GeneralizedRCNN": the open-vocabulary detector. "ProposalNetwork": a class-agnostic proposal model (backbone,
    # MODEL.PROPOSAL_GENERATOR, optionally a RoI stage), trained on base boxes and evaluated by proposal recall
    META_ARCHITECTURE: str = "GeneralizedRCNN"
    DEVICE: str = "auto"  # "auto" picks CUDA where available
    WEIGHTS: str = ""  # an `ovd` checkpoint, a bare state dict, or a detectron2-format checkpoint of the original code
    MASK_ON: bool = False  # class-agnostic mask head (Mask R-CNN, LVIS)
    # Region-based knowledge distillation (DESIGN §2); the original code's key names
    DISTILLATION: bool = False
    RKD_FEAT_PATH: str = ""  # region-embedding store of the training images (tools/extract_region_embeddings.py)
    NUM_DISTIL_PROP: int = 5  # regions per image used for distillation
    DISTIL_L1_LOSS_WEIGHT: float = 0.15  # × 100, as in the paper
    IRM_LOSS_WEIGHT: float = 0.15  # × 100
    IRM_LOSS_NORMALIZE: bool = False  # divide the IRM term by the N² entries of the Gram matrix (ours; off = paper)
    RKD_ILS_FEAT_PATH: str = ""  # region store of the image-labelled images; empty: RKD_FEAT_PATH holds them too
    # Pseudo image-level supervision (DESIGN §2)
    PIS_PROP_PATH: str = ""  # pseudo boxes (COCO JSON) of the image-labelled dataset (tools/mine_pseudo_labels.py)
    PIXEL_MEAN: List[float] = _list(103.530, 116.280, 123.675)
    PIXEL_STD: List[float] = _list(1.0, 1.0, 1.0)
    # Vocabulary at test time; empty: the training one (MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH).
    TEST_ZEROSHOT_WEIGHT_PATH: str = ""
    BACKBONE: BackboneConfig = field(default_factory=BackboneConfig)
    RESNETS: ResNetConfig = field(default_factory=ResNetConfig)
    FPN: FPNConfig = field(default_factory=FPNConfig)
    ANCHOR_GENERATOR: AnchorConfig = field(default_factory=AnchorConfig)
    PROPOSAL_GENERATOR: ProposalGeneratorConfig = field(default_factory=ProposalGeneratorConfig)
    RPN: RPNConfig = field(default_factory=RPNConfig)
    ROI_HEADS: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    ROI_BOX_HEAD: ROIBoxHeadConfig = field(default_factory=ROIBoxHeadConfig)
    ROI_MASK_HEAD: ROIMaskHeadConfig = field(default_factory=ROIMaskHeadConfig)


@dataclass
class CustomDatasetConfig:
    """A dataset declared in the config (DATASETS.CUSTOM); its NAME then works like a built-in one."""

    NAME: str = ""
    JSON: str = ""  # COCO JSON; relative paths resolve against the folder of the config file that declares it
    IMAGES: str = ""  # image folder of its file_name entries
    NOVEL: List[str] = _list()  # classes evaluated as novel (never boxed in training): category names or ids
    ANN_TYPE: str = "box"  # "box" (annotations) or "image" (images[].pos_category_ids: image-level labels)
    # "image" only: COCO captions to turn into the labels at JSON (tools/run_chain.py runs captions_to_image_labels)
    CAPTIONS: str = ""


@dataclass
class DatasetsConfig:
    TRAIN: List[str] = _list("coco_zeroshot_train_oriorder")
    TEST: List[str] = _list("coco_generalized_zeroshot_val")
    CUSTOM: List[CustomDatasetConfig] = _list()


@dataclass
class DataLoaderConfig:
    NUM_WORKERS: int = 4
    FILTER_EMPTY_ANNOTATIONS: bool = False
    # Several training sources (DATASETS.TRAIN), one entry each; empty lists mean one box-labelled source.
    DATASET_ANN: List[str] = _list()  # "box" (COCO boxes) or "image" (pos_category_ids + MODEL.PIS_PROP_PATH boxes)
    DATASET_RATIO: List[float] = _list()  # how often each source supplies a batch, e.g. [1, 4]
    DATASET_BS: List[int] = _list()  # images per batch and worker, per source; empty: SOLVER.IMS_PER_BATCH / workers
    DATASET_MIN_SIZES: List[List[int]] = _list()  # per-source INPUT.MIN_SIZE_TRAIN
    DATASET_MAX_SIZES: List[int] = _list()  # per-source INPUT.MAX_SIZE_TRAIN
    # "TrainingSampler" (seeded permutations) or "RepeatFactorTrainingSampler" (LVIS: images of rare categories
    # repeat, r = max(1, sqrt(REPEAT_THRESHOLD / fraction of images with the category)); box-labelled sources only)
    SAMPLER_TRAIN: str = "TrainingSampler"
    REPEAT_THRESHOLD: float = 0.001


@dataclass
class InputConfig:
    FORMAT: str = "BGR"  # channel order the model sees: "BGR" (MSRA/detectron2 weights) or "RGB"
    MIN_SIZE_TRAIN: List[int] = _list(800)
    MIN_SIZE_TRAIN_SAMPLING: str = "choice"  # "choice" or "range"
    MAX_SIZE_TRAIN: int = 1333
    MIN_SIZE_TEST: int = 800
    MAX_SIZE_TEST: int = 1333
    RANDOM_FLIP: str = "horizontal"  # "horizontal" or "none"
    SIZE_DIVISIBILITY: int = 0  # pad the batch to a multiple of this (32 for FPN)


@dataclass
class AMPConfig:
    ENABLED: bool = True  # CUDA only; ignored on CPU


@dataclass
class SolverConfig:
    OPTIMIZER: str = "SGD"  # "SGD" or "AdamW"
    BASE_LR: float = 0.02
    MOMENTUM: float = 0.9
    WEIGHT_DECAY: float = 1e-4
    MAX_ITER: int = 90000
    STEPS: List[int] = _list(60000, 80000)
    GAMMA: float = 0.1
    WARMUP_ITERS: int = 1000
    WARMUP_FACTOR: float = 0.001
    IMS_PER_BATCH: int = 16  # total over all workers
    CHECKPOINT_PERIOD: int = 5000
    CLIP_GRADIENTS: float = 0.0  # max global grad norm; 0 disables
    # A NaN/Inf loss stops training, leaving OUTPUT_DIR/nonfinite_iter_<it>.json (the batch's images, the losses) and
    # .pth (the model before that step). True: skip such steps instead (no optimizer step; counted in the metrics as
    # nonfinite_skipped), and stop only after NONFINITE_SKIP_LIMIT of them in a row (0: never).
    SKIP_NONFINITE_LOSS: bool = False
    NONFINITE_SKIP_LIMIT: int = 10
    AMP: AMPConfig = field(default_factory=AMPConfig)


@dataclass
class TestConfig:
    EVAL_PERIOD: int = 0  # 0: evaluate only at the end
    DETECTIONS_PER_IMAGE: int = 100
    IMS_PER_BATCH: int = 1  # images per inference batch on each worker
    # region-embedding store of the first test dataset: evaluation then also reports distillation fidelity
    RKD_FEAT_PATH: str = ""


@dataclass
class FinetuneSolverConfig:
    """The schedule of the stages that start from another stage's weights (0: SOLVER's own value)."""

    BASE_LR: float = 0.0
    MAX_ITER: int = 0
    STEPS: List[int] = _list()
    WARMUP_ITERS: int = 0


@dataclass
class ChainConfig:
    """`tools/run_chain.py`: the whole method on DATASETS.TRAIN (a box-labelled source, optionally an image-labelled
    one, told apart by DATALOADER.DATASET_ANN) and DATASETS.TEST[0]. Each stage is this config plus the stage's
    recipe (`ovd/engine/chain.py`)."""

    # the teacher: an open_clip model name, or local-dir:/path of a saved open_clip model
    CLIP_MODEL: str = "ViT-B-32"
    CLIP_PRETRAINED: str = "openai"  # open_clip tag (downloads where online), a local checkpoint file, or ""
    PREPARE: str = ""  # "shapes": generate the shapes world and train its toy teacher first
    WORK_DIR: str = ""  # text embeddings, proposals, region stores, pseudo boxes; empty: OUTPUT_DIR/offline
    PROPOSALS: str = "OLN"  # the proposal model: "OLN" or "RPN" (or "oracle" where ALL_BOXES_DATASET exists)
    PROPOSAL_ITERS: int = 0  # its training iterations (0: SOLVER.MAX_ITER)
    PROPOSALS_PER_IMAGE: int = 50
    TRAIN_REGIONS: int = 10  # regions per training image (RKD uses the best NUM_DISTIL_PROP, the miner chooses among all)
    TEST_REGIONS: int = 5
    # every true box of the training images (novel too): only to measure pseudo-box precision and for oracle proposals
    ALL_BOXES_DATASET: str = ""
    FINETUNE: FinetuneSolverConfig = field(default_factory=FinetuneSolverConfig)


@dataclass
class Config:
    MODEL: ModelConfig = field(default_factory=ModelConfig)
    DATASETS: DatasetsConfig = field(default_factory=DatasetsConfig)
    DATALOADER: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    INPUT: InputConfig = field(default_factory=InputConfig)
    SOLVER: SolverConfig = field(default_factory=SolverConfig)
    TEST: TestConfig = field(default_factory=TestConfig)
    CHAIN: ChainConfig = field(default_factory=ChainConfig)
    OUTPUT_DIR: str = "./output"
    SEED: int = 0
    LOG_PERIOD: int = 20
