"""Reading calibration artifacts (the format vq-calibrate writes), with the standard library
and MLX only, so a calibrated quantizer works without vq-calibrate installed.

File format (version :data:`FORMAT`): one safetensors file per method,
``<dir>/<method>.safetensors``, arrays named ``layers.<i>.<k|v>.<field>`` (or any names for
non-quantizer artifacts). The safetensors header metadata holds three strings:

* ``vq_format``: the format version (``"1"``),
* ``vq_meta``: JSON ``{"method", "version", "fingerprint": {"architecture", "layers",
  "kv_heads", "head_dim"}, "text_sha256", ...}``,
* ``vq_checksum``: :func:`content_checksum` of ``vq_meta`` and every tensor's name, dtype,
  shape and bytes (so a flipped byte anywhere in the data or the metadata is caught).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from vq_core import ArtifactError, ConfigError, QuantizerConfig, invalid, invalid_choice

FORMAT = 1
FINGERPRINT_KEYS = ("architecture", "layers", "kv_heads", "head_dim")


def content_checksum(meta_json: str, tensors: list[tuple[str, str, list[int], bytes]]) -> str:
    """sha256 over the metadata JSON and ``(name, dtype, shape, bytes)`` sorted by name."""
    h = hashlib.sha256(b"vq-artifact-1\0")
    h.update(meta_json.encode())
    for name, dtype, shape, data in sorted(tensors):
        h.update(f"\0{name}\0{dtype}\0{shape}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def artifact_path(artifact: str | os.PathLike, method: str) -> Path:
    """A directory means ``<dir>/<method>.safetensors``; a file path is used as is."""
    p = Path(artifact)
    return p / f"{method}.safetensors" if p.is_dir() else p


# Bytes per element of each safetensors dtype (the format's own names).
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F32": 4, "I32": 4, "U32": 4, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip
# A file changed less than this long ago may change again within one timestamp tick
# without its stat changing (git's "racily clean" rule), so it is never cached.
_RACY_NS = 2_000_000_000
_CACHE_SIZE = 16
_cache: dict[str, tuple[tuple, dict[str, mx.array], dict[str, Any]]] = {}


def _check_entry(path: Path, name: str, entry: Any, data_len: int) -> None:
    """ArtifactError naming ``path`` and the tensor unless ``entry`` is a well-formed
    safetensors table entry ``{"dtype", "shape", "data_offsets"}`` inside the data."""

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"artifact {path} is corrupt: header entry {name!r} {what}")

    if not isinstance(entry, dict):
        raise bad(f"is a {type(entry).__name__}, not a tensor description")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise bad(f"lacks {missing}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_SIZES:
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
    if end - start != math.prod(shape) * _DTYPE_SIZES[dtype]:
        raise bad(f"spans bytes {start}..{end}, not the size of {dtype} {shape}")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse(path: Path) -> tuple[dict[str, Any], dict[str, str], bytes, bytes]:
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


def _verified(path: Path) -> tuple[dict[str, Any], bytes]:
    """Parsed ``vq_meta`` and the whole file's bytes, format version and checksum checked."""
    header, meta, data, raw = _parse(path)
    if "vq_meta" not in meta or "vq_checksum" not in meta:
        raise ArtifactError(f"artifact {path} is not a vq artifact (no vq metadata)")
    if meta.get("vq_format") != str(FORMAT):
        raise ArtifactError(
            f"artifact {path} has format version {meta.get('vq_format')}; "
            f"this install reads version {FORMAT}"
        )
    tensors = [
        (name, e["dtype"], list(e["shape"]), data[e["data_offsets"][0] : e["data_offsets"][1]])
        for name, e in header.items()
    ]
    if content_checksum(meta["vq_meta"], tensors) != meta["vq_checksum"]:
        raise ArtifactError(f"artifact {path} is corrupt: checksum mismatch")
    try:
        parsed = json.loads(meta["vq_meta"])
    except json.JSONDecodeError as e:  # unreachable unless the checksum collided
        raise ArtifactError(f"artifact {path} is corrupt: bad metadata ({e})") from None
    if not isinstance(parsed, dict):
        raise ArtifactError(f"artifact {path} is corrupt: vq_meta is not a JSON object")
    return parsed, raw


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check format version and checksum; return the parsed ``vq_meta`` dict."""
    return _verified(Path(path))[0]


def read(path: str | os.PathLike) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Verified ``(arrays, metadata)`` of one artifact file.

    The arrays are loaded from the very bytes whose checksum was checked. Results are
    cached per resolved path and keyed on the file's device, inode, size, mtime and ctime
    (ctime cannot be set back by ``os.utime``): any change to the file, in place or by
    replacement, is read and verified again. A file changed within the last 2 s is not
    cached at all, since a second write inside one timestamp tick would leave its stat
    unchanged.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {p} does not exist (run `vq calibrate` first)") from None
    except OSError as e:
        raise ArtifactError(f"artifact {p} cannot be read ({e.strerror or e})") from None
    name = str(p.resolve())
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    hit = _cache.get(name)
    if hit is not None and hit[0] == key:
        return dict(hit[1]), dict(hit[2])
    meta, raw = _verified(p)
    try:
        arrays = mx.load(io.BytesIO(raw), format="safetensors")
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"artifact {p} is corrupt: MLX cannot load it ({e})") from None
    _cache.pop(name, None)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        _cache[name] = (key, arrays, meta)
        while len(_cache) > _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
    return dict(arrays), dict(meta)


def _fingerprint_of(meta: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    saved = meta.get("fingerprint", {})
    if not isinstance(saved, dict):
        raise ArtifactError(f"artifact {path} is corrupt: its fingerprint is not a table")
    return saved


def check_meta(
    meta: dict[str, Any],
    path: str | os.PathLike,
    *,
    method: str | None = None,
    version: int | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> None:
    """ArtifactError naming the mismatch when ``meta`` is for another method/version/model."""
    if method is not None and meta.get("method") != method:
        raise ArtifactError(
            f"artifact {path} was calibrated for method {meta.get('method')!r}, not {method!r}"
        )
    if version is not None and meta.get("version") != version:
        raise ArtifactError(
            f"artifact {path} holds {meta.get('method')} version {meta.get('version')}; "
            f"this install reads version {version} (calibrate again)"
        )
    if fingerprint is not None:
        saved = _fingerprint_of(meta, path)
        diff = {
            k: (saved.get(k), fingerprint[k])
            for k in FINGERPRINT_KEYS
            if k in fingerprint and saved.get(k) != fingerprint[k]
        }
        if diff:
            detail = ", ".join(f"{k}: artifact {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ArtifactError(f"artifact {path} was calibrated for another model ({detail})")


def load_layer(
    artifact: str, method: str, version: int, layer: int, kind: str, head_dim: int
) -> dict[str, mx.array]:
    """The arrays ``layers.<layer>.<kind>.*`` of ``method``'s artifact, prefix stripped."""
    path = artifact_path(artifact, method)
    arrays, meta = read(path)
    check_meta(meta, path, method=method, version=version, fingerprint={"head_dim": head_dim})
    layers = _fingerprint_of(meta, path).get("layers", 0)
    if not 0 <= layer < layers:
        raise ArtifactError(f"artifact {path} has {layers} layers; layer={layer} is out of range")
    prefix = f"layers.{layer}.{kind}."
    out = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    if not out:
        raise ArtifactError(f"artifact {path} holds no arrays for layer {layer} kind {kind!r}")
    return out


