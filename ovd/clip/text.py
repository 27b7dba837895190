"""Text embeddings of a vocabulary: prompt, encode, ensemble, cache as `.npy` + JSON sidecar (DESIGN §2, §4)."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovd.clip.models import ClipBundle
from ovd.utils.io import atomic_path, read_json, write_json

__all__ = [
    "DEFAULT_TEMPLATES",
    "TextEmbeddings",
    "encode_text",
    "load_templates",
    "load_text_embeddings",
    "read_lines",
    "save_text_embeddings",
]

# The paper's single prompt (DESIGN §2); ensembles come from a template file.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}",)
_NPY_MAGIC = b"\x93NUMPY"


@dataclass
class TextEmbeddings:
    """A cached vocabulary classifier.

    Attributes:
        embeds: float32 [C, D], rows L2-normalised.
        names: the C class names from the sidecar; None for a plain `.npy` without one.
        meta: the sidecar's content ({} without one).
    """

    embeds: np.ndarray
    names: list[str] | None
    meta: dict[str, Any] = field(default_factory=dict)


def read_lines(path: str | os.PathLike, *, what: str = "file") -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped; a missing file raises FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_templates(path: str | os.PathLike) -> tuple[str, ...]:
    """Prompt templates from a file, one per line, each with one ``{}`` where the class name goes."""
    templates = tuple(read_lines(path, what="template file"))
    if not templates:
        raise ValueError(f"template file {path} has no templates")
    _check_templates(templates)
    return templates


def check_names(names: Sequence[str]) -> None:
    """Raise for a vocabulary that is a bare string, empty, or has a blank or repeated name."""
    if isinstance(names, str):
        raise TypeError(f"a vocabulary is a list of class names, got the string {names!r}")
    if len(names) == 0:
        raise ValueError("the vocabulary is empty: give at least one class name")
    blank = [i for i, n in enumerate(names) if not n.strip()]
    if blank:
        raise ValueError(f"blank class names at positions {blank}")
    duplicates = [n for n, k in collections.Counter(names).items() if k > 1]
    if duplicates:
        raise ValueError(f"duplicate class names: {duplicates}")


@torch.no_grad()
def encode_text(
    bundle: ClipBundle,
    names: Sequence[str],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Encode a vocabulary with CLIP's text tower.

    Each prompt (a template with its ``{}`` replaced by a name) is encoded and L2-normalised; with several
    templates the per-template embeddings are averaged and normalised again (CLIP's prompt ensembling).

    Args:
        bundle: from :func:`ovd.clip.load_clip`.
        names: C distinct, non-empty class names.
        templates: T templates, each with one ``{}``.
        batch_size: prompts per forward pass; the result does not depend on it.

    Returns:
        Tensor[C, D] float32 on the CPU, rows L2-normalised.

    Underscores in a name read as spaces in its prompts.

    Raises:
        ValueError: no names, blank or duplicate names, a template without ``{}``, or a prompt longer than the
            tokenizer's context length (it would be silently truncated).
    """
    check_names(names)
    names = list(names)
    templates = tuple(templates)
    if not templates:
        raise ValueError("encode_text needs at least one template")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _check_templates(templates)

    # Template-major order, so the result reshapes to [T, C, D]. LVIS writes names with underscores
    # (`aerosol_can`, `bow_(weapon)`): the prompt reads them as spaces, as the original code's embeddings did.
    prompts = [t.replace("{}", n.replace("_", " ")) for t in templates for n in names]
    # One token more than the model takes: anything but padding in that last column means the prompt would be cut.
    ctx = bundle.context_length
    tokens = bundle.tokenizer(prompts, context_length=ctx + 1)
    pad = int(bundle.tokenizer([""], context_length=ctx + 1)[0, ctx])
    too_long = list(dict.fromkeys(names[i % len(names)] for i in (tokens[:, ctx] != pad).nonzero()[:, 0].tolist()))
    if too_long:
        raise ValueError(
            f"class names whose prompts exceed the text tower's {ctx} tokens "
            f"(they would be silently truncated): {too_long[:10]}{' ...' if len(too_long) > 10 else ''}"
        )
    tokens = tokens[:, :ctx].to(next(bundle.model.parameters()).device)
    chunks = [bundle.model.encode_text(batch).float().cpu() for batch in tokens.split(batch_size)]
    per_template = F.normalize(torch.cat(chunks).view(len(templates), len(names), -1), dim=-1)
    return F.normalize(per_template.mean(dim=0), dim=-1)


