"""Process set-up shared by the tools: logging to console and OUTPUT_DIR/log.txt, device choice."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from ovd.config import Config
from ovd.utils.comm import get_rank, get_world_size


def use_cuda(cfg: Config) -> bool:
    return cfg.MODEL.DEVICE.startswith("cuda") or (cfg.MODEL.DEVICE == "auto" and torch.cuda.is_available())


def setup_logging(output_dir: str | None = None, level: int = logging.INFO) -> None:
    """Log ``ovd.*`` to stdout on the main worker (warnings only elsewhere), and to OUTPUT_DIR/log.txt."""
    root = logging.getLogger("ovd")
    root.setLevel(level)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(level if get_rank() == 0 else logging.WARNING)
    root.addHandler(console)
    if output_dir and get_rank() == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output_dir) / "log.txt")
        fh.setFormatter(fmt)
        root.addHandler(fh)


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
