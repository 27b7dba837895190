"""The recorded parity fixtures of the original detectron2-based code (DESIGN §7), read for the parity tests.

A fixture is a folder holding the recorded detectron2 config (`config.yaml`, `cfg.dump()`), a detectron2-format
checkpoint, two images and `outputs.npz` (see its README.md). Everything a test needs — widths, test sizes,
thresholds, loss settings, files — comes from the fixture's own `config.yaml`, so another fixture recorded the same
way runs unchanged. The fixtures live in tests/fixtures; $OVD_PARITY_FIXTURES names another folder of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import yaml

from ovd.config import Config, load_config
from ovd.engine.checkpoint import load_model_state, read_checkpoint
from ovd.modeling.build import build_model
from ovd.modeling.detector import OVDetector

# the recording procedure (the fixtures' README.md): torch.manual_seed(777) right before the training forward
TRAIN_SEED = 777
# the original code multiplies both RKD loss weights by its fixed rkd_temperature
RKD_TEMPERATURE = 100.0

# Recorded keys that `ovd` spells the same way but that do not describe the model's numerics, or name files
NOT_COPIED = ("MODEL.META_ARCHITECTURE", "MODEL.BACKBONE.NAME", "MODEL.DEVICE", "MODEL.WEIGHTS",
              "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", "MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH")
COPIED_OUTSIDE_MODEL = ("INPUT.FORMAT", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "TEST.DETECTIONS_PER_IMAGE")
BACKBONES = {"build_resnet_backbone": "resnet_c4", "build_resnet_fpn_backbone": "resnet_fpn"}
# Recorded settings `ovd` has no key for because it only implements this value (checked, not translated)
FIXED = {
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": True, "MODEL.ROI_BOX_HEAD.USE_ZEROSHOT_CLS": True,
    "MODEL.ROI_BOX_HEAD.NORM_WEIGHT": True, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0, "MODEL.ROI_HEADS.IOU_LABELS": [0, 1], "MODEL.RPN.IOU_LABELS": [0, -1, 1],
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead", "MODEL.RPN.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.RPN.BOUNDARY_THRESH": -1, "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "MODEL.RESNETS.RES5_DILATION": 1, "MODEL.FPN.NORM": "", "MODEL.FPN.FUSE_TYPE": "sum",
}


def fixtures_root() -> Path:
    """tests/fixtures, or the folder $OVD_PARITY_FIXTURES names; an error (not a skip) where it is missing."""
    root = Path(os.environ.get("OVD_PARITY_FIXTURES", Path(__file__).resolve().parent / "fixtures"))
    if not root.is_dir():
        raise FileNotFoundError(f"parity fixtures not found at {root} ($OVD_PARITY_FIXTURES)")
    return root


def fixture_names(root: Path | None = None) -> list[str]:
    """Every fixture folder (one with config.yaml and outputs.npz) under ``root``."""
    root = root or fixtures_root()
    names = sorted(p.name for p in root.iterdir() if (p / "config.yaml").is_file() and (p / "outputs.npz").is_file())
    if not names:
        raise FileNotFoundError(f"no parity fixture (a folder with config.yaml and outputs.npz) in {root}")
    return names


def read_recorded_config(root: Path) -> dict[str, object]:
    """The recorded detectron2 config, flattened to dotted keys."""
    def flat(node: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return flat(yaml.safe_load((root / "config.yaml").read_text()))


def ovd_config(recorded: dict[str, object], root: Path, extra: list[str] = ()) -> Config:
    """Our config for a recorded detectron2 config: schema defaults, then every recorded model key that `ovd` spells
    the same way, then the few that it spells differently; ``extra`` overrides last."""
    unsupported = {k: recorded[k] for k, v in FIXED.items() if k in recorded and recorded[k] != v}
    if unsupported:
        raise ValueError(f"{root}: settings ovd does not implement: {unsupported}")
    ours = set(schema_keys(Config()))
    copied = {k: v for k, v in recorded.items()
              if k in ours and k not in NOT_COPIED and (k.startswith("MODEL.") or k in COPIED_OUTSIDE_MODEL)}
    thresholds = recorded["MODEL.ROI_HEADS.IOU_THRESHOLDS"]
    if len(thresholds) != 1:
        raise ValueError(f"{root}: ROI_HEADS.IOU_THRESHOLDS {thresholds}: ovd has one foreground threshold")
    fpn = recorded["MODEL.BACKBONE.NAME"] == "build_resnet_fpn_backbone"
    translated = {
        "MODEL.BACKBONE.NAME": BACKBONES[recorded["MODEL.BACKBONE.NAME"]],
        "MODEL.ROI_HEADS.IOU_THRESHOLD": thresholds[0],
        "MODEL.RPN.MIN_SIZE": recorded["MODEL.PROPOSAL_GENERATOR.MIN_SIZE"],
        "MODEL.ROI_BOX_HEAD.POOLER_ALIGNED": recorded["MODEL.ROI_BOX_HEAD.POOLER_TYPE"] == "ROIAlignV2",
        "MODEL.ROI_MASK_HEAD.POOLER_ALIGNED": recorded["MODEL.ROI_MASK_HEAD.POOLER_TYPE"] == "ROIAlignV2",
        "INPUT.SIZE_DIVISIBILITY": 32 if fpn else 0,  # detectron2's FPN backbone pads to its coarsest stride
        "MODEL.ROI_HEADS.TOPK_CANDIDATES_TEST": 0,  # detectron2 keeps every candidate above the threshold
        "MODEL.IRM_LOSS_NORMALIZE": False,  # the original's summed IRM
        "MODEL.DEVICE": "cpu",
        "MODEL.WEIGHTS": str(root / recorded["MODEL.WEIGHTS"]),
        "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH": str(root / recorded["MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH"]),
        "MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH": str(root / recorded["MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH"]),
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**copied, **translated}.items()]
    return load_config(None, overrides + list(extra))


def schema_keys(node: object, prefix: str = "") -> list[str]:
    """The dotted names of every leaf key of our config."""
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        keys += schema_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return keys


def width_overrides(shapes: dict[str, list[int]]) -> list[str]:
    """Config overrides giving the widths of a detectron2 state dict listing (name → shape)."""
    def out_channels(suffix: str) -> int | None:
        found = [s[0] for k, s in shapes.items() if k.endswith(suffix)]
        return found[0] if found else None

    widths = {
        "MODEL.RESNETS.STEM_OUT_CHANNELS": out_channels("stem.conv1.weight"),
        "MODEL.RESNETS.WIDTH_PER_GROUP": out_channels("res2.0.conv1.weight"),  # NUM_GROUPS is 1
        "MODEL.RESNETS.RES2_OUT_CHANNELS": out_channels("res2.0.conv3.weight"),
        "MODEL.FPN.OUT_CHANNELS": out_channels("backbone.fpn_output2.weight"),
        "MODEL.ROI_BOX_HEAD.FC_DIM": out_channels("roi_heads.box_head.fc1.weight"),
        "MODEL.ROI_MASK_HEAD.CONV_DIM": out_channels("roi_heads.mask_head.mask_fcn1.weight"),
    }
    return [f"{k}={v}" for k, v in widths.items() if v is not None]


@dataclass
class ParityFixture:
    name: str
    root: Path

    @cached_property
    def recorded_config(self) -> dict[str, object]:
        return read_recorded_config(self.root)

    @cached_property
    def cfg(self) -> Config:
        return ovd_config(self.recorded_config, self.root)

    @cached_property
    def model(self) -> OVDetector:
        """The tiny model, built from the recorded config, with the fixture's checkpoint, in eval mode."""
        model = build_model(self.cfg)
        load_model_state(model, read_checkpoint(self.cfg.MODEL.WEIGHTS)["model"], source=self.cfg.MODEL.WEIGHTS)
        return model.eval()

    @cached_property
    def rec(self) -> dict[str, np.ndarray]:
        """outputs.npz, read once (its members are LZMA-compressed: each access of an NpzFile decompresses)."""
        with np.load(self.root / "outputs.npz", allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    @cached_property
    def keys(self) -> dict[str, dict[str, dict]]:
        """keys.json: {"tiny" | "full_size": {detectron2 name: {"shape", ...}}}."""
        return json.loads((self.root / "keys.json").read_text())

    @property
    def feature_names(self) -> list[str]:
        """The backbone outputs recorded for image 1 (res4, or p2..p6)."""
        return sorted(k[len("img1_feat_"):] for k in self.rec if k.startswith("img1_feat_"))

    def recorded_features(self) -> dict[str, torch.Tensor]:
        return {f: torch.from_numpy(self.rec[f"img1_feat_{f}"]) for f in self.feature_names}

    def resize_factors(self, i: int) -> tuple[float, float]:
        """(y, x) factors from image ``i``'s original pixels to the resized image the model saw at test time."""
        (h, w), (rh, rw) = self.rec[f"img{i}_orig_hw"].tolist(), self.rec[f"img{i}_resized_hw"].tolist()
        return rh / h, rw / w

    def rkd_loss_weights(self) -> tuple[float, float]:
        """(L1, IRM) weights as the original code applies them."""
        return (self.cfg.MODEL.DISTIL_L1_LOSS_WEIGHT * RKD_TEMPERATURE, self.cfg.MODEL.IRM_LOSS_WEIGHT * RKD_TEMPERATURE)

    @cached_property
    def full_size_model(self) -> OVDetector:
        """The same config at the widths of the released checkpoints (keys.json "full_size"), random weights."""
        shapes = {k: v["shape"] for k, v in self.keys["full_size"].items()}
        dim, columns = shapes["roi_heads.box_predictor.cls_score.zs_weight"]
        cfg = ovd_config(self.recorded_config, self.root, width_overrides(shapes))
        return build_model(cfg, text_embeds=torch.randn(columns - 1, dim), class_image_counts=torch.ones(columns - 1))
