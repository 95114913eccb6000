"""Decode attention over affine codes in mlx-lm's QuantizedKVCache format (affine, KIVI values).

Keys and values are ``(w_q, scales, biases) = mx.quantize(x, group_size, bits)`` along the
head dim: w_q uint32 [B, Hkv, Lbuf, D * bits / 32] (the little-endian bit stream of
:mod:`vq_kernels.packing`), scales and biases float16 [B, Hkv, Lbuf, D / group_size];
reconstruction x_j = scale_g * code_j + bias_g for j in group g. On a GPU the one-pass
kernel ``affine_attn`` scores as scale * (q . codes) + bias * sum(q) per group and sums
values the same way (no reconstruction in memory); the reference (and the CPU) dequantizes
with fp32 scales, which is exact, then runs softmax attention.
"""

from __future__ import annotations

import mlx.core as mx

from vq_kernels._attention import (
    KERNEL_HEAD_DIMS,
    batch_lengths,
    decode_launch,
    gqa_groups,
    softmax_attention,
    valid_length,
)
from vq_kernels._backend import resolve_backend

AffineCodes = tuple[mx.array, mx.array, mx.array]
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
TOKENS_PER_LANE = 2  # 128 registers a thread at 4 bits, 4 rows (4 tokens: 167; 8 bits: 158)


def _dequantize(codes: AffineCodes, n: int, group_size: int, bits: int) -> mx.array:
    w, s, b = (a[:, :, :n] for a in codes)
    f32 = mx.float32
    if n == 0:  # mx.dequantize refuses empty arrays
        return mx.zeros((*w.shape[:-1], s.shape[-1] * group_size), f32)
    return mx.dequantize(w, s.astype(f32), b.astype(f32), group_size=group_size, bits=bits)


def affine_decode_attention_reference(
    q: mx.array,
    k_quant: AffineCodes,
    v_quant: AffineCodes,
    *,
    scale: float,
    group_size: int = 64,
    bits: int = 8,
    length: int | None = None,
    lengths: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Pure-MLX :func:`affine_decode_attention` (each batch row alone when ``lengths``)."""
    if lengths is not None:
        rows = []
        for i, n in enumerate(batch_lengths(lengths, q.shape[0], k_quant[0].shape[2]).tolist()):
            one_k = tuple(a[i : i + 1] for a in k_quant)
            one_v = tuple(a[i : i + 1] for a in v_quant)
            kw = {"scale": scale, "group_size": group_size, "bits": bits, "length": n}
            rows.append(affine_decode_attention_reference(q[i : i + 1], one_k, one_v, **kw))
        return mx.concatenate([o for o, _ in rows]), mx.concatenate([s for _, s in rows])
    n = valid_length(length, k_quant[0].shape[2])
    k = _dequantize(k_quant, n, group_size, bits)
    v = _dequantize(v_quant, n, group_size, bits)
    return softmax_attention(q, k, v, scale)


def affine_decode_attention(
    q: mx.array,
    k_quant: AffineCodes,
    v_quant: AffineCodes,
    *,
    scale: float,
    group_size: int = 64,
    bits: int = 8,
    length: int | None = None,
    lengths: mx.array | None = None,
    backend: str | None = None,
) -> tuple[mx.array, mx.array]:
    """Attention of q fp32 (or fp16) [B, Hq, Lq, D] over affine-coded K/V.

    ``length`` (every row) or ``lengths`` (int32 [B] on the device, one per batch row) valid
    tokens at the front of the buffers; group_size in (32, 64, 128), bits in (2, 3, 4, 5, 6,
    8), the same for keys and values. Returns out fp32 [B, Hq, Lq, D] and lse fp32
    [B, Hq, Lq] (natural log-sum-exp).
    """
    b, _, _, d = q.shape
    _, hkv, lbuf, _ = k_quant[0].shape
    gqa_groups(q, hkv)
    if length is not None and lengths is not None:
        raise ValueError("pass length or lengths, not both")
    if bits not in AFFINE_BITS or group_size not in GROUP_SIZES or d % group_size:
        raise ValueError(
            f"affine codes need bits in {AFFINE_BITS} and a group_size in {GROUP_SIZES} "
            f"dividing head_dim {d}; got bits={bits}, group_size={group_size}"
        )
    for name, (wq, s, bi) in (("keys", k_quant), ("values", v_quant)):
        if wq.shape != (b, hkv, lbuf, d * bits // 32):
            raise ValueError(f"{name}: codes {wq.shape} do not match q {q.shape} at {bits} bits")
        if s.shape != (b, hkv, lbuf, d // group_size) or bi.shape != s.shape:
            raise ValueError(f"{name}: scales/biases must be [B, Hkv, Lbuf, D / group_size]")
    n = None if lengths is not None else valid_length(length, lbuf)
    be = resolve_backend(backend)
    if be == "reference":
        return affine_decode_attention_reference(
            q, k_quant, v_quant, scale=scale, group_size=group_size, bits=bits, length=n,
            lengths=lengths,
        )  # fmt: skip
    if d not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the affine kernel needs head_dim in {KERNEL_HEAD_DIMS}, got {d}")
    f16 = mx.float16
    kw, ks, kb = k_quant
    vw, vs, vb = v_quant
    codes = [kw, ks.astype(f16), kb.astype(f16), vw, vs.astype(f16), vb.astype(f16)]
    template = [("D", d), ("KB", bits), ("VB", bits), ("GS", group_size)]
    lens = None if lengths is None else batch_lengths(lengths, b, lbuf)
    return decode_launch(
        "affine_attn", be, q, codes, template, scale=scale, lbuf=lbuf, length=n, lengths=lens,
        tokens_per_lane=TOKENS_PER_LANE,
    )  # fmt: skip
