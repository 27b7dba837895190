"""Loading and saving open_clip models: by name + tag, local checkpoint file, or a saved folder (DESIGN §3 `ovd/clip/`)."""

from __future__ import annotations

import copy
import difflib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from ovd.utils.io import atomic_path, read_json, write_json

__all__ = ["ClipBundle", "load_clip", "register_model_configs", "save_clip"]

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
LOCAL_DIR_PREFIX = "local-dir:"
# The names open_clip itself looks for in a `local-dir:` folder; save_clip writes these.
CONFIG_FILENAME = "open_clip_config.json"
WEIGHTS_FILENAME = "open_clip_pytorch_model.bin"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# What open_clip's local-dir loader looks for (factory._find_checkpoint_in_dir).
_LOCAL_DIR_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


@dataclass
class ClipBundle:
    """An open_clip model ready for inference, with what is needed to feed it.

    Attributes:
        model: the CLIP model, in eval mode.
        tokenizer: ``tokenizer(list[str]) -> LongTensor[N, context_length]``.
        preprocess: eval image transform (PIL image -> Tensor[3, S, S]): resize, centre crop, CLIP normalisation.
        model_name: as given to :func:`load_clip` (may be ``local-dir:<folder>``).
        pretrained: the weights source as given (tag or file), None for random init or a ``local-dir:`` model.
        embed_dim: D, the joint embedding size.
        context_length: the text tower's maximum number of tokens, start and end tokens included.
        model_cfg: the exact open_clip architecture config the model was built from; :func:`save_clip` writes it.
    """

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    model_name: str
    pretrained: str | None
    embed_dim: int
    context_length: int
    model_cfg: dict[str, Any]


