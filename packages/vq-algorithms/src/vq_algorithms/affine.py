"""Affine group quantization: the mlx-lm ``QuantizedKVCache`` baseline.

Each vector ``x [D]`` is split into ``D / g`` groups of ``g`` consecutive coordinates; each
group keeps a float16 ``scale`` and ``bias`` and ``b``-bit codes with
``x̂ = scale * code + bias``. The codes are exactly what ``mx.quantize(x.astype(float16),
group_size=g, bits=b)`` returns (MLX's affine format: codes packed little-endian into
uint32 words), so they are bit-for-bit mlx-lm's quantized KV cache and KIVI's per-token
value quantizer (Liu et al., arXiv 2402.02750, Section 3.2) with MLX's rounding of the
scale. Attention reads the codes through ``mx.quantized_matmul``, as mlx-lm's
``quantized_scaled_dot_product_attention`` does; on a GPU a decode step runs vq-kernels'
one-pass affine kernel instead (keys and values may differ in bits and group size).

Codes for ``x [..., D]``: ``w`` uint32 ``[..., D*b/32]``, ``scales`` and ``biases`` float16
``[..., D/g]``: ``b + 32/g`` bits per element (4.5 at the mlx-lm default b=4, g=64).
``head_dim`` must be a multiple of ``group_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

import vq_kernels
from vq_algorithms._fused import (
    AFFINE_OP,
    kernel_applies,
    one_launch,
    tail_applies,
    valid_tokens,
    view_counts,
)
from vq_core import (
    FLOAT16_MAX,
    Codes,
    CompressedSide,
    ConfigError,
    Quantizer,
    QuantizerConfig,
    invalid_choice,
    register,
    register_compressed_attention,
    register_decode_attention,
)

GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class AffineConfig(QuantizerConfig):
    """``group_size``: coordinates sharing one scale/bias (32, 64 or 128; mlx-lm uses 64)."""

    allowed_bits = (2, 3, 4, 5, 6, 8)
    group_size: int = 64

    def validate(self) -> None:
        super().validate()
        invalid_choice("group_size", self.group_size, GROUP_SIZES)
        if self.head_dim % self.group_size:
            raise ConfigError(
                f"affine: head_dim={self.head_dim} is not a multiple of "
                f"group_size={self.group_size}; pick a group_size in {GROUP_SIZES} dividing it"
            )


@register
class Affine(Quantizer):
    method = "affine"
    config_class = AffineConfig
    family = "per-group affine (scale + bias)"
    max_abs = FLOAT16_MAX  # group minima and scales are stored as float16
    # Measured at g=64 on N(0,1), head_dim 128 (3 seeds): 0.156, 0.0364, 0.00829, 1.96e-3,
    # 4.75e-4, 2.94e-5 (b = 2, 3, 4, 5, 6, 8; worst seed), plus ~8% margin.
    round_trip_bound = {2: 0.17, 3: 0.040, 4: 0.0090, 5: 0.0021, 6: 5.2e-4, 8: 3.2e-5}

    def field_layout(self):
        c = self.config
        n = self.head_dim // c.group_size
        return {
            "w": ((self.head_dim * c.bits // 32,), mx.uint32),
            "scales": ((n,), mx.float16),
            "biases": ((n,), mx.float16),
        }

    def _encode(self, x: mx.array) -> Codes:
        c = self.config
        flat = x.astype(mx.float16).reshape(-1, self.head_dim)
        w, scales, biases = mx.quantize(flat, group_size=c.group_size, bits=c.bits)
        lead = x.shape[:-1]
        return Codes(
            {
                "w": w.reshape(*lead, w.shape[-1]),
                "scales": scales.reshape(*lead, scales.shape[-1]),
                "biases": biases.reshape(*lead, biases.shape[-1]),
            }
        )

    def _args(self, codes: Codes) -> tuple[mx.array, mx.array, mx.array]:
        """``(w, scales, biases)`` with float32 side info, for (de)quantized matmuls."""
        f32 = mx.float32
        return codes["w"], codes["scales"].astype(f32), codes["biases"].astype(f32)

    def _decode(self, codes: Codes) -> mx.array:
        c = self.config
        w, scales, biases = self._args(codes)
        flat = mx.dequantize(
            w.reshape(-1, w.shape[-1]),
            scales.reshape(-1, scales.shape[-1]),
            biases.reshape(-1, biases.shape[-1]),
            group_size=c.group_size,
            bits=c.bits,
        )
        return flat.reshape(*w.shape[:-1], self.head_dim)

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        """``q [B, H, M, D] @ k̂ᵀ`` straight from the codes (``mx.quantized_matmul``)."""
        return self._matmul(q, codes, transpose=True)

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """``p [B, H, M, L] @ v̂`` straight from the codes (``mx.quantized_matmul``)."""
        return self._matmul(p, codes, transpose=False)

    def _matmul(self, x: mx.array, codes: Codes, *, transpose: bool) -> mx.array:
        w, scales, biases = self._args(codes)
        if mx.default_device() == mx.gpu:  # MLX CUDA's quantized_matmul refuses strided codes
            w = mx.contiguous(w)  # (the cache hands over a slice of its step-grown buffer)
        c = self.config
        return mx.quantized_matmul(
            x.astype(mx.float32),
            w,
            scales,
            biases,
            transpose=transpose,
            group_size=c.group_size,
            bits=c.bits,
        )


def kernel_format(side: CompressedSide) -> tuple[tuple[mx.array, ...], int, int, str] | None:
    """``(codes, bits, group_size, axis)`` of a side whose codes are affine group codes in
    the layout of vq-kernels' affine kernel (affine; KIVI, either axis), else None."""
    q = side.quantizer
    fields = {"affine": ("w", "scales", "biases"), "kivi": ("idx", "scale", "zero")}
    if q.method not in fields:
        return None
    axis = getattr(q.config, "axis", "token")
    codes = tuple(side.codes[f] for f in fields[q.method])
    return codes, q.config.bits, q.config.group_size, axis


