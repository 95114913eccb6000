"""Decode attention over affine codes in mlx-lm's QuantizedKVCache format (affine, KIVI).

Keys and values are ``(w_q, scales, biases) = mx.quantize(x, group_size, bits)`` along the
head dim: w_q uint32 [B, Hkv, Lbuf, D * bits / 32] (the little-endian bit stream of
:mod:`vq_kernels.packing`), scales and biases float16 [B, Hkv, Lbuf, D / group_size];
reconstruction x_j = scale_g * code_j + bias_g for j in group g. Keys and values may differ
in bits and group size. Keys may instead be grouped per channel (``key_axis="channel"``,
KIVI's keys, arXiv 2402.02750 Section 3.2): a group is one channel over ``group_size``
consecutive tokens, and block n's D scales (biases) fill the fields of its ``group_size``
token rows in order (read flat, ``scales[..., n*g:(n+1)*g, :]`` is block n's ``[D]``), the
same bits per token as per-token groups. On a GPU the one-pass kernel ``affine_attn`` scores
as scale * (q . codes) + bias * sum(q) per group (per channel: (q * scale) . codes +
q . bias, the block's scales folded into the query once per block) and sums values the same
way (no reconstruction in memory); the reference (and the CPU) dequantizes with fp32
scales, which is exact, then runs softmax attention.
"""

from __future__ import annotations

import mlx.core as mx

from vq_kernels._attention import (
    KERNEL_HEAD_DIMS,
    DecodeTail,
    batch_lengths,
    decode_launch,
    gqa_groups,
    no_tail_inputs,
    softmax_attention,
    tail_reference,
    valid_length,
)
from vq_kernels._backend import resolve_backend
from vq_kernels.packing import unpack_bits_reference

AffineCodes = tuple[mx.array, mx.array, mx.array]
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
CHANNEL_GROUP_SIZES = (16, 32, 64, 128)  # KIVI's per-channel key groups (tokens per block)
KEY_AXES = ("token", "channel")
TOKENS_PER_LANE = 2  # 128 registers a thread at 4 bits, 4 rows (4 tokens: 167; 8 bits: 158)


