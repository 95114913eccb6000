"""The safetensors artifact store: atomic writes, fingerprints and content checksums.

One artifact is one file ``<root>/<name>.safetensors`` in the format documented (and read)
by :mod:`vq_algorithms._artifact`, so calibrated quantizers load it with MLX alone. Metadata
always carries ``method``, ``version`` (the method's config version), ``fingerprint``
(architecture, layers, kv_heads, head_dim) and ``text_sha256`` (the calibration text);
:meth:`SafetensorsStore.save` refuses metadata without them.

A write goes to a temporary file in the same directory, is fsynced, then ``os.replace``d over
the old file (and the directory fsynced), so a crash leaves the old artifact or none, never a
half-written one that loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors.numpy import save as st_save

from vq_algorithms._artifact import (
    FINGERPRINT_KEYS,
    FORMAT,
    artifact_path,
    check_meta,
    content_checksum,
    read,
)
from vq_core import ArtifactError

REQUIRED = ("method", "version", "fingerprint", "text_sha256")
SUFFIX = ".safetensors"
_ST_DTYPES = {
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("float64"): "F64",
    np.dtype("uint8"): "U8",
    np.dtype("int8"): "I8",
    np.dtype("int32"): "I32",
    np.dtype("uint32"): "U32",
    np.dtype("int64"): "I64",
}


def _to_numpy(a) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(a))
    if arr.dtype not in _ST_DTYPES:
        raise ArtifactError(f"cannot store dtype {arr.dtype}; use one of {list(_ST_DTYPES)}")
    return arr


def encode_artifact(arrays: dict[str, Any], metadata: dict[str, Any]) -> bytes:
    """The bytes of one artifact file (safetensors with vq metadata and checksum)."""
    missing = [k for k in REQUIRED if k not in metadata]
    if missing:
        raise ArtifactError(f"artifact metadata lacks {missing}")
    fp = metadata["fingerprint"]
    if not isinstance(fp, dict) or any(k not in fp for k in FINGERPRINT_KEYS):
        raise ArtifactError(f"fingerprint must hold {FINGERPRINT_KEYS}, got {fp!r}")
    tensors = {k: _to_numpy(v) for k, v in arrays.items()}
    meta_json = json.dumps(metadata, sort_keys=True)
    table = [(k, _ST_DTYPES[v.dtype], list(v.shape), v.tobytes()) for k, v in tensors.items()]
    header = {
        "vq_format": str(FORMAT),
        "vq_meta": meta_json,
        "vq_checksum": content_checksum(meta_json, table),
    }
    return st_save(tensors, metadata=header)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SafetensorsStore:
    """:class:`vq_core.ArtifactStore` over a directory of ``<name>.safetensors`` files.

    ``load`` checks the format version and checksum always, and the method, version and
    model fingerprint when given.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ArtifactError(f"artifact name {name!r} must be a plain, non-hidden file name")
        return self.root / f"{name}{SUFFIX}"

    def save(self, name: str, arrays: dict[str, Any], metadata: dict[str, Any]) -> None:
        atomic_write(self.path(name), encode_artifact(arrays, metadata))

    def load(
        self,
        name: str,
        *,
        method: str | None = None,
        version: int | None = None,
        fingerprint: dict[str, Any] | None = None,
    ) -> tuple[dict[str, mx.array], dict[str, Any]]:
        path = self.path(name)
        arrays, meta = read(path)
        check_meta(meta, path, method=method, version=version, fingerprint=fingerprint)
        return arrays, meta

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(SUFFIX)] for p in self.root.glob(f"[!.]*{SUFFIX}"))


def check_model(artifact: str | os.PathLike, method: str, fingerprint: dict[str, Any]) -> None:
    """ArtifactError unless ``method``'s artifact at ``artifact`` fits this model."""
    path = artifact_path(artifact, method)
    _, meta = read(path)
    check_meta(meta, path, method=method, fingerprint=fingerprint)
