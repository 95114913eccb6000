"""The calibration artifact format: read, write, verify checksum and model fingerprint.

Rotations, codebooks, smoothing factors and bit allocations (trained by vq-calibrate) are
read here with MLX alone, so a calibrated quantizer works without vq-calibrate installed.

File format (version :data:`FORMAT`): one safetensors file per method,
``<dir>/<method>.safetensors``, arrays named ``layers.<i>.<k|v>.<field>`` (or any names for
non-quantizer artifacts). The safetensors metadata holds three strings:

* ``vq_format``: the format version (``"1"``),
* ``vq_meta``: JSON ``{"method", "version", "fingerprint": {"architecture", "layers",
  "kv_heads", "head_dim"}, "text_sha256", ...}``,
* ``vq_checksum``: :func:`content_checksum` of ``vq_meta`` and every tensor's name, dtype,
  shape and bytes (so a flipped byte anywhere in the data or the metadata is caught).

:func:`write` (and :class:`ArtifactStore`) refuse metadata without ``method``, ``version``,
``fingerprint`` and ``text_sha256`` and write atomically (a crash leaves the old artifact or
none). :func:`read_artifact` verifies format and checksum on every read of a changed file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from vq_core import _safetensors
from vq_core.atomic import atomic_write
from vq_core.errors import ArtifactError

FORMAT = 1
FINGERPRINT_KEYS = ("architecture", "layers", "kv_heads", "head_dim")
REQUIRED = ("method", "version", "fingerprint", "text_sha256")
SUFFIX = ".safetensors"
# A file changed less than this long ago may change again within one timestamp tick
# without its stat changing (git's "racily clean" rule), so it is never cached.
_RACY_NS = 2_000_000_000
_CACHE_SIZE = 16


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
    return p / f"{method}{SUFFIX}" if p.is_dir() else p


@dataclass(frozen=True)
class Artifact:
    """One verified artifact file: its arrays, parsed ``vq_meta`` and ``vq_checksum``."""

    path: Path
    arrays: dict[str, mx.array]
    meta: dict[str, Any]
    checksum: str

    def check(
        self,
        *,
        method: str | None = None,
        version: int | None = None,
        fingerprint: dict[str, Any] | None = None,
    ) -> Artifact:
        """ArtifactError naming the mismatch (see :func:`check_meta`); returns ``self``."""
        check_meta(self.meta, self.path, method=method, version=version, fingerprint=fingerprint)
        return self

    def layer(self, layer: int, kind: str) -> dict[str, mx.array]:
        """The arrays ``layers.<layer>.<kind>.*``, prefix stripped."""
        layers = _fingerprint_of(self.meta, self.path).get("layers", 0)
        if type(layer) is not int or not 0 <= layer < layers:
            raise ArtifactError(
                f"artifact {self.path} has {layers} layers; layer={layer} is out of range"
            )
        prefix = f"layers.{layer}.{kind}."
        out = {k[len(prefix) :]: v for k, v in self.arrays.items() if k.startswith(prefix)}
        if not out:
            raise ArtifactError(
                f"artifact {self.path} holds no arrays for layer {layer} kind {kind!r}"
            )
        return out


_cache: dict[str, tuple[tuple, Artifact]] = {}


def _verified(path: Path) -> tuple[dict[str, Any], str, bytes]:
    """Parsed ``vq_meta``, the checksum and the whole file's bytes, format and checksum
    checked."""
    header, meta, data, raw = _safetensors.parse(path)
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
    return parsed, meta["vq_checksum"], raw


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check format version and checksum; return the parsed ``vq_meta`` dict."""
    return _verified(Path(path))[0]


def read_artifact(path: str | os.PathLike) -> Artifact:
    """The verified artifact at ``path`` (a file).

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
        return _copy(hit[1])
    meta, checksum, raw = _verified(p)
    try:
        arrays = mx.load(io.BytesIO(raw), format="safetensors")
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"artifact {p} is corrupt: MLX cannot load it ({e})") from None
    art = Artifact(p, arrays, meta, checksum)
    _cache.pop(name, None)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        _cache[name] = (key, art)
        while len(_cache) > _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
    return _copy(art)


def _copy(art: Artifact) -> Artifact:
    return Artifact(art.path, dict(art.arrays), json.loads(json.dumps(art.meta)), art.checksum)


def read(path: str | os.PathLike) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Verified ``(arrays, metadata)`` of one artifact file (see :func:`read_artifact`)."""
    art = read_artifact(path)
    return art.arrays, art.meta


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
    """ArtifactError naming the mismatch when ``meta`` is for another method/version/model
    (``fingerprint`` may hold a subset of :data:`FINGERPRINT_KEYS`)."""
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
    artifact: str | os.PathLike, method: str, version: int, layer: int, kind: str, head_dim: int
) -> dict[str, mx.array]:
    """The arrays ``layers.<layer>.<kind>.*`` of ``method``'s artifact, prefix stripped."""
    art = read_artifact(artifact_path(artifact, method))
    art.check(method=method, version=version, fingerprint={"head_dim": head_dim})
    return art.layer(layer, kind)


def encode(arrays: dict[str, Any], metadata: dict[str, Any]) -> bytes:
    """The bytes of one artifact file: ``arrays`` (mx or numpy) with ``metadata`` (JSON)."""
    missing = [k for k in REQUIRED if k not in metadata]
    if missing:
        raise ArtifactError(f"artifact metadata lacks {missing}")
    fp = metadata["fingerprint"]
    if not isinstance(fp, dict) or any(k not in fp for k in FINGERPRINT_KEYS):
        raise ArtifactError(f"fingerprint must hold {FINGERPRINT_KEYS}, got {fp!r}")
    table = _safetensors.tensor_table({k: _safetensors.to_mx(k, v) for k, v in arrays.items()})
    meta_json = json.dumps(metadata, sort_keys=True)
    header = {
        "vq_format": str(FORMAT),
        "vq_meta": meta_json,
        "vq_checksum": content_checksum(meta_json, table),
    }
    return _safetensors.encode(table, header)


def write(path: str | os.PathLike, arrays: dict[str, Any], metadata: dict[str, Any]) -> Path:
    """Write one artifact file atomically; returns its path."""
    path = Path(path)
    atomic_write(path, encode(arrays, metadata))
    return path


class ArtifactStore:
    """A directory of ``<name>.safetensors`` artifacts.

    ``load`` checks the format version and checksum always, and the method, version and
    model fingerprint when given.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ArtifactError(f"artifact name {name!r} must be a plain, non-hidden file name")
        return self.root / f"{name}{SUFFIX}"

    def save(self, name: str, arrays: dict[str, Any], metadata: dict[str, Any]) -> Path:
        return write(self.path(name), arrays, metadata)

    def load(
        self,
        name: str,
        *,
        method: str | None = None,
        version: int | None = None,
        fingerprint: dict[str, Any] | None = None,
    ) -> tuple[dict[str, mx.array], dict[str, Any]]:
        art = read_artifact(self.path(name))
        art.check(method=method, version=version, fingerprint=fingerprint)
        return art.arrays, art.meta

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(SUFFIX)] for p in self.root.glob(f"[!.]*{SUFFIX}"))


def check_model(artifact: str | os.PathLike, method: str, fingerprint: dict[str, Any]) -> None:
    """ArtifactError unless ``method``'s artifact at ``artifact`` fits this model."""
    read_artifact(artifact_path(artifact, method)).check(method=method, fingerprint=fingerprint)
