"""What a saved :class:`~vq_core.CompressedKVCache` state must satisfy before it is used.

A state (``cache.state``) is a dict of arrays plus ``"meta"`` (JSON string) and
``"checksum"``: a ``uint32`` array computed in the graph (no host synchronization, so
mlx-lm's prefill, which evaluates ``cache.state`` after every chunk, pays no copy to the
host for it):

* words ``0..7``: sha256 of the meta string and of the list of ``(name, dtype, shape)`` of
  every array (so an edited meta, a renamed, removed, added or reshaped array is caught);
* then two words per array (sorted by name), Fletcher-style over its ``n`` elements ``x_j``
  read as unsigned integers of their own width: ``Σ x_j`` and ``Σ_j (n - j) x_j``, both
  mod 2³². Flipping bit ``k`` of one element changes the first by ``±2^k ≠ 0 mod 2³²``, so
  a single bit flip is always caught; swapping two arrays, or two elements ``i, j`` of one,
  changes the sums unless they collide (the second changes by ``(x_i - x_j)(j - i)``).
  It is a corruption check, not a cryptographic hash (``vq_mlxlm.save_prompt_cache`` adds
  sha256 over every layer of a file). Evaluating it costs one pass over the state's bytes:
  about 0.2 s for 32k tokens of a 30-layer, 3-head, head_dim-64 model on a 2-core CPU.

:func:`verify_state` checks the checksum, :func:`parse_meta` the meta's fields and types,
and :func:`check_arrays` every code field's shape and dtype against the quantizer's
``field_layout``, the agreement of batch, heads and token counts, and the offset. Every
failure is a :class:`~vq_core.errors.CacheStateError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import mlx.core as mx

from vq_core.errors import CacheStateError
from vq_core.quantizer import FLOAT_DTYPES, Quantizer

CHECKSUM = "checksum"
META = "meta"
SEP = "__"
_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}
_META_FIELDS = {
    "key": dict,
    "value": dict,
    "window": int,
    "sink": int,
    "center": bool,
    "step": int,
    "offset": int,
}


def state_checksum(meta: str, arrays: dict[str, mx.array]) -> mx.array:
    """``uint32 [8 + 2 * len(arrays)]``: the checksum described in the module docstring."""
    names = sorted(arrays)
    manifest = json.dumps([meta, [[n, str(arrays[n].dtype), list(arrays[n].shape)] for n in names]])
    head = hashlib.sha256(manifest.encode()).digest()
    words = [int.from_bytes(head[i : i + 4], "little") for i in range(0, 32, 4)]
    parts = [mx.array(words, dtype=mx.uint32)]
    parts += [_lanes(arrays[n]) for n in names]
    return mx.concatenate(parts)


def verify_state(state: dict, meta_state=None) -> tuple[str, dict[str, mx.array]]:
    """``(meta string, arrays)`` of a saved state whose checksum matches, else an error."""
    if not isinstance(state, dict):
        raise CacheStateError(f"cache state must be a dict of arrays, got {type(state).__name__}")
    arrays = dict(state)
    meta = arrays.pop(META, None)
    if meta is None and meta_state:
        meta = meta_state[0]
    if not isinstance(meta, str):
        raise CacheStateError("cache state has no 'meta' string (not saved by a vq cache)")
    checksum = arrays.pop(CHECKSUM, None)
    if not isinstance(checksum, mx.array):
        raise CacheStateError("cache state has no 'checksum' array (not saved by this vq)")
    for name, a in arrays.items():
        if not isinstance(a, mx.array):
            raise CacheStateError(
                f"cache state entry {name!r} is a {type(a).__name__}, not an array"
            )
        if a.dtype.size not in _UINT:
            raise CacheStateError(f"cache state array {name!r} has unsupported dtype {a.dtype}")
    expected = state_checksum(meta, arrays)
    if checksum.dtype != mx.uint32 or checksum.shape != expected.shape:
        raise CacheStateError(
            f"cache state checksum has shape {tuple(checksum.shape)} {checksum.dtype}; "
            f"expected {tuple(expected.shape)} uint32 (arrays added, removed or corrupt)"
        )
    same = (checksum == expected).tolist()
    if not all(same[:8]):
        raise CacheStateError(
            "cache state is corrupt: its meta or its list of arrays does not match the checksum"
        )
    for i, name in enumerate(sorted(arrays)):
        if not (same[8 + 2 * i] and same[9 + 2 * i]):
            raise CacheStateError(f"cache state is corrupt: array {name!r} fails its checksum")
    return meta, arrays


def parse_meta(meta: str) -> dict[str, Any]:
    """The meta dict of a state, every field present with its type, else an error."""
    try:
        parsed = json.loads(meta)
    except json.JSONDecodeError as e:
        raise CacheStateError(f"cache state meta is not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise CacheStateError("cache state meta is not a JSON object")
    for field, kind in _META_FIELDS.items():
        value = parsed.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CacheStateError(
                f"cache state meta field {field!r} is {value!r}; expected a {kind.__name__}"
            )
    return parsed


def check_arrays(key_q: Quantizer, value_q: Quantizer, arrays: dict, meta: dict) -> None:
    """Shapes and dtypes of a state's arrays against the quantizers and the meta."""
    known = {"exact_k", "exact_v", "sink_k", "sink_v", "key_mean", "value_mean"}
    fields = {"k": {}, "v": {}}
    for name in arrays:
        tag, sep, field = name.partition(SEP)
        if sep and tag in fields:
            fields[tag][field] = arrays[name]
        elif name not in known:
            raise CacheStateError(f"cache state holds an unknown array {name!r}")
    n_k = _codes_tokens("k", key_q, fields["k"])
    n_v = _codes_tokens("v", value_q, fields["v"])
    if n_k != n_v:
        raise CacheStateError(f"cache state holds {n_k} compressed keys but {n_v} values")
    leading = {tuple(a.shape[:2]) for part in fields.values() for a in part.values()}
    d = key_q.head_dim
    held = {}
    for pair in (("exact_k", "exact_v"), ("sink_k", "sink_v")):
        a, b = (arrays.get(n) for n in pair)
        if (a is None) != (b is None):
            raise CacheStateError(f"cache state holds only one of {pair}")
        if a is None:
            continue
        for name, x in zip(pair, (a, b), strict=True):
            if x.ndim != 4 or x.shape[3] != d or x.dtype not in FLOAT_DTYPES:
                raise CacheStateError(
                    f"cache state array {name!r} is {tuple(x.shape)} {x.dtype}; "
                    f"expected [B, H_kv, tokens, {d}] float"
                )
        if a.shape != b.shape:
            raise CacheStateError(f"cache state {pair[0]} {a.shape} != {pair[1]} {b.shape}")
        leading.add(tuple(a.shape[:2]))
        held[pair[0]] = a.shape[2]
    for name in ("key_mean", "value_mean"):
        x = arrays.get(name)
        if x is not None:
            if x.ndim != 4 or x.shape[2:] != (1, d) or x.dtype != mx.float32:
                raise CacheStateError(
                    f"cache state array {name!r} is {tuple(x.shape)} {x.dtype}; "
                    f"expected [B, H_kv, 1, {d}] float32"
                )
            leading.add(tuple(x.shape[:2]))
    if len(leading) > 1:
        raise CacheStateError(f"cache state arrays disagree on [batch, kv heads]: {leading}")
    n_sink = held.get("sink_k", 0)
    if n_sink > meta["sink"] or (n_k and n_sink < meta["sink"]):
        raise CacheStateError(
            f"cache state holds {n_sink} sink tokens with {n_k} compressed; sink={meta['sink']}"
        )
    offset = n_k + n_sink + held.get("exact_k", 0)
    if offset != meta["offset"]:
        raise CacheStateError(
            f"cache state meta says offset {meta['offset']} but its arrays hold {offset} tokens"
        )


