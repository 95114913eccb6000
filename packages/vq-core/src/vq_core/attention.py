"""Attention over compressed history plus exact recent tokens.

Grouped-query attention is folded so each KV head sees its ``g = H_q / H_kv`` query heads as
extra query rows: ``q [B, H_q, L, D] -> [B, H_kv, g·L, D]`` (query head ``i`` reads KV head
``i // g``, as in ``mx.fast.scaled_dot_product_attention``). Scores over the compressed
tokens come from the key quantizer's compressed-domain ``scores``; the weighted value sum
from the value quantizer's ``weighted_sum``. Both halves share one softmax, so the result is
exactly softmax attention over the concatenated (reconstructed) keys and values.
"""

from __future__ import annotations

import mlx.core as mx

from vq_core.errors import ShapeError
from vq_core.quantizer import Codes, Quantizer


def attend_compressed(
    queries: mx.array,
    key_quantizer: Quantizer,
    keys: Codes | None,
    value_quantizer: Quantizer,
    values: Codes | None,
    exact_k: mx.array,
    exact_v: mx.array,
    *,
    scale: float,
    mask=None,
    prefix_k: mx.array | None = None,
    prefix_v: mx.array | None = None,
) -> mx.array:
    """Softmax attention of ``queries [B, H_q, L, D]`` over (exact prefix,) compressed, then
    exact tokens.

    Args:
        keys, values: codes ``[B, H_kv, n, ...]`` of the ``n`` oldest tokens, or None.
        exact_k, exact_v: ``[B, H_kv, m, D]``, the newest ``m`` tokens (the last ``L`` of
            them are the queries' own tokens).
        prefix_k, prefix_v: ``[B, H_kv, s, D]`` exact tokens older than the compressed ones
            (attention sinks), or None.
        mask: None, ``"causal"`` (causal within the newest ``L`` tokens, history visible),
            or a boolean/additive array broadcastable to ``[B, H_q, L, n + m]``.

    Returns:
        ``[B, H_q, L, D]`` in the queries' dtype.
    """
    b, hq, length, d = queries.shape
    hkv = exact_k.shape[1]
    if hq % hkv:
        raise ShapeError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    g = hq // hkv
    n = 0 if keys is None else key_quantizer.tokens_in(keys)
    m = exact_k.shape[2]
    s0 = 0 if prefix_k is None else prefix_k.shape[2]
    total = s0 + n + m
    q = queries.astype(mx.float32).reshape(b, hkv, g * length, d)

    parts = []
    if prefix_k is not None:
        parts.append(q @ mx.swapaxes(prefix_k.astype(mx.float32), -1, -2))
    if keys is not None:
        parts.append(key_quantizer.scores(q, keys))
    parts.append(q @ mx.swapaxes(exact_k.astype(mx.float32), -1, -2))
    s = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)) * scale
    s = s.reshape(b, hkv, g, length, total)
    s = _apply_mask(s, mask, b, hq, hkv, g, length, total)
    p = mx.softmax(s, axis=-1, precise=True).reshape(b, hkv, g * length, total)

    out = p[..., s0 + n :] @ exact_v.astype(mx.float32)
    if values is not None:
        out = out + value_quantizer.weighted_sum(p[..., s0 : s0 + n], values)
    if prefix_v is not None:
        out = out + p[..., :s0] @ prefix_v.astype(mx.float32)
    return out.reshape(b, hq, length, d).astype(queries.dtype)


def _apply_mask(s, mask, b, hq, hkv, g, length, total):
    if mask is None:
        return s
    if isinstance(mask, str):
        if mask != "causal":
            raise ShapeError(f"mask={mask!r} is not allowed; expected None, 'causal' or an array")
        if length == 1:
            return s
        rows = mx.arange(length)[:, None] + (total - length)
        visible = mx.arange(total)[None, :] <= rows
        return mx.where(visible, s, -mx.inf)
    mask = mx.broadcast_to(mask, (b, hq, length, total)).reshape(b, hkv, g, length, total)
    if mask.dtype == mx.bool_:
        return mx.where(mask, s, -mx.inf)
    return s + mask.astype(s.dtype)
