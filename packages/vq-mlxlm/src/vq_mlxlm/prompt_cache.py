"""Saving and loading prompt caches of a patched model: checked, and written atomically.

The file is mlx-lm's prompt-cache format (``mlx_lm.models.cache.load_prompt_cache`` reads
it; each vq layer's state carries its own checksum, see :mod:`vq_core.cache_integrity`),
with two more entries in its user metadata:

* ``vq_prompt_cache``: JSON ``{"format", "fingerprint": {"architecture", "layers",
  "kv_heads", "head_dim"}, "config": the patch() config, "layers": [{"class", "sha256"}]}``,
  ``sha256`` being :func:`~vq_core.artifacts.content_checksum` of that layer's arrays
  (so data moved between layers, or two layers swapped whole, is caught);
* ``vq_checksum``: sha256 of every other metadata entry (an edited config, class list or
  string table is caught).

:func:`load_prompt_cache` checks, in order: the file's structure (a truncation at any
section is named), the metadata checksum, the model fingerprint and layer count, each
layer's sha256 and state, and each vq layer's configuration against the layer the patched
model builds (unless ``use_file_config``). Every failure is a
:class:`~vq_core.CacheStateError` naming the file, the layer and what is wrong.

:func:`save_prompt_cache` writes a temporary file in the same folder, fsyncs it and renames
it over the target, so a crash mid-save leaves the previous file whole.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

from vq_core import CacheStateError, CompressedKVCache, ConfigError, atomic_write
from vq_core.artifacts import content_checksum
from vq_mlxlm.model_shape import model_fingerprint

FORMAT = 1
_DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8}  # fmt: skip
_COMPARED = ("key", "value", "window", "sink", "center")


def save_prompt_cache(path, cache: list, *, model, metadata: dict[str, str] | None = None):
    """Write ``cache`` (one entry per layer of ``model``) to ``path`` (``.safetensors``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"prompt cache path {path} must end in .safetensors")
    user = dict(metadata or {})
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in user.items()):
        raise ConfigError("prompt cache metadata must map strings to strings")
    if {"vq_prompt_cache", "vq_checksum"} & set(user):
        raise ConfigError("prompt cache metadata keys vq_prompt_cache/vq_checksum are reserved")
    arrays, scalars = {}, [""]  # mlx-lm's layout: strings and scalars stored as arrays
    for name, value in tree_flatten([c.state for c in cache]):
        arrays[name] = _as_array(name, value, scalars)
    mx.eval(arrays)
    layers = [
        {"class": type(c).__name__, "sha256": _layer_sha(arrays, i)} for i, c in enumerate(cache)
    ]
    user["vq_prompt_cache"] = json.dumps(
        {
            "format": FORMAT,
            "fingerprint": model_fingerprint(model),
            "config": getattr(model, "_vq_config", None),
            "layers": layers,
        },
        default=str,
    )
    meta = dict(tree_flatten([user, [type(c).__name__ for c in cache], scalars]))
    meta["0.vq_checksum"] = _meta_checksum(meta)
    atomic_write(path, lambda tmp: mx.save_safetensors(str(tmp), arrays, meta))


def load_prompt_cache(path, *, model, use_file_config: bool = False, return_metadata=False):
    """The verified cache list in ``path`` for ``model`` (and the user metadata if asked).

    ``use_file_config``: accept vq layers whose method/bits/window... differ from what
    ``model`` is patched with (the model's shape must still match).
    """
    path = Path(path)
    _check_structure(path)
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise _error(path, f"unreadable ({e})") from None
    if "0.vq_checksum" not in meta:
        raise _error(path, "was not saved by vq_mlxlm.save_prompt_cache (no vq_checksum)")
    if meta["0.vq_checksum"] != _meta_checksum(meta):
        raise _error(path, "has metadata that fails its checksum (edited or corrupt)")
    try:
        user, classes, scalars = tree_unflatten(list(meta.items()))
        info = json.loads(user.pop("vq_prompt_cache"))
        user.pop("vq_checksum")
        n_saved = len(info["layers"])
    except (KeyError, TypeError, ValueError) as e:  # only if the checksum itself was forged
        raise _error(path, f"has malformed vq metadata ({e!r})") from None
    if info.get("format") != FORMAT:
        raise _error(path, f"has format {info.get('format')}; this install reads {FORMAT}")
    _check_model(path, info, model)
    expected = make_prompt_cache(model)
    if not n_saved == len(classes) == len(expected):
        raise _error(path, f"holds {len(classes)} layers; the model has {len(expected)}")
    for i, entry in enumerate(info["layers"]):
        if _layer_sha(arrays, i) != entry["sha256"]:
            raise _error(path, f"layer {i}: its arrays fail the checksum (corrupt or moved)")
    values = dict(arrays)
    for pos, kind in scalars[1:]:
        values[pos] = _from_array(path, pos, kind, arrays.get(pos, mx.array([])))
    states = tree_unflatten(list(values.items())) if values else []
    cache = []
    for i, want in enumerate(expected):
        if classes[i] != type(want).__name__:
            name = type(want).__name__
            raise _error(path, f"layer {i} holds a {classes[i]}; the model builds a {name}")
        state = states[i] if i < len(states) else {}
        cache.append(_layer(path, i, type(want), state, want, use_file_config))
    return (cache, user) if return_metadata else cache


