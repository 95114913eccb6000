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
import json
import os
from dataclasses import dataclass
from functools import lru_cache
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


def _parse(path: Path) -> tuple[dict[str, Any], dict[str, str], bytes]:
    """(tensor table, metadata strings, data section) of a safetensors file, checked."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist (run `vq calibrate` first)") from None
    if len(raw) < 8:
        raise ArtifactError(f"artifact {path} is truncated ({len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if 8 + n > len(raw):
        raise ArtifactError(f"artifact {path} is truncated (header of {n} bytes cut short)")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"artifact {path} is corrupt: unreadable header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    data = raw[8 + n :]
    for name, entry in header.items():
        end = entry["data_offsets"][1]
        if end > len(data):
            raise ArtifactError(
                f"artifact {path} is truncated: tensor {name!r} ends at byte {end}, "
                f"the file holds {len(data)}"
            )
    return header, meta, data


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check format version and checksum; return the parsed ``vq_meta`` dict."""
    path = Path(path)
    header, meta, data = _parse(path)
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
        return json.loads(meta["vq_meta"])
    except json.JSONDecodeError as e:  # unreachable unless the checksum collided
        raise ArtifactError(f"artifact {path} is corrupt: bad metadata ({e})") from None


def read(path: str | os.PathLike) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Verified ``(arrays, metadata)`` of one artifact file (cached per path and mtime)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {p} does not exist (run `vq calibrate` first)") from None
    arrays, meta = _read_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)
    return dict(arrays), dict(meta)


@lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int):
    meta = verify(path)
    return mx.load(path), meta


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
        saved = meta.get("fingerprint", {})
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
    layers = meta.get("fingerprint", {}).get("layers", 0)
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
        invalid_choice("kind", self.kind, ("k", "v"))
        if not isinstance(self.layer, int) or self.layer < 0:
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
