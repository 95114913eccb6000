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

import vq_kernels
from vq_algorithms._rotated_codebook import RotatedCodebook, RotatedConfig
from vq_core import Codes, Quantizer, register
from vq_kernels.codebook_attention import KERNEL_HEAD_DIMS


@dataclass(frozen=True)
class TurboQuantMSEConfig(RotatedConfig):
    """``rotation``: see :class:`RotatedConfig`."""

    allowed_bits = (1, 2, 3, 4)


@register
class TurboQuantMSE(Quantizer):
    method = "turboquant_mse"
    config_class = TurboQuantMSEConfig
    family = "rotation + scalar codebook"
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

    def scores(self, q: mx.array, codes: Codes) -> mx.array:
        """``norm_i · (q R)·c[idx_i]``: the query is rotated once, the keys never."""
        q_rot = self.rc.rotation.apply(q.astype(mx.float32))
        s = q_rot @ mx.swapaxes(self.rc.levels(codes["idx"]), -1, -2)
        return s * codes["norm"].astype(mx.float32)[..., None, :]

    def weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """``(Σ_i p_i norm_i c[idx_i]) R^T``: accumulate in the rotated basis, rotate once."""
        pw = p.astype(mx.float32) * codes["norm"].astype(mx.float32)[..., None, :]
        return self.rc.rotation.inverse(pw @ self.rc.levels(codes["idx"]))

    def fused_attention(self, q, codes, value_quantizer, values, *, scale, length):
        """The vq-kernels fused decode kernel when MLX runs on a GPU (Metal or CUDA).

        Keys and values must both be TurboQuant-MSE codes; on the CPU (or for a head_dim the
        kernel does not cover) this returns None and the lookup-table reference path runs.
        """
        if not isinstance(value_quantizer, TurboQuantMSE) or not _kernel_applies(self.head_dim):
            return None
        if q.shape[2] > MAX_FUSED_ROWS:  # a prefill chunk: the batched reference path is faster
            return None
        kc, vc = self.rc, value_quantizer.rc
        out_rot, lse = vq_kernels.codebook_decode_attention(
            kc.rotation.apply(q.astype(mx.float32)),
            codes["idx"],
            codes["norm"],
            kc.codebook.centroids,
            kc.bits,
            values["idx"],
            values["norm"],
            vc.codebook.centroids,
            vc.bits,
            scale=scale,
            length=length,
        )
        return vc.rotation.inverse(out_rot), lse


MAX_FUSED_ROWS = 32  # query rows per KV head (GQA group x tokens) sent to the decode kernel


def _kernel_applies(head_dim: int) -> bool:
    """A GPU backend is active and the kernel is specialized for this head_dim."""
    return vq_kernels.resolve_backend() != "reference" and head_dim in KERNEL_HEAD_DIMS
