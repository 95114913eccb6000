"""The compressed-history segment and the one table that picks how it is computed.

Attention over a cache is a sum of segments (:mod:`vq_core.segments`); this module computes
the segment over the compressed tokens. Which implementation runs is looked up in one table
keyed by ``(key method, value method)`` (the registry names, ``Quantizer.method``):

1. ``(key, value)``: a fused kernel for exactly that pair of formats;
2. ``(key, "*")``: a kernel for the key format alone (e.g. a score-only kernel that then
   calls ``value_quantizer.weighted_sum`` itself); it works with any value partner;
3. otherwise the reference: ``key_quantizer.scores`` then ``value_quantizer.weighted_sum``
   (each family's compressed-domain pure-MLX versions), in tiles of history tokens.

So a key quantizer never inspects its value partner's type. vq-algorithms registers its
kernels here when its modules are imported; vq-core imports neither vq-kernels nor
vq-algorithms.

Implementation contract (what :func:`register_compressed_attention` takes)::

    impl(q, keys, values, *, scale) -> (out, lse) | None

* ``q``: float32 ``[B, Hkv, M, D]``, the queries folded per KV head: query head ``h`` of
  ``Hq = g·Hkv`` and query token ``l`` of ``L`` sit in row ``(h % g)·L + l`` of KV head
  ``h // g`` (``M = g·L``). Not rotated, not scaled.
* ``keys``, ``values``: :class:`CompressedSide`: the quantizer, its preallocated code
  buffers ``[B, Hkv, Lbuf, ...]`` (fields as ``quantizer.field_layout()``; fields with a
  ``token_strides`` entry hold ``Lbuf / stride`` rows), ``length`` (a Python int: the first
  ``length`` tokens of every batch row are valid; it never comes from reading an array),
  ``lengths`` (None, or int32 ``[B]`` per-batch-row valid counts ``<= length`` for ragged
  batches: row ``b`` must ignore tokens ``>= lengths[b]``; an implementation that cannot
  honor it returns None when it is not None) and ``start`` (position of compressed token 0,
  for position-aware key formats).
* Every query row sees every valid token (the history is older than any query), so there
  is no mask. The cache's centering means are not the implementation's business: the
  caller adds ``scale·q·key_mean`` to ``lse`` and ``value_mean`` to ``out``.
* Returns ``out`` float32 ``[B, Hkv, M, Dv]``, normalized over the valid tokens, and ``lse``
  float32 ``[B, Hkv, M]``, the natural log-sum-exp of the scaled scores ``scale·q·k̂``; or
  None when it does not apply to these shapes or this backend (e.g. the CPU, a head_dim it
  was not built for, too many query rows). None must never hide a failure: a kernel that
  applies and breaks raises.
* No host synchronization: no ``.item()``, no Python value read from an array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from vq_core.errors import ConfigError
from vq_core.quantizer import Codes, Quantizer
from vq_core.segments import Segment, combine

ANY = "*"
# Reference path: history tokens scored per tile, so a chunk of M query rows holds at most
# M x TILE_TOKENS scores at once.
TILE_TOKENS = 4096


@dataclass(frozen=True)
class CompressedSide:
    """One side (keys or values) of the compressed history, as a segment reads it."""

    quantizer: Quantizer
    codes: Codes  # preallocated buffers [B, Hkv, Lbuf, ...]
    length: int  # valid tokens at the front of every batch row
    lengths: mx.array | None = None  # int32 [B] per-row valid counts (ragged batches)
    start: int = 0  # position of token 0 (position-aware key formats)

    def valid(self, stop: int | None = None, begin: int = 0) -> Codes:
        """Codes of tokens ``[begin, stop)`` (default: all valid), sliced at token strides."""
        strides = self.quantizer.token_strides()
        stop = self.length if stop is None else stop
        return self.codes.map(
            lambda k, a: a[:, :, begin // strides.get(k, 1) : stop // strides.get(k, 1)]
        )


Impl = Callable[..., Segment | None]
_TABLE: dict[tuple[str, str], Impl] = {}
DecodeImpl = Callable[..., mx.array | None]
_DECODE: dict[tuple[str, str], DecodeImpl] = {}


def register_decode_attention(
    key_method: str, value_method: str, impl: DecodeImpl, *, replace: bool = False
) -> None:
    """Register a whole-step decode attention for keys coded by ``key_method`` and values by
    ``value_method``: ``impl(queries, keys, values, *, scale) -> out | None`` with
    ``queries [B, Hq, 1, D]`` (one token per row), the two
    :class:`~vq_core.attention.CacheView` objects a cache's ``update_and_fetch`` returned
    (compressed history, exact sink and recent tokens, centering means, finite flag), and
    ``out [B, Hq, 1, D]`` in the queries' dtype: softmax attention over every token the
    views hold, NaN when ``finite`` is False. None when it does not apply (backend, shapes);
    the segment path then runs. Tried before the segment table, for one-token steps."""
    _check_pair(key_method, value_method)
    pair = (key_method, value_method)
    if pair in _DECODE and not replace:
        raise ConfigError(f"decode attention for {pair} is already registered")
    _DECODE[pair] = impl


def decode_attention(queries: mx.array, keys, values, *, scale: float) -> mx.array | None:
    """The registered whole-step decode attention for these views' formats, or None."""
    impl = _DECODE.get((keys.quantizer.method, values.quantizer.method))
    return None if impl is None else impl(queries, keys, values, scale=scale)