@functools.cache
def register_model_configs() -> None:
    """Make our own model configs (``ovd-toy-vit``) known to open_clip; idempotent."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def load_clip(
    model_name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> ClipBundle:
    """Build an open_clip model in eval mode.

    Args:
        model_name: an open_clip architecture (``"ViT-B-32"``, our ``"ovd-toy-vit"``), or ``"local-dir:<folder>"`` for a
            folder written by :func:`save_clip` (or any folder with ``open_clip_config.json`` + weights).
        pretrained: None for random init; an open_clip tag (``"openai"``, downloads where online); or a checkpoint file
            (``.pt``/``.pth``/``.bin``/``.safetensors``), loaded by open_clip with ``torch.load(weights_only=True)``.
            Must be None for ``local-dir:`` models, whose weights are in the folder.
        device: where the model lives.
        seed: for random init, seeds the weights without touching the global RNG; ignored when weights are loaded.

    Raises:
        ValueError: unknown model name (close matches listed), unknown tag, or ``pretrained`` given with ``local-dir:``.
        FileNotFoundError: a checkpoint file, ``local-dir:`` folder, its config or its weights are missing.
    """
    register_model_configs()
    force_quick_gelu = False
    if model_name.startswith(LOCAL_DIR_PREFIX):
        if pretrained is not None:
            raise ValueError(f"pretrained={pretrained!r} given with {model_name!r}: a local-dir model's weights are in its folder")
        model_cfg = _read_local_dir_config(Path(model_name[len(LOCAL_DIR_PREFIX) :]))
    else:
        model_cfg = _builtin_config(model_name)
        if pretrained is not None:
            tag_cfg = _check_pretrained(model_name, pretrained)
            # OpenAI and LAION-400M weights were trained with QuickGELU; open_clip only warns when the config says GELU,
            # and the embeddings come out subtly wrong, so follow the weights.
            force_quick_gelu = bool(tag_cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu", False)
            if force_quick_gelu:
                model_cfg["quick_gelu"] = True

    def create() -> torch.nn.Module:
        return open_clip.create_model(
            model_name, pretrained, device=device, force_quick_gelu=force_quick_gelu, weights_only=True
        )

    if pretrained is None and seed is not None and not model_name.startswith(LOCAL_DIR_PREFIX):
        # open_clip initialises from the global RNG on the CPU; fork it so callers' random streams are untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create()
    else:
        model = create()
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return ClipBundle(
        model=model,
        tokenizer=tokenizer,
        preprocess=preprocess,
        model_name=model_name,
        pretrained=pretrained,
        embed_dim=int(model_cfg["embed_dim"]),
        context_length=int(tokenizer.context_length),
        model_cfg=model_cfg,
    )


def save_clip(
    bundle_or_model: ClipBundle | torch.nn.Module,
    folder: str | os.PathLike,
    *,
    model_name: str | None = None,
) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` into ``folder``, each atomically.

    ``load_clip("local-dir:<folder>")`` and ``load_clip(model_name, pretrained="<folder>/open_clip_pytorch_model.bin")``
    reload the model bit-exactly. ``model_name`` (the architecture) is required for a bare model; for a bundle it
    defaults to the bundle's, whose exact config is kept.

    Returns:
        the folder.
    """
    if isinstance(bundle_or_model, ClipBundle):
        model = bundle_or_model.model
        model_cfg = bundle_or_model.model_cfg if model_name is None else _config_for(model_name)
    else:
        if model_name is None:
            raise ValueError("save_clip needs model_name= (the open_clip architecture) when given a bare model")
        model, model_cfg = bundle_or_model, _config_for(model_name)
    folder = Path(folder)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILENAME) as tmp, open(tmp, "wb") as f:
        torch.save(state_dict, f)
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
    write_json(folder / CONFIG_FILENAME, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    return folder


def _config_for(model_name: str) -> dict[str, Any]:
    register_model_configs()
    if model_name.startswith(LOCAL_DIR_PREFIX):
        return _read_local_dir_config(Path(model_name[len(LOCAL_DIR_PREFIX) :]))
    return _builtin_config(model_name)


def _builtin_config(model_name: str) -> dict[str, Any]:
    # open_clip accepts "ViT-B/32" for "ViT-B-32"; look the name up the same way.
    cleaned = model_name.replace("/", "-")
    known = open_clip.list_models()
    if cleaned not in known:
        close = difflib.get_close_matches(cleaned, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(known)}"
        raise ValueError(f"unknown open_clip model {model_name!r}{hint} (or give 'local-dir:<folder>')")
    return copy.deepcopy(open_clip.get_model_config(cleaned))


def _check_pretrained(model_name: str, pretrained: str) -> dict[str, Any]:
    """Return the tag's open_clip config ({} for a file); raise clearly on anything open_clip would fail on vaguely."""
    cleaned = model_name.replace("/", "-")
    tag_cfg = open_clip.get_pretrained_cfg(cleaned, pretrained)
    if tag_cfg:
        return tag_cfg
    path = Path(pretrained).expanduser()
    if path.is_file():
        return {}
    if path.is_dir():
        raise ValueError(f"pretrained={pretrained!r} is a folder; load it with load_clip('{LOCAL_DIR_PREFIX}{pretrained}')")
    if path.suffix in _CHECKPOINT_SUFFIXES or os.sep in pretrained:
        raise FileNotFoundError(f"CLIP checkpoint file not found: {path}")
    tags = open_clip.list_pretrained_tags_by_model(cleaned)
    raise ValueError(
        f"pretrained={pretrained!r} is neither a checkpoint file nor a known tag for {model_name!r}; "
        f"known tags: {', '.join(tags) if tags else 'none'}"
    )


def _read_local_dir_config(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG_FILENAME
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP model folder not found: {folder}")
    if not config_path.is_file():
        raise FileNotFoundError(f"CLIP model folder {folder} has no {CONFIG_FILENAME}")
    # open_clip falls back to random init with only a warning when the folder holds no weights.
    if not any(p.suffix in _LOCAL_DIR_WEIGHT_SUFFIXES for p in folder.iterdir()):
        raise FileNotFoundError(f"CLIP model folder {folder} has no weights file (*.safetensors, *.bin or *.pth)")
    config = read_json(config_path, what="CLIP model config")
    if "model_cfg" not in config:
        raise ValueError(f"{config_path} has no 'model_cfg' entry")
    return config["model_cfg"]
