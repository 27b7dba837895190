"""CLIP through open_clip: loading models by name or local file, and text embeddings of a vocabulary."""

from ovd.clip.models import ClipBundle, load_clip, register_model_configs, save_clip
from ovd.clip.text import (
    DEFAULT_TEMPLATES,
    TextEmbeddings,
    encode_text,
    load_templates,
    load_text_embeddings,
    read_lines,
    save_text_embeddings,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "ClipBundle",
    "TextEmbeddings",
    "encode_text",
    "load_clip",
    "load_templates",
    "load_text_embeddings",
    "read_lines",
    "register_model_configs",
    "save_clip",
    "save_text_embeddings",
]
