"""The safetensors container, written and checked with the standard library and MLX only.

A file is ``u64 n`` (little endian), ``n`` bytes of JSON header, then the data section. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets
into the data section) and ``"__metadata__"`` to a table of strings. :func:`encode` writes
that layout (header padded with spaces to a multiple of 8, tensors in name order);
:func:`parse` checks every entry against the data before anything is loaded, so a truncated
or edited file is named, not half-read. :func:`vq_core.atomic.atomic_write` puts bytes on disk so readers
see the old file or the new one, whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx

from vq_core.errors import ArtifactError

# Bytes per element of each safetensors dtype (the format's own names).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F32": 4, "I32": 4, "U32": 4, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip
_MX_NAMES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.float16: "F16", mx.bfloat16: "BF16",
    mx.int16: "I16", mx.uint16: "U16", mx.float32: "F32", mx.int32: "I32", mx.uint32: "U32",
    mx.int64: "I64", mx.uint64: "U64",
}  # fmt: skip


def to_mx(name: str, value: Any) -> mx.array:
    """``value`` (an mx or numpy array) as an mx array of the same dtype; ArtifactError for
    a dtype MLX cannot hold exactly (float64 would silently become float32)."""
    arr = value if isinstance(value, mx.array) else mx.array(value)
    source = str(getattr(value, "dtype", arr.dtype)).removeprefix("mlx.core.")
    if arr.dtype not in _MX_NAMES or source != str(arr.dtype).removeprefix("mlx.core."):
        allowed = sorted(str(d).removeprefix("mlx.core.") for d in _MX_NAMES)
        raise ArtifactError(f"cannot store {name!r} of dtype {source}; use one of {allowed}")
    return mx.contiguous(arr)


def tensor_table(arrays: dict[str, mx.array]) -> list[tuple[str, str, list[int], bytes]]:
    """``(name, dtype, shape, bytes)`` per array, sorted by name (what checksums cover)."""
    mx.eval(list(arrays.values()))
    return sorted(
        (name, _MX_NAMES[a.dtype], list(a.shape), bytes(memoryview(a)))
        for name, a in arrays.items()
    )


def encode(table: list[tuple[str, str, list[int], bytes]], metadata: dict[str, str]) -> bytes:
    """The bytes of a safetensors file holding ``table`` (from :func:`tensor_table`)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape, data in table:
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob + b"".join(t[3] for t in table)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(path: Path, name: str, entry: Any, data_len: int) -> None:
    """ArtifactError naming ``path`` and the tensor unless ``entry`` is a well-formed
    table entry inside the data."""

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"artifact {path} is corrupt: header entry {name!r} {what}")

    if not isinstance(entry, dict):
        raise bad(f"is a {type(entry).__name__}, not a tensor description")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise bad(f"lacks {missing}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise bad(f"has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise bad(f"has data_offsets {offsets!r}, not [start, end]")
    start, end = offsets
    if end > data_len:
        raise ArtifactError(
            f"artifact {path} is truncated: tensor {name!r} ends at byte {end}, "
            f"the file holds {data_len}"
        )
    if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise bad(f"spans bytes {start}..{end}, not the size of {dtype} {shape}")


def parse(path: Path) -> tuple[dict[str, Any], dict[str, str], bytes, bytes]:
    """(tensor table, metadata strings, data section, whole file) of a safetensors file,
    checked entry by entry."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist (run `vq calibrate` first)") from None
    except OSError as e:
        raise ArtifactError(f"artifact {path} cannot be read ({e.strerror or e})") from None
    if len(raw) < 8:
        raise ArtifactError(f"artifact {path} is truncated ({len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if 8 + n > len(raw):
        raise ArtifactError(f"artifact {path} is truncated (header of {n} bytes cut short)")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"artifact {path} is corrupt: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(
            f"artifact {path} is corrupt: its header is a {type(header).__name__}, not a table"
        )
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError(f"artifact {path} is corrupt: __metadata__ is not a string table")
    data = raw[8 + n :]
    for name, entry in header.items():
        _check_entry(path, name, entry, len(data))
    return header, meta, data, raw
