"""Vocabularies for inference: class names (presets, lists, files) and their text embeddings, cached on disk.

A vocabulary is embedded once per (text model, its weights, prompt templates, names); the result is kept under
``$OVD_CACHE/text_embeddings/`` (default ``~/.cache/ovd``) as `.npy` + JSON sidecar (DESIGN §4), so setting the same
vocabulary again, in this process or the next, costs a file read instead of a text-tower pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ovd.clip.models import LOCAL_DIR_PREFIX, ClipBundle, load_clip
from ovd.clip.text import (
    DEFAULT_TEMPLATES,
    TextEmbeddings,
    check_names,
    encode_text,
    load_templates,
    load_text_embeddings,
    read_lines,
    save_text_embeddings,
)
from ovd.data import VOCABULARY_NAMES, named_vocabulary

__all__ = [
    "PRESETS",
    "TextEncoder",
    "Vocabulary",
    "cache_dir",
    "check_names",
    "parse_vocabulary",
    "preset_vocabulary",
    "resolve_templates",
]

logger = logging.getLogger(__name__)

PRESETS = VOCABULARY_NAMES


@dataclass(frozen=True)
class Vocabulary:
    """Class names and the category id each gets in COCO JSON output (1..C unless the preset has its own)."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        check_names(self.names)
        if len(self.category_ids) != len(self.names):
            raise ValueError(f"{len(self.names)} class names but {len(self.category_ids)} category ids")

    @classmethod
    def of(cls, names: Sequence[str]) -> Vocabulary:
        """``names`` with category ids 1..C."""
        check_names(names)  # before tuple() splits a bare string into letters
        return cls(tuple(names), tuple(range(1, len(names) + 1)))

    def __len__(self) -> int:
        return len(self.names)


def preset_vocabulary(name: str) -> Vocabulary:
    """The named vocabulary ``name`` (`ovd.data.vocabularies`: coco, lvis, shapes) with its category ids."""
    names, ids = named_vocabulary(name)
    return Vocabulary(tuple(names), tuple(ids))


def parse_vocabulary(spec: str) -> Vocabulary | Path:
    """A vocabulary from a command-line value: a preset name, a ready embeddings file (``.npy``, returned as a
    path for `Detector.set_vocabulary`), a text file with one name per line, or a comma-separated list of names."""
    if spec in PRESETS:
        return preset_vocabulary(spec)
    if spec.endswith(".npy"):
        return Path(spec)
    if Path(spec).is_file():
        names = read_lines(spec, what="vocabulary file")
        if not names:
            raise ValueError(f"vocabulary file {spec} has no class names (one per line)")
        return Vocabulary.of(names)
    return Vocabulary.of([n.strip() for n in spec.split(",")])


def resolve_templates(templates: Sequence[str] | str | os.PathLike | None) -> tuple[str, ...] | None:
    """Prompt templates given as a sequence of strings with one ``{}`` each or as a template file (one per line);
    None stays None (the encoder's default)."""
    if templates is None:
        return None
    if isinstance(templates, (str, os.PathLike)):
        return load_templates(templates)
    return tuple(templates)


def cache_dir() -> Path:
    """``$OVD_CACHE``, else ``~/.cache/ovd``."""
    return Path(os.environ.get("OVD_CACHE") or Path.home() / ".cache" / "ovd")


