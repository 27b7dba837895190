"""Atomic file writes: a reader never sees a half-written file, a crash leaves the previous version intact."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp makes the file private (0600); outputs are shared data like any file the user writes
    tmp.chmod(0o644)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_partial_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` left beside ``path`` (a glob pattern allowed in the name)
    when its writer was killed; only where no other process is writing ``path`` now. Returns those removed."""
    path = Path(path)
    found = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for p in found:
        p.unlink(missing_ok=True)
    return found


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> None:
    """Write ``obj`` as JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """Read JSON with an error that names the file and the position of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def replace_markdown_section(path: str | os.PathLike, title: str, body: str) -> None:
    """Rewrite the ``## title`` section of a Markdown file (appending it if absent), keeping the others."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Results\n"
    start = text.find(f"\n## {title}\n")
    section = f"\n## {title}\n\n{body.strip()}\n"
    if start < 0:
        text = text.rstrip("\n") + "\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    write_text(path, text)
