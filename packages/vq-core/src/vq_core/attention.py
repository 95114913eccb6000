"""Attention over compressed history plus exact recent tokens.

Grouped-query attention is folded so each KV head sees its ``g = H_q / H_kv`` query heads as
extra query rows: ``q [B, H_q, L, D] -> [B, H_kv, g·L, D]`` (query head ``i`` reads KV head
``i // g``, as in ``mx.fast.scaled_dot_product_attention``). Scores over the compressed
tokens come from the key quantizer's compressed-domain ``scores``; the weighted value sum
from the value quantizer's ``weighted_sum``. Both halves share one softmax, so the result is
exactly softmax attention over the concatenated (reconstructed) keys and values.

When the key quantizer offers a fused kernel for the compressed part
(:meth:`Quantizer.fused_attention`, e.g. on a GPU), that part returns its normalized output
and log-sum-exp, and is merged with the exact tokens' attention by their softmax weights.
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
    length: int | None = None,
    key_mean: mx.array | None = None,
    value_mean: mx.array | None = None,
) -> mx.array:
    """Softmax attention of ``queries [B, H_q, L, D]`` over (exact prefix,) compressed, then
    exact tokens.

    Args:
        keys, values: codes ``[B, H_kv, n, ...]`` of the ``n`` oldest tokens, or None; with
            ``length``, preallocated buffers whose first ``length`` tokens are valid.
        exact_k, exact_v: ``[B, H_kv, m, D]``, the newest ``m`` tokens (the last ``L`` of
            them are the queries' own tokens).
        prefix_k, prefix_v: ``[B, H_kv, s, D]`` exact tokens older than the compressed ones
            (attention sinks), or None. Compressed token ``i`` is at position ``s + i``
            (what a position-aware key quantizer's ``scores`` receives as ``start``).
        key_mean, value_mean: ``[B, H_kv, 1, D]`` subtracted from the compressed tokens
            before encoding (see :class:`CompressedKVCache`), added back here.
        mask: None, ``"causal"`` (causal within the newest ``L`` tokens, history visible),
            or a boolean/additive array broadcastable to ``[B, H_q, L, n + m]``.

    Returns:
        ``[B, H_q, L, D]`` in the queries' dtype.
    """
    b, hq, lq, d = queries.shape
    hkv = exact_k.shape[1]
    if hq % hkv:
        raise ShapeError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    g = hq // hkv
    n = 0 if keys is None else key_quantizer.tokens_in(keys)
    if keys is not None and length is not None and length < n:
        n = length
    q = queries.astype(mx.float32).reshape(b, hkv, g * lq, d)
    if keys is not None and (mask is None or isinstance(mask, str)):
        fused = key_quantizer.fused_attention(
            q, keys, value_quantizer, values, scale=scale, length=n
        )
        if fused is not None:
            out_c, lse_c = fused
            if key_mean is not None:  # scores of the centered keys miss q·mean for every token
                lse_c = lse_c + (q @ mx.swapaxes(key_mean, -1, -2))[..., 0] * scale
            if value_mean is not None:
                out_c = out_c + value_mean
            fused = (out_c, lse_c)
            out = _merge_exact(fused, q, exact_k, exact_v, prefix_k, prefix_v, scale, mask, g)
            return out.reshape(b, hq, lq, d).astype(queries.dtype)
    if keys is not None and n < key_quantizer.tokens_in(keys):
        keys = _first(keys, key_quantizer, n)
        values = _first(values, value_quantizer, n)
    m = exact_k.shape[2]
    s0 = 0 if prefix_k is None else prefix_k.shape[2]
    total = s0 + n + m

    parts = []
    if prefix_k is not None:
        parts.append(q @ mx.swapaxes(prefix_k.astype(mx.float32), -1, -2))
    if keys is not None:
        if key_quantizer.position_aware:
            s_c = key_quantizer.scores(q, keys, start=s0)
        else:
            s_c = key_quantizer.scores(q, keys)
        if key_mean is not None:
            s_c = s_c + q @ mx.swapaxes(key_mean, -1, -2)
        parts.append(s_c)
    parts.append(q @ mx.swapaxes(exact_k.astype(mx.float32), -1, -2))
    s = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)) * scale
    s = s.reshape(b, hkv, g, lq, total)
    s = _apply_mask(s, mask, b, hq, hkv, g, lq, total)
    p = mx.softmax(s, axis=-1, precise=True).reshape(b, hkv, g * lq, total)

    out = p[..., s0 + n :] @ exact_v.astype(mx.float32)
    if values is not None:
        p_c = p[..., s0 : s0 + n]
        out = out + value_quantizer.weighted_sum(p_c, values)
        if value_mean is not None:
            out = out + p_c.sum(axis=-1, keepdims=True) * value_mean
    if prefix_v is not None:
        out = out + p[..., :s0] @ prefix_v.astype(mx.float32)
    return out.reshape(b, hq, lq, d).astype(queries.dtype)


def _first(codes: Codes, quantizer: Quantizer, n: int) -> Codes:
    strides = quantizer.token_strides()
    return codes.map(lambda k, a: a[:, :, : n // strides.get(k, 1)])


def _merge_exact(fused, q, exact_k, exact_v, prefix_k, prefix_v, scale, mask, g):
    """Merge a fused kernel's (out, lse) over compressed tokens with the exact tokens.

    ``q [B, H_kv, g·L, D]``; the compressed tokens are all visible to every query (they are
    older than the chunk), so a causal mask only applies within the exact part.
    """
    out_c, lse_c = fused
    ks = [a for a in (prefix_k, exact_k) if a is not None]
    vs = [a for a in (prefix_v, exact_v) if a is not None]
    k = ks[0] if len(ks) == 1 else mx.concatenate(ks, axis=2)
    v = vs[0] if len(vs) == 1 else mx.concatenate(vs, axis=2)
    b, hkv, rows, _ = q.shape
    lq, total = rows // g, k.shape[2]
    s = (q @ mx.swapaxes(k.astype(mx.float32), -1, -2)) * scale
    s = _apply_mask(s.reshape(b, hkv, g, lq, total), mask, b, hkv * g, hkv, g, lq, total)
    s = s.reshape(b, hkv, rows, total)
    top = mx.maximum(lse_c, s.max(axis=-1))
    w_c = mx.exp(lse_c - top)[..., None]
    w_e = mx.exp(s - top[..., None])
    num = w_c * out_c + w_e @ v.astype(mx.float32)
    return num / (w_c + w_e.sum(axis=-1, keepdims=True))


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
