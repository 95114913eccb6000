"""Decode attention over affine codes in mlx-lm's QuantizedKVCache format.

Keys and values are ``(w_q, scales, biases) = mx.quantize(x, group_size, bits)`` along the
head dim: w_q uint32 [B, Hkv, Lbuf, D * bits / 32], scales and biases [B, Hkv, Lbuf, D / g];
reconstruction is ``mx.dequantize``. No fused kernel yet: every backend runs this pure-MLX
path (dequantize the valid tokens, then exact softmax attention), stated here rather than
switched to silently.
"""

from __future__ import annotations

import mlx.core as mx

from vq_kernels._attention import gqa_groups, softmax_attention, valid_length

AffineCodes = tuple[mx.array, mx.array, mx.array]


def affine_decode_attention(
    q: mx.array,
    k_quant: AffineCodes,
    v_quant: AffineCodes,
    *,
    scale: float,
    group_size: int = 64,
    bits: int = 8,
    length: int | None = None,
) -> tuple[mx.array, mx.array]:
    """Attention of q fp32 [B, Hq, Lq, D] over affine-coded K/V (first ``length`` tokens).

    Returns out fp32 [B, Hq, Lq, D] and lse fp32 [B, Hq, Lq] (natural log-sum-exp).
    """
    gqa_groups(q, k_quant[0].shape[1])
    n = valid_length(length, k_quant[0].shape[2])

    def deq(codes: AffineCodes) -> mx.array:
        w, s, b = (a[:, :, :n] for a in codes)
        return mx.dequantize(w, s, b, group_size=group_size, bits=bits).astype(mx.float32)

    return softmax_attention(q, deq(k_quant), deq(v_quant), scale)