def _check_pair(key_method: str, value_method: str) -> None:
    for name, value in (("key_method", key_method), ("value_method", value_method)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name}={value!r} is not allowed; expected a method name")
    if key_method == ANY:
        raise ConfigError("key_method='*' is not allowed; a kernel is keyed by its key format")


def register_compressed_attention(
    key_method: str, value_method: str, impl: Impl, *, replace: bool = False
) -> None:
    """Register ``impl`` for keys coded by ``key_method`` and values by ``value_method``
    (``"*"``: any value method). Registering a pair twice needs ``replace=True``."""
    _check_pair(key_method, value_method)
    pair = (key_method, value_method)
    if pair in _TABLE and not replace:
        raise ConfigError(f"compressed attention for {pair} is already registered")
    _TABLE[pair] = impl


def registered_compressed_attention() -> dict[tuple[str, str], Impl]:
    """A copy of the table (for tests and reports)."""
    return dict(_TABLE)


def compressed_segment(
    q: mx.array,
    keys: CompressedSide,
    values: CompressedSide,
    *,
    scale: float,
    key_mean: mx.array | None = None,
    value_mean: mx.array | None = None,
) -> Segment:
    """``(out, lse)`` of ``q [B, Hkv, M, D]`` over the compressed tokens (see the module
    docstring); ``key_mean, value_mean [B, Hkv, 1, D]`` are the cache's centering means."""
    kq, vq = keys.quantizer, values.quantizer
    out = None
    for pair in ((kq.method, vq.method), (kq.method, ANY)):
        impl = _TABLE.get(pair)
        if impl is not None:
            out = impl(q, keys, values, scale=scale)
            if out is not None:
                break
    if out is None:
        out = reference_segment(q, keys, values, scale=scale)
    o, lse = out
    if key_mean is not None:  # centered keys' scores miss q·mean, the same for every token
        lse = lse + (q @ mx.swapaxes(key_mean, -1, -2))[..., 0] * scale
    if value_mean is not None:
        o = o + value_mean
    return o, lse


def reference_segment(
    q: mx.array, keys: CompressedSide, values: CompressedSide, *, scale: float
) -> Segment:
    """Each family's compressed-domain ``scores`` and ``weighted_sum``, ``TILE_TOKENS``
    history tokens at a time (one segment per tile, merged)."""
    kq, vq = keys.quantizer, values.quantizer
    n = keys.length
    tile = TILE_TOKENS - TILE_TOKENS % _block(kq, vq)
    parts = []
    for begin in range(0, n, tile):
        stop = min(n, begin + tile)
        kc, vc = keys.valid(stop, begin), values.valid(stop, begin)
        where = {"start": keys.start + begin} if kq.position_aware else {}
        s = kq.scores(q, kc, **where) * scale
        if keys.lengths is not None:
            pos = mx.arange(begin, stop)
            s = mx.where(pos < keys.lengths[:, None, None, None], s, -mx.inf)
        top = s.max(axis=-1, keepdims=True)
        top = mx.where(mx.isfinite(top), top, 0.0)
        w = mx.exp(s - top)
        total = w.sum(axis=-1, keepdims=True)
        o = vq.weighted_sum(w, vc) / mx.maximum(total, 1e-30)
        parts.append((o, (mx.log(total) + top)[..., 0]))
    return combine(parts)


def _block(*quantizers: Quantizer) -> int:
    return max(q.token_block for q in quantizers)


__all__ = [
    "ANY",
    "CompressedSide",
    "compressed_segment",
    "decode_attention",
    "reference_segment",
    "register_compressed_attention",
    "register_decode_attention",
    "registered_compressed_attention",
]
