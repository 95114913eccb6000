"""TurboQuant-MSE (Zandieh et al., arXiv 2504.19874, Algorithm 1).

Rotate each vector with a random orthogonal matrix, quantize every coordinate of the unit
direction with the Lloyd–Max codebook of the coordinate law (Lemma 1), and keep the norm in
float16. Distortion for unit vectors (Theorem 1): D_mse ≈ 0.36, 0.117, 0.03, 0.009 at
b = 1, 2, 3, 4 bits. Used for keys and values alike; attention runs in the rotated basis.

Codes for ``x [..., D]``: ``idx`` uint32 ``[..., ceil(D*b/32)]`` and ``norm`` float16
``[...]``: ``b + 16/D`` bits per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from vq_algorithms._fused import (
    CODEBOOK_OP,
    codebook_decode_with_turboquant_values,
    codebook_keys_with_turboquant_values,
    kernel_applies,
    query_dtype,
    rotation_matrix,
    tail_applies,
)
from vq_algorithms._rotated_codebook import RotatedCodebook, RotatedConfig
from vq_core import (
    FLOAT16_MAX,
    Codes,
    CompressedSide,
    HeadDims,
    Quantizer,
    register,
    register_compressed_attention,
    register_decode_attention,
)


@dataclass(frozen=True)
class TurboQuantMSEConfig(RotatedConfig):
    """``rotation``: see :class:`RotatedConfig`."""

    allowed_bits = (1, 2, 3, 4)
    # The sphere Lloyd–Max codebook needs d >= 3 (coordinate law of the unit sphere).
    head_dims = HeadDims(minimum=3)


@register
class TurboQuantMSE(Quantizer):
    method = "turboquant_mse"
    config_class = TurboQuantMSEConfig
    family = "rotation + scalar codebook"
    max_norm = FLOAT16_MAX  # norms are stored as float16
    # Theorem 1's figures (0.36, 0.117, 0.03, 0.009) plus fp16-norm and sampling margin.
    round_trip_bound = {1: 0.37, 2: 0.12, 3: 0.036, 4: 0.0100}

    def __init__(self, config: TurboQuantMSEConfig):
        super().__init__(config)
        self.rc = RotatedCodebook(config.head_dim, config.bits, config.seed, config.rotation)

    def field_layout(self):
        return self.rc.layout()

    def _encode(self, x: mx.array) -> Codes:
        return self.rc.encode(x)

    def _decode(self, codes: Codes) -> mx.array:
        return self.rc.rotation.inverse(self.rc.decode_rotated(codes))

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        """``norm_i · (q R)·c[idx_i]``: the query is rotated once, the keys never."""
        q_rot = self.rc.rotation.apply(q.astype(mx.float32))
        s = q_rot @ mx.swapaxes(self.rc.levels(codes["idx"]), -1, -2)
        return s * codes["norm"].astype(mx.float32)[..., None, :]

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """``(Σ_i p_i norm_i c[idx_i]) R^T``: accumulate in the rotated basis, rotate once."""
        pw = p.astype(mx.float32) * codes["norm"].astype(mx.float32)[..., None, :]
        return self.rc.rotation.inverse(pw @ self.rc.levels(codes["idx"]))


def fused_codebook_attention(
    q: mx.array, keys: CompressedSide, values: CompressedSide, *, scale: float
) -> tuple[mx.array, mx.array] | None:
    """The vq-kernels fused decode kernel for TurboQuant-MSE keys and values (GPU only).

    The query is rotated into the keys' basis once, the kernel scores against the codes
    and sums values in the values' rotated basis, and the output is rotated back once.
    None unless :func:`~vq_algorithms._fused.kernel_applies`; ragged batches pass their
    per-row lengths to the kernel.
    """
    if not kernel_applies(keys.quantizer.head_dim, q.shape[2], CODEBOOK_OP):
        return None
    kc = keys.quantizer.rc
    return codebook_keys_with_turboquant_values(
        kc.rotation.apply(q.astype(mx.float32)),
        keys.codes["idx"],
        kc.codebook.centroids,
        kc.bits,
        keys,
        values,
        scale=scale,
    )


def fused_codebook_decode(queries: mx.array, keys, values, *, scale: float) -> mx.array | None:
    """A whole decode step over TurboQuant-MSE keys and values in one launch (CUDA); None
    unless :func:`~vq_algorithms._fused.tail_applies`."""
    if not tail_applies(queries, keys, values):
        return None
    kc = keys.quantizer.rc
    return codebook_decode_with_turboquant_values(
        queries, rotation_matrix(kc.rotation, query_dtype(queries)), keys.codes["idx"],
        kc.codebook.centroids, kc.bits, keys, values, scale=scale,
    )  # fmt: skip


register_compressed_attention("turboquant_mse", "turboquant_mse", fused_codebook_attention)
register_decode_attention("turboquant_mse", "turboquant_mse", fused_codebook_decode)
