"""Durable file writes: the one atomic-write helper every module uses.

``atomic_write(path, write)`` lets ``write(tmp)`` fill a temporary file next to ``path``, fsyncs it,
renames it over ``path`` and fsyncs the directory, so a reader (or a run killed with SIGKILL at
any instant) sees either the old file or the new one, never a partial one. Checkpoint
*directories* are published the same way by :mod:`agro.checkpoint` (one ``os.rename``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


CACHE_ENV = "AGRO_CACHE_DIR"


def cache_root() -> Path:
    """agro's per-machine cache directory: ``$AGRO_CACHE_DIR``, else ``~/.cache/agro``. Holds the
    precision calibration (:mod:`agro.perf`) and GGUF checkpoints converted once to transformers'
    format (:func:`agro.models.converted_gguf`). Everything in it can be deleted at any time."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "agro")
    return Path(root)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory fsync makes renames/creations inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it into place
    durably (file fsync, ``os.replace``, directory fsync). On any error the temporary file is
    removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