def _codes_tokens(tag: str, q: Quantizer, fields: dict[str, mx.array]) -> int:
    """Tokens held by one side's code fields, each checked against ``q.field_layout()``."""
    if not fields:
        return 0
    layout, strides = q.field_layout(), q.token_strides()
    if set(fields) != set(layout):
        raise CacheStateError(
            f"cache state {tag} codes have fields {sorted(fields)}; "
            f"{q.method} stores {sorted(layout)}"
        )
    tokens = set()
    for field, (trailing, dtype) in layout.items():
        a = fields[field]
        if a.ndim != 3 + len(trailing) or tuple(a.shape[3:]) != tuple(trailing) or a.dtype != dtype:
            raise CacheStateError(
                f"cache state {tag}{SEP}{field} is {tuple(a.shape)} {a.dtype}; {q.method} "
                f"stores [B, H_kv, tokens, {', '.join(map(str, trailing))}] {dtype}"
            )
        tokens.add(a.shape[2] * strides.get(field, 1))
    if len(tokens) != 1:
        raise CacheStateError(f"cache state {tag} code fields disagree on token count: {tokens}")
    n = tokens.pop()
    if n % max(q.token_block, 1):
        raise CacheStateError(f"cache state {tag} codes hold {n} tokens, not whole blocks")
    return n


def _lanes(a: mx.array) -> mx.array:
    """``[Σ x_j, Σ_j (n - j) x_j] mod 2³²`` of ``a``'s ``n`` elements as unsigned integers."""
    x = a.view(_UINT[a.dtype.size]).astype(mx.uint32).reshape(-1)
    return mx.stack([x.sum(), mx.cumsum(x).sum()])
