"""Checkpoints: written atomically with a `last_checkpoint` pointer; `--resume` falls back past a broken file.

A training checkpoint holds the model, optimizer, LR scheduler, AMP scaler, iteration and the trainer's own counters.
No RNG state is needed: the trainer reseeds every iteration from (SEED, rank, iteration) and the data stream is a
function of the iteration (`TrainingBatchSampler`), so a resumed run continues exactly as the uninterrupted one
(bit for bit on CPU; on CUDA, where kernels such as RoIAlign's backward are not deterministic, no two runs are).

A process killed while saving leaves the previous checkpoint and the pointer as they were (the new file is written
to a temporary name and renamed when complete). A checkpoint damaged later (truncated, bytes changed) is refused on
reading: ``torch.save`` writes a zip archive with a CRC-32 of every member, which ``torch.load`` does not check.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ovd.modeling.detectron2_checkpoint import convert_detectron2_state, is_detectron2_state
from ovd.utils.io import atomic_path, remove_partial_files, write_text

logger = logging.getLogger(__name__)
POINTER = "last_checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as a dict (``"model"`` and, for training checkpoints, optimizer/scheduler/scaler/iteration).

    detectron2-format checkpoints of the original code are recognised by their keys and renamed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _verify_crc(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong format, disallowed pickled object: all mean "unusable file"
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_error(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict")
    if "model" not in data:
        # a bare state dict
        data = {"model": data}
    if is_detectron2_state(data["model"]):
        data = {**data, "model": convert_detectron2_state(data["model"], source=str(path))}
    return data


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, allow_missing: bool = False) -> list[str]:
    """Load ``state`` into ``model``; unexpected or mis-shaped keys are an error listing them, and so are missing
    ones unless ``allow_missing`` (initialising a larger model, e.g. weight transfer from an RKD checkpoint: the new
    parts keep their initialisation). Returns the missing keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if allow_missing:
        missing_ok, missing = missing, []
    unexpected = sorted(set(state) - set(own))
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not fit the model built from the config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        for k, got, want in shapes[:10]:
            lines.append(f"  {k}: checkpoint shape {list(got)}, model shape {list(want)}")
        raise CheckpointError("\n".join(lines))
    if allow_missing:
        model.load_state_dict(state, strict=False)
        return missing_ok
    model.load_state_dict(state)
    return []


class Checkpointer:
    """Saves and finds training checkpoints in ``output_dir``."""

    def __init__(self, output_dir: str | Path, *, model: nn.Module, **objects: Any) -> None:
        self.dir = Path(output_dir)
        self.model = model
        self.objects = objects  # name -> object with state_dict()/load_state_dict()

    def save(self, name: str, iteration: int, *, state: dict[str, Any] | None = None, latest: bool = True) -> Path:
        """Write ``<name>.pth`` and (``latest``) point ``last_checkpoint`` at it.

        ``state``: the trainer's own counters (plain values), given back by :meth:`resume`. ``latest=False`` keeps a
        file aside (named other than ``model_*``, it is never resumed from).
        """
        data = {"model": self.model.state_dict(), "iteration": iteration, "trainer": dict(state or {})}
        data.update({k: v.state_dict() for k, v in self.objects.items()})
        path = self.dir / f"{name}.pth"
        # what writers killed before left (only the main process saves, so none is being written now)
        for pattern in ("model_*.pth", POINTER):
            remove_partial_files(self.dir / pattern)
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        if latest:
            write_text(self.dir / POINTER, path.name)
        logger.info("saved checkpoint %s (iteration %d)", path, iteration)
        return path

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first: the pointer's target, then the others by iteration."""
        found = sorted(self.dir.glob("model_*.pth"), key=_iteration_of, reverse=True)
        pointer = self.dir / POINTER
        if pointer.is_file():
            target = self.dir / pointer.read_text().strip()
            found = [target] + [p for p in found if p != target]
        return found

    def resume(self) -> tuple[int, dict[str, Any]]:
        """Restore the newest readable checkpoint, falling back to older ones past unreadable files.

        Returns:
            ``(iteration to start at, trainer state given to save)``; ``(0, {})`` if there is no checkpoint.

        Raises:
            CheckpointError: checkpoints exist but none can be read (listing why), rather than silently starting
                again from scratch.
        """
        unusable = []
        for path in self.candidates():
            try:
                data = read_checkpoint(path)
            except FileNotFoundError as e:  # a pointer to a deleted file
                logger.warning("skipping: %s", e)
                continue
            except CheckpointError as e:
                logger.warning("skipping unusable checkpoint: %s", e)
                unusable.append(str(e))
                continue
            load_model_state(self.model, data["model"], source=str(path))
            for k, obj in self.objects.items():
                if k not in data:
                    raise CheckpointError(f"checkpoint {path} has no {k!r} state; cannot resume training from it")
                obj.load_state_dict(data[k])
            logger.info("resumed from %s at iteration %d", path, data["iteration"])
            return int(data["iteration"]), dict(data.get("trainer", {}))
        if unusable:
            raise CheckpointError(f"--resume: no usable checkpoint in {self.dir} (delete them to start from scratch):"
                                  + "".join(f"\n  {e}" for e in unusable))
        return 0, {}


def _load_error(e: Exception) -> str:
    """What ``torch.load(weights_only=True)`` found wrong, without its advice to load unsafely."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            return (f"it holds a Python object ({found.group(1)}) besides tensors; ovd reads weights only, never "
                    "unpickles objects: save a dict of tensors, e.g. torch.save({'model': model.state_dict()}, f)")
        return "it is not a file written by torch.save (or holds Python objects besides tensors)"
    if "central directory" in text or "zip archive" in text:
        return "the zip archive torch.save writes is truncated or damaged; copy the file again"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _verify_crc(path: Path) -> None:
    """Raise CheckpointError if ``path`` is a zip archive (what ``torch.save`` writes) with a member whose bytes do
    not match their CRC-32. Other files (truncated ones, legacy pickles) are left to ``torch.load``."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: the bytes of {bad!r} do not match their CRC-32 "
                              "(damaged after it was written)")


def _iteration_of(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else 1 << 62  # model_final sorts first
