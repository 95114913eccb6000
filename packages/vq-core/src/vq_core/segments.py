"""Attention as a sum of segments, merged once.

Softmax attention over the tokens ``T = T_1 ∪ ... ∪ T_k`` (disjoint) splits exactly: if
segment ``i`` returns its normalized output ``o_i = Σ_{t∈T_i} e^{s_t - l_i} v_t`` and its
log-sum-exp ``l_i = log Σ_{t∈T_i} e^{s_t}``, then with ``l = logaddexp(l_1, ..., l_k)``

    out = Σ_i e^{l_i - l} o_i

(the identity behind flash-decoding's split-K reduction, Dao et al. 2023, and the online
softmax of Milakov & Gimelshein, arXiv 1805.02867). The merge is symmetric in its
segments, so their order does not matter. A row with no visible token in a segment has
``l_i = -inf`` and contributes nothing.

Shapes: ``q [B, H, M, D]`` (``M`` query rows per KV head after grouped-query folding),
segment ``out [B, H, M, Dv]`` float32, ``lse [B, H, M]`` float32.
"""

from __future__ import annotations

import mlx.core as mx

Segment = tuple[mx.array, mx.array]


def softmax_segment(s: mx.array, v: mx.array) -> Segment:
    """Scaled, masked scores ``s [B, H, M, n]`` (``-inf`` where hidden) and values
    ``v [B, H, n, Dv]`` -> ``(out, lse)``; rows with no visible token get ``lse = -inf``
    and ``out = 0``."""
    top = s.max(axis=-1, keepdims=True)
    top = mx.where(mx.isfinite(top), top, 0.0)  # fully hidden rows: avoid inf - inf
    w = mx.exp(s - top)
    total = w.sum(axis=-1, keepdims=True)
    out = (w @ v.astype(mx.float32)) / mx.maximum(total, 1e-30)
    return out, (mx.log(total) + top)[..., 0]


def exact_segment(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask: mx.array | None = None
) -> Segment:
    """Exact tokens ``k, v [B, H, n, D]`` for ``q [B, H, M, D]``; ``mask`` is None (every
    token visible), boolean (True = visible) or additive, broadcastable to ``[B, H, M, n]``."""
    s = (q @ mx.swapaxes(k.astype(mx.float32), -1, -2)) * scale
    if mask is not None:
        s = mx.where(mask, s, -mx.inf) if mask.dtype == mx.bool_ else s + mask.astype(s.dtype)
    return softmax_segment(s, v)


def sink_segment(sinks: mx.array, b: int, hkv: int, lq: int) -> Segment:
    """Learned attention-sink logits ``sinks [Hq]`` (one per query head, gpt-oss; the
    ``sinks`` of ``mx.fast.scaled_dot_product_attention``) as a segment: one extra logit in
    each row's softmax denominator with a zero value, so ``out = 0`` and ``lse = sink``.
    Rows are folded as everywhere here: query head ``h`` of ``Hq = g·Hkv`` and token ``l``
    sit in row ``(h % g)·L + l`` of KV head ``h // g``. Returns ``out [1, 1, 1, 1]`` (zeros,
    broadcast by :func:`combine`) and ``lse [B, Hkv, g·L]`` (float32; not scaled, as in
    MLX's SDPA)."""
    g = sinks.shape[0] // hkv
    lse = mx.repeat(sinks.astype(mx.float32).reshape(hkv, g), lq, axis=1)  # [Hkv, g·L]
    return mx.zeros((1, 1, 1, 1)), mx.broadcast_to(lse, (b, hkv, g * lq))


def combine(segments: list[Segment]) -> Segment:
    """Segments' ``(out, lse)`` -> the ``(out, lse)`` of all their tokens together."""
    if len(segments) == 1:
        return segments[0]
    lses = mx.stack([lse for _, lse in segments])  # [k, B, H, M]
    top = lses.max(axis=0)
    top = mx.where(mx.isfinite(top), top, 0.0)
    weights = mx.exp(lses - top)  # 0 for empty rows of a segment
    total = weights.sum(axis=0)
    out = sum(w[..., None] * o for w, (o, _) in zip(weights, segments, strict=True))
    return out / mx.maximum(total, 1e-30)[..., None], mx.log(total) + top


def merge(segments: list[Segment]) -> mx.array:
    """The softmax output over all the segments' tokens, ``[B, H, M, Dv]``.

    Two segments (a decode step: exact tokens and compressed history) merge in one compiled
    graph on a GPU (its shapes stay fixed from step to step, so it compiles once); the CPU
    runs op by op, since MLX compiles CPU graphs with the system C++ compiler (seconds)."""
    if len(segments) == 2 and mx.default_device() == mx.gpu:
        (o1, l1), (o2, l2) = segments
        return _compiled_pair(o1, l1, o2, l2)
    return combine(segments)[0]


def _merge_pair(o1: mx.array, l1: mx.array, o2: mx.array, l2: mx.array) -> mx.array:
    top = mx.maximum(l1, l2)
    top = mx.where(mx.isfinite(top), top, 0.0)
    w1, w2 = mx.exp(l1 - top), mx.exp(l2 - top)
    out = w1[..., None] * o1 + w2[..., None] * o2
    return out / mx.maximum(w1 + w2, 1e-30)[..., None]


_compiled_pair = mx.compile(_merge_pair)
