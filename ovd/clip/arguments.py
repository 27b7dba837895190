"""The command-line arguments that name a CLIP teacher, shared by the tools that load one: ``--model``,
``--pretrained`` / ``--random-init`` and ``--seed``. A random model is never chosen by omission: its embeddings look
valid to everything downstream."""

from __future__ import annotations

import argparse

from ovd.clip.models import LOCAL_DIR_PREFIX


def add_clip_arguments(
    parser: argparse.ArgumentParser,
    *,
    default_model: str | None = "ViT-B-32",
    model_help: str = "open_clip architecture, or local-dir:<folder>",
    random_init_help: str = "randomly initialised model (synthetic runs and speed tests, no teacher)",
) -> None:
    """Add ``--model``, ``--pretrained`` | ``--random-init`` and ``--seed`` to ``parser``."""
    default = f" (default: {default_model})" if default_model else ""
    parser.add_argument("--model", default=default_model, help=model_help + default)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", help="open_clip tag (e.g. openai) or checkpoint file of --model")
    weights.add_argument("--random-init", action="store_true", help=random_init_help)
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init (default: %(default)s)")


def check_clip_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` when ``--model`` is given without its weights, or a local-dir model with them."""
    if args.model is None:
        return
    local = args.model.startswith(LOCAL_DIR_PREFIX)
    if not local and args.pretrained is None and not args.random_init:
        parser.error("give --pretrained TAG|FILE, or --random-init [--seed N] for a randomly initialised --model")
    if local and (args.pretrained is not None or args.random_init):
        parser.error("a local-dir: model carries its own weights; drop --pretrained / --random-init")
