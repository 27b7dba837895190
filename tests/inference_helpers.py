"""A tiny trained-looking detector on disk for the inference tests: random weights, shapes-world config, a
random-init toy CLIP saved as a ``local-dir:`` folder whose text embeddings are the training vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ovd.clip import encode_text, load_clip, save_clip, save_text_embeddings
from ovd.config import load_config
from ovd.data.shapes import SHAPES_CATEGORIES
from ovd.modeling.build import build_model

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "shapes" / "base.yaml")
SHAPES_NAMES = [c["name"] for c in SHAPES_CATEGORIES]

# conftest.TINY_OVERRIDES' quarter-width network with the toy CLIP's 128-d embeddings
TINY_DETECTOR = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM", "128",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128",
]


@dataclass
class TinyDetectorFiles:
    overrides: list[str]  # config overrides naming the training embeddings
    weights: Path  # the detector checkpoint
    clip_dir: Path  # the toy CLIP folder (load with "local-dir:<clip_dir>")


def make_tiny_detector_files(root: Path, *, seed: int = 0) -> TinyDetectorFiles:
    """Write the toy CLIP, the training text embeddings (16 shapes names, sidecar naming the CLIP) and a checkpoint."""
    clip_dir = save_clip(load_clip("ovd-toy-vit", seed=seed), root / "toy_clip")
    model_name = f"local-dir:{clip_dir}"
    embeds = encode_text(load_clip(model_name), SHAPES_NAMES)
    emb_path = save_text_embeddings(root / "train_vocab.npy", embeds, names=SHAPES_NAMES,
                                    templates=["a photo of a {}"], model_name=model_name, pretrained=None)
    overrides = TINY_DETECTOR + ["MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", str(emb_path)]
    torch.manual_seed(seed)
    model = build_model(load_config(CONFIG, overrides))
    weights = root / "model_final.pth"
    torch.save({"model": model.state_dict()}, weights)
    return TinyDetectorFiles(overrides=overrides, weights=weights, clip_dir=clip_dir)
