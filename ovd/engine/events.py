"""Training metrics: `metrics.jsonl` (one JSON object per logged iteration), TensorBoard, and a console line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ovd.utils.io import write_text

logger = logging.getLogger("ovd.train")


class MetricsWriter:
    """Writes metrics from the main process. On resume, entries past ``start_iter`` (from a run that was
    stopped after its last checkpoint) are dropped so the file reads as one uninterrupted run."""

    def __init__(self, output_dir: str | Path, *, max_iter: int, start_iter: int = 0, tensorboard: bool = True) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.max_iter, self.start_iter = max_iter, start_iter
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _iteration(line) < start_iter]
            write_text(self.path, "".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_iter)
        self._t0, self._it0 = time.perf_counter(), start_iter

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` for (0-based) ``iteration``."""
        record = {"iteration": iteration, **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, iteration)

    def console(self, iteration: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        done = iteration + 1 - self._it0
        s_per_iter = (now - self._t0) / max(done, 1)
        eta = s_per_iter * (self.max_iter - iteration - 1)
        losses = "  ".join(f"{k}: {v:.4g}" for k, v in metrics.items() if k.startswith("loss") or k == "total_loss")
        logger.info(
            "iter: %d/%d  %s  lr: %.3g  %.3f s/iter  eta: %s",
            iteration + 1, self.max_iter, losses, metrics.get("lr", 0.0), s_per_iter, _fmt_eta(eta),
        )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _iteration(line: str) -> int:
    try:
        return int(json.loads(line).get("iteration", -1))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line is dropped with the rest


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
