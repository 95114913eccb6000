"""Atomic file writes: a crash or a concurrent reader sees the old file or the new one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[Path], None]) -> Path:
    """Write ``path`` through a temporary file in the same folder, fsynced and renamed over
    ``path``, then fsync the folder so the rename survives a power cut. ``data`` is the
    bytes, or a function that writes the temporary file it is given (e.g. MLX's
    ``mx.save_safetensors``). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