@dataclass(frozen=True)
class CalibratedConfig(QuantizerConfig):
    """Config fields every calibrated method shares.

    ``artifact``: dir or file from ``vq calibrate``; ``layer``: the model layer; ``kind``:
    ``"k"`` (keys) or ``"v"`` (values). ``untrained=True`` asks by name for the method's
    untrained neighbour (documented per method; for tests and demos): without it, a
    quantizer built with no artifact is refused (:func:`require_artifact`), never silently
    untrained.
    """

    artifact: str = ""
    layer: int = 0
    kind: str = "k"
    untrained: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.artifact, str):
            raise invalid("artifact", self.artifact, "a path string ('' = untrained)")
        invalid_choice("kind", self.kind, ("k", "v"))
        if type(self.layer) is not int or self.layer < 0:
            raise invalid("layer", self.layer, "an integer >= 0")
        if not isinstance(self.untrained, bool):
            raise invalid("untrained", self.untrained, "True or False")
        if self.untrained and self.artifact:
            raise ConfigError(
                f"artifact={self.artifact!r} and untrained=True exclude each other; pass one"
            )


def require_artifact(method: str, config: CalibratedConfig) -> None:
    """ConfigError unless ``config`` names an artifact or asks for ``untrained=True``."""
    if not config.artifact and not config.untrained:
        raise ConfigError(
            f"{method} is calibrated and needs its artifact: pass artifact=<dir or file "
            f"from `vq calibrate --method {method}`>, or untrained=True for its untrained "
            "codebooks (tests and demos only)"
        )
