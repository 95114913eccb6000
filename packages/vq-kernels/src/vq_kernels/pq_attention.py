"""Lookup-table decode attention for product-VQ codes (VecInfer, CommVQ).

D splits into M subspaces of D/M dims; a code row is uint8 [M] into centroids fp32
[M, K, D/M] (K <= 256); reconstruction = concat_m centroids[m, code_m]. Per query the kernel
builds LUT[m, k] = q_m . C_k[m, k] once, scores s_i = scale * sum_m LUT[m, code_im], and
accumulates values per subspace: out_m = sum_i p_i C_v[m, vcode_im].
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

LUT_FLOATS = 8192  # shared-memory budget of the lookup table (32 KiB)


def pq_dequantize(codes: mx.array, centroids: mx.array) -> mx.array:
    """codes uint8 [..., M], centroids fp32 [M, K, D/M] -> fp32 [..., D]."""
    m, _, ds = centroids.shape
    parts = centroids[mx.arange(m), codes.astype(mx.int32)]  # [..., M, D/M]
    return parts.reshape(*codes.shape[:-1], m * ds).astype(mx.float32)


def pq_decode_attention_reference(
    q: mx.array,
    k_codes: mx.array,
    k_centroids: mx.array,
    v_codes: mx.array,
    v_centroids: mx.array,
    *,
    scale: float,
    length: int | None = None,
) -> tuple[mx.array, mx.array]:
    """Pure-MLX :func:`pq_decode_attention`: reconstruct, then exact softmax attention."""
    n = valid_length(length, k_codes.shape[2])
    k = pq_dequantize(k_codes[:, :, :n], k_centroids)
    v = pq_dequantize(v_codes[:, :, :n], v_centroids)
    return softmax_attention(q, k, v, scale)


def pq_decode_attention(
    q: mx.array,
    k_codes: mx.array,
    k_centroids: mx.array,
    v_codes: mx.array,
    v_centroids: mx.array,
    *,
    scale: float,
    length: int | None = None,
    backend: str | None = None,
) -> tuple[mx.array, mx.array]:
    """Decode attention over product-VQ codes.

    Args:
        q: fp32 [B, Hq, Lq, D]; Hq = g * Hkv.
        k_codes, v_codes: uint8 [B, Hkv, Lbuf, M] (first ``length`` tokens valid).
        k_centroids, v_centroids: fp32 [M, K, D / M], K <= 256, shared by all heads.
        scale: softmax scale. length: valid tokens (default Lbuf).

    Returns:
        out fp32 [B, Hq, Lq, D] and lse fp32 [B, Hq, Lq] (natural log-sum-exp of the scores).
    """
    b, hq, lq, d = q.shape
    _, hkv, lbuf, m = k_codes.shape
    g = gqa_groups(q, hkv)
    n = valid_length(length, lbuf)
    kc = k_centroids.shape[1]
    if k_centroids.shape != (m, kc, d // m) or v_centroids.shape != k_centroids.shape:
        raise ValueError("centroids must be [M, K, D / M] for keys and values alike")
    be = resolve_backend(backend, op="pq_decode_attention")
    if be == "reference":
        return pq_decode_attention_reference(
            q, k_codes, k_centroids, v_codes, v_centroids, scale=scale, length=n
        )
    if m * kc > LUT_FLOATS or kc > 256:
        raise ValueError(f"M * K = {m * kc} exceeds the kernel's table of {LUT_FLOATS} floats")
    rows = g * lq
    qs = (q.astype(mx.float32) * (scale * LOG2E)).reshape(b * hkv, rows, d)
    inputs = [
        qs,
        k_codes.astype(mx.uint8).reshape(b * hkv, lbuf, m),
        k_centroids.astype(mx.float32),
        v_codes.astype(mx.uint8).reshape(b * hkv, lbuf, m),
        v_centroids.astype(mx.float32),
    ]
    tile = row_tile(rows, min(4, LUT_FLOATS // (m * kc)))
    out, lse = split_attention(
        "pq_attn_partial", be, inputs, [("D", d), ("M", m), ("KC", kc)],
        heads=b * hkv, rows=rows, tile=tile, length=n, lbuf=lbuf, d=d,
    )  # fmt: skip
    return out.reshape(b, hq, lq, d), lse.reshape(b, hq, lq)
