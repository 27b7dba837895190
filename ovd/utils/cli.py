"""Argument types shared by the command-line tools."""

from __future__ import annotations

import argparse


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n`` (``--shard`` of the resumable tools); an argparse type."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def parse_merge_args(argv: list[str], *, prog: str, what: str) -> argparse.Namespace:
    """Arguments of a resumable tool's ``merge`` subcommand: the outputs of all ``--shard i/n`` runs and ``--out``."""
    parser = argparse.ArgumentParser(prog=f"{prog} merge",
                                     description=f"Join the {what} of all --shard i/n runs into one.")
    parser.add_argument("shards", nargs="+", help=f"the shard runs' {what}")
    parser.add_argument("--out", required=True, help="where to write the merged result")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)