def save_text_embeddings(
    path: str | os.PathLike,
    embeds: torch.Tensor | np.ndarray,
    *,
    names: Sequence[str],
    templates: Sequence[str],
    model_name: str,
    pretrained: str | None,
) -> Path:
    """Write ``embeds`` (float32 [C, D], L2-normalised rows) to ``path`` (``.npy``) and a JSON sidecar beside it.

    The sidecar ``path.with_suffix(".json")`` holds ``names``, ``templates``, ``model``, ``pretrained``, ``dim`` and
    ``normalized``. Both files are written atomically.

    Returns:
        the `.npy` path.
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"text embeddings path must end in .npy, got {path}")
    if isinstance(embeds, torch.Tensor):
        embeds = embeds.detach().cpu().numpy()
    embeds = np.ascontiguousarray(embeds, dtype=np.float32)
    names = list(names)
    if embeds.ndim != 2 or embeds.shape[0] != len(names):
        raise ValueError(f"embeds must be [C, D] with C = {len(names)} names, got shape {list(embeds.shape)}")
    if not np.isfinite(embeds).all():
        raise ValueError("embeds contain non-finite values")
    # Through a file handle: np.save given a name without ".npy" (our temporary file) would append one.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, embeds, allow_pickle=False)
    meta = {
        "names": names,
        "templates": list(templates),
        "model": model_name,
        "pretrained": pretrained,
        "dim": int(embeds.shape[1]),
        "normalized": True,
    }
    write_json(path.with_suffix(".json"), meta, indent=2)
    return path


def load_text_embeddings(path: str | os.PathLike, *, expected_names: Sequence[str] | None = None) -> TextEmbeddings:
    """Load cached text embeddings: ours (with sidecar) or a plain [C, D] `.npy` from other OVD code (Detic's layout).

    Plain files may be float16 and unnormalised: they come back float32 with rows L2-normalised. Files whose sidecar
    says ``normalized`` are returned exactly as stored. Never unpickles.

    Args:
        path: the `.npy` file.
        expected_names: the vocabulary the caller will index with; checked against the row count and the sidecar names.

    Raises:
        FileNotFoundError, or ValueError naming the file: not a plain numeric array, not 2-D, non-finite or zero rows,
        rows ≠ number of expected names, sidecar names ≠ expected names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text embeddings file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        # np.load would take a zip (.npz, torch.save) for an archive and anything else for a pickle
        kind = "a zip archive (.npz or torch.save)" if magic.startswith(b"PK") else "not a .npy file"
        raise ValueError(f"text embeddings file {path} must be a [C, D] float array saved with numpy.save; "
                         f"it is {kind}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        # numpy refuses object arrays with allow_pickle=False; say so in our words rather than unpickle.
        raise ValueError(f"text embeddings file {path} is not a plain numeric array (pickled objects are refused): {e}") from None
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"text embeddings file {path} must hold a float [C, D] array, got dtype {array.dtype}")
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"text embeddings file {path} must hold a 2-D [C, D] array with C, D > 0, got shape "
                         f"{list(array.shape)}")
    nonfinite = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if nonfinite.size:
        raise ValueError(f"text embeddings file {path} contains non-finite values in rows {nonfinite.tolist()[:10]}")

    sidecar = path.with_suffix(".json")
    meta: dict[str, Any] = read_json(sidecar, what="text embeddings sidecar") if sidecar.is_file() else {}
    names = meta.get("names")
    if names is not None and len(names) != array.shape[0]:
        raise ValueError(f"text embeddings file {path} has {array.shape[0]} rows but its sidecar {sidecar} lists {len(names)} names")
    if expected_names is not None:
        expected_names = list(expected_names)
        if array.shape[0] != len(expected_names):
            hint = " (looks transposed: [D, C] instead of [C, D])" if array.shape[1] == len(expected_names) else ""
            raise ValueError(
                f"text embeddings file {path} has {array.shape[0]} rows but {len(expected_names)} class names were expected{hint}"
            )
        if names is not None and names != expected_names:
            i = next(i for i, (a, b) in enumerate(zip(names, expected_names)) if a != b)
            raise ValueError(
                f"text embeddings file {path} was made for a different vocabulary: "
                f"name {i} is {names[i]!r} in {sidecar}, {expected_names[i]!r} expected"
            )

    embeds = array.astype(np.float32)
    if not meta.get("normalized", False):
        norms = np.linalg.norm(embeds, axis=1, keepdims=True)
        zero = np.flatnonzero(norms[:, 0] == 0)
        if zero.size:
            raise ValueError(f"text embeddings file {path} has all-zero rows {zero.tolist()[:10]}; they cannot be normalised")
        embeds = embeds / norms
    return TextEmbeddings(embeds=embeds, names=list(names) if names is not None else None, meta=meta)


def _check_templates(templates: Sequence[str]) -> None:
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each prompt template needs exactly one '{{}}' for the class name; bad templates: {bad}")

