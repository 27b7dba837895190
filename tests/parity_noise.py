"""How far float32 round-off alone moves each training loss of a parity fixture (the evidence behind the tolerances
of `test_parity_detectron2.test_training_losses`).

    python tests/parity_noise.py [--fixture NAME] [--runs 16] [--noise 1e-5] [--post-nms-topk-train N]

For each fixture: our losses on the recorded batch from the recorded seed, the same forward in float64, then
``--runs`` forwards whose backbone outputs get Gaussian noise of ``--noise`` times each map's std (1e-5 is the
measured difference between our features and the recorded ones, i.e. between two machines). The noise comes from a
separate generator, so the random draws of the forward are untouched. ``--post-nms-topk-train`` raises the proposal
cap above what survives NMS, to show what happens to a fixture whose images keep fewer proposals than the cap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from detectron2_fixtures import TRAIN_SEED, ParityFixture, fixture_names, fixtures_root  # noqa: E402
from test_parity_detectron2 import RECORDED_LOSSES, training_batch  # noqa: E402


def losses_of(fx: ParityFixture, samples, *, dtype=torch.float32, noise: float = 0.0, generator=None) -> dict:
    model = fx.model.to(dtype)

    def perturb(module, inputs, out):
        return {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) * v.std() * noise for k, v in out.items()}

    hook = model.backbone.register_forward_hook(perturb) if noise else None
    model.train()
    try:
        torch.manual_seed(TRAIN_SEED)
        with torch.no_grad():
            return {k: v.item() for k, v in model.forward_train(samples).items()}
    finally:
        model.eval().float()
        if hook:
            hook.remove()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixture", action="append", help="fixture name (default: all)")
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--noise", type=float, default=1e-5)
    p.add_argument("--post-nms-topk-train", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    root = fixtures_root()
    for name in args.fixture or fixture_names(root):
        fx = ParityFixture(name, root / name)
        if args.post_nms_topk_train:
            fx.model.rpn.post_nms_topk[True] = args.post_nms_topk_train
        samples = training_batch(fx)
        ours = losses_of(fx, samples)
        f64 = losses_of(fx, samples, dtype=torch.float64)
        gen = torch.Generator().manual_seed(0)
        noisy = [losses_of(fx, samples, noise=args.noise, generator=gen) for _ in range(args.runs)]
        print(f"{name}: relative difference to the recorded loss (noise {args.noise:g} of each map's std, "
              f"{args.runs} runs)")
        print(f"  {'loss':16s} {'recorded':>10s} {'ours':>9s} {'float64':>9s} {'noisy min':>10s} {'noisy max':>10s}")
        for k, v in ours.items():
            ref = fx.rec[RECORDED_LOSSES[k]].item()
            rel = np.array([n[k] for n in noisy]) / ref - 1
            print(f"  {k:16s} {ref:10.6f} {v / ref - 1:+9.2e} {f64[k] / ref - 1:+9.2e} {rel.min():+10.2e} {rel.max():+10.2e}")


if __name__ == "__main__":
    main()