class TextEncoder:
    """Class names → text embeddings (Tensor[C, D], rows L2-normalised) with one CLIP text tower, cached on disk.

    ``model_name``/``pretrained``/``seed`` name the tower as `ovd.clip.load_clip` takes it; None for ``model_name``
    means no tower is known, and encoding a new name then raises ``unavailable`` as the reason. ``known`` is a
    vocabulary this same tower embedded (a detector's training vocabulary): its names, prompted with ``templates``,
    are taken from it without the tower, which also serves towers that cannot be rebuilt. ``templates`` is the
    default prompt set: the known vocabulary's, else ``"a photo of a {}"``. The tower is loaded on the first cache miss.
    """

    def __init__(
        self,
        model_name: str | None,
        pretrained: str | None = None,
        *,
        seed: int | None = None,
        device: str | torch.device = "cpu",
        known: TextEmbeddings | None = None,
        templates: Sequence[str] | None = None,
        unavailable: str = "",
    ) -> None:
        self.model_name, self.pretrained, self.seed, self.device = model_name, pretrained, seed, device
        self.known = known
        self.unavailable = unavailable
        known_templates = known.meta.get("templates") if known is not None else None
        self.default_templates = tuple(templates or known_templates or DEFAULT_TEMPLATES)
        self._bundle: ClipBundle | None = None
        self._known_rows = {n: i for i, n in enumerate(known.names)} if known is not None and known.names else {}

    @classmethod
    def for_embeddings(
        cls, known: TextEmbeddings, *, source: str, model_name: str | None = None, pretrained: str | None = None,
        device: str | torch.device = "cpu",
    ) -> TextEncoder:
        """The encoder that made ``known`` (read from its sidecar: ``model``, ``pretrained``, ``seed``), unless
        ``model_name`` is given; ``known``'s rows are reused only by the tower that made them. ``source`` names the
        embeddings file in error messages."""
        templates = known.meta.get("templates")
        if model_name is not None:
            same = (model_name, pretrained) == (known.meta.get("model"), known.meta.get("pretrained"))
            return cls(model_name, pretrained, device=device, known=known if same else None, templates=templates)
        hint = ("pass text_encoder= (an open_clip name or local-dir:<folder>) and text_encoder_weights=, or set a "
                "ready embeddings file (.npy)")
        meta_model = known.meta.get("model")
        if not meta_model:
            return cls(None, known=known, unavailable=f"{source} has no sidecar naming its CLIP text model; {hint}")
        meta_pretrained, seed = known.meta.get("pretrained"), known.meta.get("seed")
        if meta_pretrained is None and not meta_model.startswith(LOCAL_DIR_PREFIX) and seed is None:
            return cls(None, known=known, unavailable=(
                f"{source} was made by a randomly initialised {meta_model!r} whose seed was not recorded, so new names "
                f"cannot be embedded consistently with it; {hint}"))
        return cls(meta_model, meta_pretrained, seed=seed, device=device, known=known)

    def identity(self) -> dict[str, Any]:
        """What determines the embeddings besides names and templates; weights files are stamped by size and mtime
        so that a replaced file is a cache miss."""
        stamps = []
        if self.model_name is not None and self.model_name.startswith(LOCAL_DIR_PREFIX):
            folder = Path(self.model_name[len(LOCAL_DIR_PREFIX):])
            files = sorted(folder.iterdir()) if folder.is_dir() else []
            stamps = [_stamp(p) for p in files if p.is_file()]
        elif self.pretrained is not None and Path(self.pretrained).expanduser().is_file():
            stamps = [_stamp(Path(self.pretrained).expanduser())]
        return {"model": self.model_name, "pretrained": self.pretrained, "seed": self.seed, "files": stamps}

    def cache_path(self, names: Sequence[str], templates: Sequence[str]) -> Path:
        """Where the embeddings of ``names`` under ``templates`` are cached."""
        key = {**self.identity(), "templates": list(templates), "names": list(names)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return cache_dir() / "text_embeddings" / f"{digest}.npy"

    def encode(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Embeddings Tensor[C, D] (CPU, float32, rows L2-normalised) of ``names`` prompted with ``templates``
        (default: the known vocabulary's templates, else ``"a photo of a {}"``)."""
        check_names(names)
        templates = self.default_templates if templates is None else tuple(templates)
        if self._known_rows and templates == self.default_templates and all(n in self._known_rows for n in names):
            rows = torch.tensor([self._known_rows[n] for n in names])
            return torch.from_numpy(self.known.embeds)[rows]
        if self.model_name is None:
            new = [n for n in names if n not in self._known_rows]
            what = (f"class names {new[:5]}{' ...' if len(new) > 5 else ''}" if new
                    else f"with templates {list(templates)} (the known vocabulary used {list(self.default_templates)})")
            raise ValueError(f"cannot embed {what}: {self.unavailable}")
        path = self.cache_path(names, templates)
        if path.is_file():
            try:
                return torch.from_numpy(load_text_embeddings(path, expected_names=names).embeds)
            except (OSError, ValueError) as e:  # a damaged cache entry is recomputed, not fatal
                logger.warning("ignoring unreadable cached text embeddings %s: %s", path, e)
        embeds = encode_text(self._load(), names, templates=templates)
        save_text_embeddings(path, embeds, names=names, templates=templates, model_name=self.model_name,
                             pretrained=self.pretrained)
        return embeds

    def _load(self) -> ClipBundle:
        if self._bundle is None:
            try:
                self._bundle = load_clip(self.model_name, self.pretrained, device=self.device, seed=self.seed)
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"cannot load the CLIP text model {self.model_name!r} (weights {self.pretrained!r}): "
                              f"{e}; pass text_encoder= and text_encoder_weights= to use another") from None
        return self._bundle


def _stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]
