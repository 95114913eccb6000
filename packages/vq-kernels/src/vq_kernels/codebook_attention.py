"""Fused decode attention over scalar-codebook K/V codes, in the rotated basis.

Scores: s_i = scale * norm_k,i * sum_j q_j c_k[idx_ij] (inner products survive the rotation);
values: out = sum_i p_i norm_v,i c_v[idx_i] / sum_i p_i, returned in the rotated basis for the
caller to rotate back. The kernel streams packed words (online softmax, flash-decoding
splits, one reduce); keys and values may use different bits.
"""

from __future__ import annotations

import mlx.core as mx

from vq_kernels._attention import (
    LOG2E,
    gqa_groups,
    row_tile,
    softmax_attention,
    split_attention,
    valid_length,
)
from vq_kernels._backend import resolve_backend
from vq_kernels.codebook import codebook_dequantize_reference, n_words

MAX_ROW_TILE = 4  # query rows per thread group; more would spill registers
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)  # 8-dim chunks, a power of two per token, <= 32


def codebook_decode_attention_reference(
    q_rot: mx.array,
    k_packed: mx.array,
    k_norm: mx.array,
    k_centroids: mx.array,
    k_bits: int,
    v_packed: mx.array,
    v_norm: mx.array,
    v_centroids: mx.array,
    v_bits: int,
    *,
    scale: float,
    length: int | None = None,
) -> tuple[mx.array, mx.array]:
    """Pure-MLX :func:`codebook_decode_attention`: dequantize, then exact softmax attention."""
    d = q_rot.shape[-1]
    n = valid_length(length, k_packed.shape[2])
    k = codebook_dequantize_reference(k_packed[:, :, :n], k_norm[:, :, :n], k_centroids, k_bits, d)
    v = codebook_dequantize_reference(v_packed[:, :, :n], v_norm[:, :, :n], v_centroids, v_bits, d)
    return softmax_attention(q_rot, k, v, scale)


def codebook_decode_attention(
    q_rot: mx.array,
    k_packed: mx.array,
    k_norm: mx.array,
    k_centroids: mx.array,
    k_bits: int,
    v_packed: mx.array,
    v_norm: mx.array,
    v_centroids: mx.array,
    v_bits: int,
    *,
    scale: float,
    length: int | None = None,
    backend: str | None = None,
) -> tuple[mx.array, mx.array]:
    """Decode attention of rotated queries over scalar-codebook codes.

    Args:
        q_rot: fp32 [B, Hq, Lq, D], already rotated; Hq = g * Hkv (GQA).
        k_packed, v_packed: uint32 [B, Hkv, Lbuf, ceil(D*bits/32)] packed codes.
        k_norm, v_norm: float16 [B, Hkv, Lbuf].
        k_centroids, v_centroids: sorted fp32 [2**bits]; k_bits, v_bits in {1, 2, 3, 4}.
        scale: softmax scale. length: valid tokens at the front of the buffer (default Lbuf).

    Returns:
        out_rot fp32 [B, Hq, Lq, D] (softmax over these tokens, rotated basis) and
        lse fp32 [B, Hq, Lq], the natural log-sum-exp of the scaled scores.
    """
    b, hq, lq, d = q_rot.shape
    _, hkv, lbuf, wk = k_packed.shape
    g = gqa_groups(q_rot, hkv)
    n = valid_length(length, lbuf)
    if wk != n_words(d, k_bits) or v_packed.shape[-1] != n_words(d, v_bits):
        raise ValueError("packed K/V widths do not match head_dim and bits")
    be = resolve_backend(backend)
    if be == "reference":
        return codebook_decode_attention_reference(
            q_rot, k_packed, k_norm, k_centroids, k_bits, v_packed, v_norm, v_centroids, v_bits,
            scale=scale, length=n,
        )  # fmt: skip
    if d not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the codebook kernel needs head_dim in {KERNEL_HEAD_DIMS}, got {d}")
    rows = g * lq
    q = (q_rot.astype(mx.float32) * (scale * LOG2E)).reshape(b * hkv, rows, d)
    inputs = [
        q,
        k_packed.reshape(b * hkv, lbuf, wk),
        k_norm.astype(mx.float16).reshape(b * hkv, lbuf),
        k_centroids.astype(mx.float32),
        v_packed.reshape(b * hkv, lbuf, v_packed.shape[-1]),
        v_norm.astype(mx.float16).reshape(b * hkv, lbuf),
        v_centroids.astype(mx.float32),
    ]
    out, lse = split_attention(
        "codebook_attn_partial", be, inputs, [("D", d), ("KB", k_bits), ("VB", v_bits)],
        heads=b * hkv, rows=rows, tile=row_tile(rows, MAX_ROW_TILE), length=n, lbuf=lbuf, d=d,
    )  # fmt: skip
    return out.reshape(b, hq, lq, d), lse.reshape(b, hq, lq)
