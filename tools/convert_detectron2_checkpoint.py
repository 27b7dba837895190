"""Convert a detectron2-format checkpoint of the original object-centric OVD code to an `ovd` checkpoint.

    python tools/convert_detectron2_checkpoint.py IN.pth OUT.pth

Not needed for evaluation or fine-tuning (MODEL.WEIGHTS reads detectron2 checkpoints directly); useful to store the
converted weights once. Loading uses `torch.load(weights_only=True)`: no arbitrary code runs.
"""

from __future__ import annotations

import argparse

import torch

from ovd.engine.checkpoint import read_checkpoint
from ovd.modeling.detectron2_checkpoint import is_detectron2_state
from ovd.utils.io import atomic_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("output")
    args = p.parse_args(argv)
    raw = torch.load(args.input, map_location="cpu", weights_only=True)
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not is_detectron2_state(state):
        raise SystemExit(f"{args.input} is not a detectron2-format checkpoint (no backbone.stem / proposal_generator keys)")
    converted = read_checkpoint(args.input)["model"]
    with atomic_path(args.output) as tmp:
        torch.save({"model": converted}, tmp)
    print(f"converted {len(state)} detectron2 tensors -> {len(converted)} ovd tensors: {args.output}")


if __name__ == "__main__":
    main()