def _layer(path: Path, i: int, cls, state, want, use_file_config: bool):
    try:
        layer = cls.from_state(state)
    except CacheStateError as e:
        raise _error(path, f"layer {i}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise _error(path, f"layer {i}: unreadable {cls.__name__} state ({e!r})") from None
    if isinstance(layer, CompressedKVCache) and not use_file_config:
        saved, built = json.loads(layer.meta_state[0]), json.loads(want.meta_state[0])
        for field in _COMPARED:
            if saved[field] != built[field]:
                raise _error(
                    path,
                    f"layer {i}: saved with {field} {_show(saved[field])}, the model is patched "
                    f"with {_show(built[field])} (pass use_file_config=True to use the file's)",
                )
    return layer


def _check_model(path: Path, info: dict, model) -> None:
    saved, actual = info.get("fingerprint", {}), model_fingerprint(model)
    diff = [
        f"{k}: file {saved.get(k)!r}, model {v!r}" for k, v in actual.items() if saved.get(k) != v
    ]
    if diff:
        raise _error(path, f"was saved for another model ({'; '.join(diff)})")


def _check_structure(path: Path) -> None:
    """Header length, header JSON and every tensor's byte range, against the file size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            header = f.read(n) if n is not None and 8 + n <= size else b""
    except OSError as e:
        raise _error(path, f"cannot be read ({e.strerror})") from None
    if n is None:
        raise _error(path, f"is truncated ({size} bytes, not even a header length)")
    if 8 + n > size:
        raise _error(path, f"is truncated (a {n}-byte header, {size - 8} bytes follow)")
    try:
        table = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(path, f"has an unreadable header ({e})") from None
    if not isinstance(table, dict):
        raise _error(path, "has a header that is not a JSON object")
    data = size - 8 - n
    for name, e in table.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in e["data_offsets"])
            nbytes = math.prod(int(s) for s in e["shape"]) * _DTYPE_SIZE[e["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise _error(path, f"has a malformed header entry for {name!r}") from None
        if not 0 <= begin <= end or end - begin != nbytes:
            raise _error(path, f"has inconsistent offsets for {name!r}")
        if end > data:
            raise _error(path, f"is truncated: {name!r} ends at data byte {end}, {data} exist")


def _as_array(name: str, value, scalars: list) -> mx.array:
    if isinstance(value, mx.array):
        return value
    if isinstance(value, str):
        scalars.append((name, "string"))
        return mx.array([ord(c) for c in value])
    if isinstance(value, (bool, int, float)):
        scalars.append((name, "scalar"))
        return mx.array(value)
    if value is None:
        scalars.append((name, "none"))
        return mx.array([])
    raise ConfigError(f"prompt cache state {name!r} is a {type(value).__name__}; not savable")


def _from_array(path: Path, name: str, kind: str, a: mx.array):
    try:
        if kind == "string":
            return "".join(chr(c) for c in a.tolist())
        if kind == "scalar":
            return a.item()
        if kind == "none":
            return None
    except (ValueError, OverflowError, TypeError) as e:
        raise _error(path, f"entry {name!r} is not a {kind} ({e})") from None
    raise _error(path, f"entry {name!r} has unknown kind {kind!r}")


def _layer_sha(arrays: dict[str, mx.array], i: int) -> str:
    prefix = f"{i}."
    tensors = [
        (k, str(a.dtype), list(a.shape), bytes(memoryview(mx.contiguous(a))))
        for k, a in arrays.items()
        if k.startswith(prefix)
    ]
    return content_checksum(f"layer {i}", tensors)


def _meta_checksum(meta: dict[str, str]) -> str:
    body = json.dumps(sorted((k, v) for k, v in meta.items() if k != "0.vq_checksum"))
    return hashlib.sha256(body.encode()).hexdigest()


def _show(value) -> str:
    if isinstance(value, dict) and "method" in value:
        config = value.get("config", {})
        extra = {k: v for k, v in config.items() if k not in ("bits", "head_dim")}
        return f"{value['method']}@{config.get('bits')} {extra}"
    return repr(value)


def _error(path: Path, message: str) -> CacheStateError:
    return CacheStateError(f"prompt cache {path} {message}")