def fused_affine_attention(
    q: mx.array, keys: CompressedSide, values: CompressedSide, *, scale: float
) -> tuple[mx.array, mx.array] | None:
    """Affine or KIVI keys (per token or per channel) with affine or per-token KIVI values
    in vq-kernels' ``affine_decode_attention`` (one pass over the codes). None (the
    reference segment runs) for formats that kernel does not take (per-channel values,
    groups of 16 along head_dim, per-channel blocks shorter than its token lanes), and
    unless :func:`~vq_algorithms._fused.kernel_applies`."""
    formats = _kernel_formats(keys, values)
    if formats is None or not kernel_applies(keys.quantizer.head_dim, q.shape[2], AFFINE_OP):
        return None
    kf, vf = formats
    return vq_kernels.affine_decode_attention(
        q,
        kf[0],
        vf[0],
        scale=scale,
        group_size=kf[2],
        bits=kf[1],
        key_axis=kf[3],
        value_group_size=vf[2],
        value_bits=vf[1],
        **valid_tokens(keys),
    )


def _kernel_formats(keys, values):
    """Both sides' :func:`kernel_format` when the affine kernel takes the pair, else None."""
    kf, vf = kernel_format(keys), kernel_format(values)
    if kf is None or vf is None or vf[3] != "token":
        return None
    d = keys.quantizer.head_dim
    if not all(vq_kernels.affine_kernel_format_supported(d, *f[1:]) for f in (kf, vf)):
        return None
    return kf, vf


def fused_affine_decode(queries: mx.array, keys, values, *, scale: float) -> mx.array | None:
    """A whole decode step over affine or KIVI keys (either axis) and affine or per-token
    KIVI values in one launch of vq-kernels' affine kernel with a decode tail (CUDA): the
    compressed tokens, the exact sink and recent ones, means and finite flag. None for the
    formats :func:`fused_affine_attention` declines and unless
    :func:`~vq_algorithms._fused.tail_applies`."""
    formats = _kernel_formats(keys, values)
    if formats is None or not tail_applies(queries, keys, values):
        return None
    (k_codes, *kf), (v_codes, *vf) = formats
    optional = (keys.mean, values.mean, keys.finite)
    config = (tuple(kf), tuple(vf), float(scale), tuple(x is not None for x in optional))
    config += (queries.dtype,)
    arrays = [queries, keys.buffer, values.buffer, view_counts(keys, queries.shape[0])]
    arrays += [*k_codes, *v_codes, *(x for x in optional if x is not None)]
    return one_launch(_affine_step, config, queries, keys, arrays)


def _affine_step(kf, vf, scale, present, dtype):
    """The decode step of :func:`fused_affine_decode` (``kf``, ``vf``: bits, group size,
    axis)."""
    fmt = {"bits": kf[0], "group_size": kf[1], "key_axis": kf[2]}
    fmt |= {"value_bits": vf[0], "value_group_size": vf[1]}

    def step(q, ek, ev, counts, kw, ks, kb, vw, vs, vb, *rest):
        it = iter(rest)
        k_mean, v_mean, finite = (next(it) if p else None for p in present)
        tail = vq_kernels.DecodeTail(None, None, ek, ev, counts, k_mean, v_mean, finite)
        out, _ = vq_kernels.affine_decode_attention(
            q, (kw, ks, kb), (vw, vs, vb), scale=scale, tail=tail, **fmt
        )
        return out.astype(dtype)

    return step


register_compressed_attention("affine", "affine", fused_affine_attention)
register_compressed_attention("affine", "kivi", fused_affine_attention)
register_decode_attention("affine", "affine", fused_affine_decode)
register_decode_attention("affine", "kivi", fused_affine_decode)