def _dequantize(codes: AffineCodes, n: int, group_size: int, bits: int, axis: str) -> mx.array:
    """fp32 ``[B, H, n, D]`` from the first ``n`` tokens of ``codes`` (``axis`` as keys')."""
    w, s, b = (a[:, :, :n] for a in codes)
    f32 = mx.float32
    if n == 0:  # mx.dequantize refuses empty arrays
        return mx.zeros((*w.shape[:-1], s.shape[-1] * group_size), f32)
    if axis == "token":
        return mx.dequantize(w, s.astype(f32), b.astype(f32), group_size=group_size, bits=bits)
    lead, d = w.shape[:2], s.shape[-1] * group_size
    blocks = (*lead, n // group_size, 1, d)  # block scales, broadcast over its tokens
    codes_ = unpack_bits_reference(w, bits, d).astype(f32).reshape(*lead, -1, group_size, d)
    x = codes_ * s.astype(f32).reshape(blocks) + b.astype(f32).reshape(blocks)
    return x.reshape(*lead, n, d)


def affine_decode_attention_reference(
    q: mx.array,
    k_quant: AffineCodes,
    v_quant: AffineCodes,
    *,
    scale: float,
    group_size: int = 64,
    bits: int = 8,
    value_group_size: int | None = None,
    value_bits: int | None = None,
    key_axis: str = "token",
    length: int | None = None,
    lengths: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Pure-MLX :func:`affine_decode_attention` (each batch row alone when ``lengths``)."""
    fmt = _format(group_size, bits, value_group_size, value_bits, key_axis)
    vgs, vbits = fmt["value_group_size"], fmt["value_bits"]
    if lengths is not None:
        rows = []
        for i, n in enumerate(batch_lengths(lengths, q.shape[0], k_quant[0].shape[2]).tolist()):
            one_k = tuple(a[i : i + 1] for a in k_quant)
            one_v = tuple(a[i : i + 1] for a in v_quant)
            kw = {"scale": scale, "length": n, **fmt}
            rows.append(affine_decode_attention_reference(q[i : i + 1], one_k, one_v, **kw))
        return mx.concatenate([o for o, _ in rows]), mx.concatenate([s for _, s in rows])
    n = valid_length(length, k_quant[0].shape[2])
    _check_channel_length(n, group_size, key_axis)
    k = _dequantize(k_quant, n, group_size, bits, key_axis)
    v = _dequantize(v_quant, n, vgs, vbits, "token")
    return softmax_attention(q, k, v, scale)


def affine_decode_attention(
    q: mx.array,
    k_quant: AffineCodes,
    v_quant: AffineCodes,
    *,
    scale: float,
    group_size: int = 64,
    bits: int = 8,
    value_group_size: int | None = None,
    value_bits: int | None = None,
    key_axis: str = "token",
    length: int | None = None,
    lengths: mx.array | None = None,
    tail: DecodeTail | None = None,
    backend: str | None = None,
) -> tuple[mx.array, mx.array]:
    """Attention of q fp32 (or fp16) [B, Hq, Lq, D] over affine-coded K/V.

    ``group_size`` and ``bits`` are the keys' (and the values' unless ``value_group_size``,
    ``value_bits`` say otherwise): bits in (2, 3, 4, 5, 6, 8), group sizes in (32, 64, 128)
    dividing head_dim; with ``key_axis="channel"`` the keys are KIVI's per-channel groups of
    ``group_size`` tokens (16 allowed too), and every valid length must be whole blocks.
    ``length`` (every row) or ``lengths`` (int32 [B] on the device, one per batch row) valid
    tokens at the front of the buffers. ``tail``: a :class:`~vq_kernels.DecodeTail` without
    matrices (affine codes are in the original basis): the op returns the whole attention
    of a cache, compressed and exact tokens, from one launch (CUDA), ``tail.counts``
    replacing ``length``/``lengths``. Returns out fp32 [B, Hq, Lq, D] (with a tail in q's
    dtype if float16) and lse fp32 [B, Hq, Lq] (natural log-sum-exp).
    """
    b, _, _, d = q.shape
    _, hkv, lbuf, _ = k_quant[0].shape
    gqa_groups(q, hkv)
    if length is not None and lengths is not None:
        raise ValueError("pass length or lengths, not both")
    if tail is not None:
        if length is not None or lengths is not None:
            raise ValueError("with a tail the valid counts come from tail.counts")
        if tail.key_matrix is not None:
            raise ValueError("affine codes are in the original basis: a tail without matrices")
        tail.check(q, hkv)
    fmt = _format(group_size, bits, value_group_size, value_bits, key_axis)
    vgs, vbits = fmt["value_group_size"], fmt["value_bits"]
    if key_axis not in KEY_AXES:
        raise ValueError(f"key_axis must be one of {KEY_AXES}, got {key_axis!r}")
    for side, nb, gs, axis in (("keys", bits, group_size, key_axis),
                               ("values", vbits, vgs, "token")):  # fmt: skip
        if not format_supported(d, nb, gs, axis):
            sizes = CHANNEL_GROUP_SIZES if axis == "channel" else GROUP_SIZES
            raise ValueError(
                f"affine {side} need bits in {AFFINE_BITS} and a group size in {sizes} "
                f"dividing head_dim {d}; got bits={nb}, group_size={gs}"
            )
    for name, (wq, s, bi), nb, gs in (("keys", k_quant, bits, group_size),
                                      ("values", v_quant, vbits, vgs)):  # fmt: skip
        if wq.shape != (b, hkv, lbuf, d * nb // 32):
            raise ValueError(f"{name}: codes {wq.shape} do not match q {q.shape} at {nb} bits")
        if s.shape != (b, hkv, lbuf, d // gs) or bi.shape != s.shape:
            raise ValueError(
                f"{name}: scales/biases must be [B, Hkv, Lbuf, D / group_size] = "
                f"{[b, hkv, lbuf, d // gs]}, got {s.shape} and {bi.shape}"
            )
    if key_axis == "channel" and lbuf % group_size:
        raise ValueError(
            f"per-channel keys come in blocks of {group_size} tokens; the buffer holds {lbuf}"
        )
    n = None if lengths is not None or tail is not None else valid_length(length, lbuf)
    if n is not None:
        _check_channel_length(n, group_size, key_axis)
    be = resolve_backend(backend, op="affine_decode_attention")
    if be == "reference" and tail is not None:

        def compressed(i, q_keys, n_i):
            one_k, one_v = (tuple(a[i : i + 1] for a in x) for x in (k_quant, v_quant))
            kw = {"scale": scale, "length": n_i, **fmt}
            return affine_decode_attention_reference(q_keys, one_k, one_v, **kw)

        return tail_reference(q, tail, scale, compressed)
    if be == "reference":
        return affine_decode_attention_reference(
            q, k_quant, v_quant, scale=scale, length=n, lengths=lengths, **fmt
        )
    if d not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the affine kernel needs head_dim in {KERNEL_HEAD_DIMS}, got {d}")
    nt = tokens_per_lane(d, group_size, key_axis)
    f16 = mx.float16
    kw, ks, kb = k_quant
    vw, vs, vb = v_quant
    codes = [kw, ks.astype(f16), kb.astype(f16), vw, vs.astype(f16), vb.astype(f16)]
    extra, flags = no_tail_inputs() if tail is None else tail.inputs(q, hkv)
    template = [("D", d), ("KB", bits), ("VB", vbits), ("KGS", group_size), ("VGS", vgs)]
    template += [("KCH", int(key_axis == "channel")), *flags]
    if tail is not None:
        lens = tail.counts.astype(mx.int32)
    else:
        lens = None if lengths is None else batch_lengths(lengths, b, lbuf)
    return decode_launch(
        "affine_attn", be, q, codes + extra, template, scale=scale, lbuf=lbuf, length=n,
        lengths=lens, tokens_per_lane=nt, tail=tail is not None,
    )  # fmt: skip


def format_supported(d: int, bits: int, group_size: int, axis: str = "token") -> bool:
    """Whether codes of ``bits`` in groups of ``group_size`` along ``axis`` ("token": along
    head_dim ``d``; "channel": over tokens, keys only) are a format this op takes."""
    sizes = CHANNEL_GROUP_SIZES if axis == "channel" else GROUP_SIZES
    return axis in KEY_AXES and bits in AFFINE_BITS and group_size in sizes and d % group_size == 0


def kernel_format_supported(d: int, bits: int, group_size: int, axis: str = "token") -> bool:
    """Whether the GPU kernel (not only the reference) takes this format at head_dim ``d``:
    :func:`format_supported`, ``d`` in ``KERNEL_HEAD_DIMS``, and per-channel blocks that
    hold whole loop steps (:func:`tokens_per_lane`)."""
    if not format_supported(d, bits, group_size, axis) or d not in KERNEL_HEAD_DIMS:
        return False
    return axis == "token" or group_size % _token_lanes(d) == 0


def tokens_per_lane(d: int, key_group_size: int, key_axis: str) -> int:
    """The kernel's tokens per lane per step (NT): ``TOKENS_PER_LANE``, fewer for
    per-channel keys so that one step (128 / (d / 8) token lanes x NT) lies in one block."""
    nt = min(TOKENS_PER_LANE, d // 8)
    if key_axis == "channel":
        lanes = _token_lanes(d)
        while nt > 1 and key_group_size % (lanes * nt):
            nt //= 2
        if key_group_size % (lanes * nt):
            raise ValueError(
                f"per-channel key blocks of {key_group_size} tokens are shorter than the "
                f"kernel's {lanes} token lanes at head_dim {d}; use a group size >= {lanes}"
            )
    return nt


def _token_lanes(d: int) -> int:
    """Token lanes of one 128-thread group: each lane reads ``d / 8`` 8-dim chunks."""
    return 128 // (d // 8)


def _format(group_size, bits, value_group_size, value_bits, key_axis) -> dict:
    """The format keywords of both attention functions, the values' defaults filled in."""
    return {
        "group_size": group_size,
        "bits": bits,
        "value_group_size": value_group_size or group_size,
        "value_bits": value_bits or bits,
        "key_axis": key_axis,
    }


def _check_channel_length(n: int, group_size: int, key_axis: str) -> None:
    if key_axis == "channel" and n % group_size:
        raise ValueError(
            f"per-channel keys hold whole blocks of {group_size} tokens; {n} valid tokens "
            "is not a multiple"
        )
