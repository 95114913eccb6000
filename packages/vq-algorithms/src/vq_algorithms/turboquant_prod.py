"""TurboQuant-prod (Zandieh et al., arXiv 2504.19874, Algorithm 2): unbiased inner products.

A (b−1)-bit TurboQuant-MSE code of ``x`` (Algorithm 1) plus a 1-bit QJL sketch of the
residual ``r = x − x̂_mse`` and its norm (float16). Estimator (Theorem 2):
``<q, x̂> = <q, x̂_mse> + sqrt(π/2)/d · ||r|| · <S q, sign(S r)>``, unbiased for every q.
Everything runs in the rotated basis (the residual's norm and inner products survive it).

Codes for ``x [..., D]``: ``idx`` [..., ceil(D(b−1)/32)], ``norm`` f16, ``qjl`` uint32
[..., D/32], ``rnorm`` f16: ``b + 32/D`` bits per element. The MSE of the reconstruction is
higher than TurboQuant-MSE at the same bits (the price of unbiasedness), so values use
``turboquant_mse`` by default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx

import vq_kernels
from vq_algorithms._fused import (
    CODEBOOK_OP,
    codebook_decode_with_turboquant_values,
    codebook_keys_with_turboquant_values,
    kernel_applies,
    query_dtype,
    rotation_matrix,
    sign_codebook,
    tail_applies,
)
from vq_algorithms._rotated_codebook import RotatedCodebook, RotatedConfig
from vq_algorithms._sign_sketch import SignSketch
from vq_core import (
    FLOAT16_MAX,
    Codes,
    HeadDims,
    Quantizer,
    register,
    register_compressed_attention,
    register_decode_attention,
    stream_key,
)


@dataclass(frozen=True)
class TurboQuantProdConfig(RotatedConfig):
    allowed_bits = (2, 3, 4)
    # The sphere Lloyd–Max codebook needs d >= 3 (coordinate law of the unit sphere).
    head_dims = HeadDims(minimum=3)


@register
class TurboQuantProd(Quantizer):
    method = "turboquant_prod"
    config_class = TurboQuantProdConfig
    family = "rotation + scalar codebook + 1-bit residual sketch"
    max_norm = FLOAT16_MAX  # norms are stored as float16
    default_value_method = "turboquant_mse"
    # Measured at d=128 (0.57, 0.18, 0.053) plus margin: the sketch adds variance.
    round_trip_bound = {2: 0.62, 3: 0.2, 4: 0.06}

    def __init__(self, config: TurboQuantProdConfig):
        super().__init__(config)
        d = config.head_dim
        self.rc = RotatedCodebook(d, config.bits - 1, config.seed, config.rotation)
        self.sketch = SignSketch(d, d, stream_key(config.seed + 7919, "codebook"))

    def field_layout(self):
        return {
            **self.rc.layout(),
            "qjl": ((self.sketch.words,), mx.uint32),
            "rnorm": ((), mx.float16),
        }

    def _encode(self, x: mx.array) -> Codes:
        y = self.rc.rotation.apply(x)
        idx, norm = self.rc.encode_rotated(y)
        norm16 = norm.astype(mx.float16)
        r = y - self.rc.levels(idx) * norm16.astype(mx.float32)[..., None]
        rnorm = mx.linalg.norm(r, axis=-1)
        return Codes(idx=idx, norm=norm16, qjl=self.sketch.signs(r), rnorm=rnorm.astype(mx.float16))

    def _decode_rotated(self, codes: Codes) -> mx.array:
        residual = self.sketch.reconstruct(codes["qjl"], codes["rnorm"].astype(mx.float32))
        return self.rc.decode_rotated(codes) + residual

    def _decode(self, codes: Codes) -> mx.array:
        return self.rc.rotation.inverse(self._decode_rotated(codes))

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        """MSE part against codebook levels plus ``scale·rnorm·<S q', signs>``."""
        q_rot = self.rc.rotation.apply(q.astype(mx.float32))
        mse = q_rot @ mx.swapaxes(self.rc.levels(codes["idx"]), -1, -2)
        mse = mse * codes["norm"].astype(mx.float32)[..., None, :]
        sq = self.sketch.project(q_rot)
        qjl = sq @ mx.swapaxes(self.sketch.pm_one(codes["qjl"]), -1, -2)
        rn = codes["rnorm"].astype(mx.float32)[..., None, :] * self.sketch.scale
        return mse + qjl * rn

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        p = p.astype(mx.float32)
        mse = (p * codes["norm"].astype(mx.float32)[..., None, :]) @ self.rc.levels(codes["idx"])
        pr = p * (codes["rnorm"].astype(mx.float32) * self.sketch.scale)[..., None, :]
        res = (pr @ self.sketch.pm_one(codes["qjl"])) @ self.sketch.matrix
        return self.rc.rotation.inverse(mse + res)


def fused_prod_attention(q: mx.array, keys, values, *, scale: float):
    """TurboQuant-prod keys with TurboQuant-MSE values in vq-kernels' codebook kernel: the
    (b-1)-bit codes as its keys, the residual sketch as its second key term
    (:class:`vq_kernels.KeyTerm`: 1-bit codes, codebook -1 / +1). None unless
    :func:`~vq_algorithms._fused.kernel_applies`."""
    kq = keys.quantizer
    if kq.sketch.m != kq.head_dim or not kernel_applies(kq.head_dim, q.shape[2], CODEBOOK_OP):
        return None
    q_rot = kq.rc.rotation.apply(q.astype(mx.float32))
    sk = vq_kernels.KeyTerm(
        kq.sketch.project(q_rot), keys.codes["qjl"], keys.codes["rnorm"], sign_codebook(), 1,
        kq.sketch.scale,
    )  # fmt: skip
    return codebook_keys_with_turboquant_values(
        q_rot, keys.codes["idx"], kq.rc.codebook.centroids, kq.rc.bits, keys, values,
        scale=scale, k_term=sk,
    )  # fmt: skip


def fused_prod_decode(queries: mx.array, keys, values, *, scale: float):
    """A whole decode step over TurboQuant-prod keys and TurboQuant-MSE values in one launch
    (CUDA); None unless :func:`~vq_algorithms._fused.tail_applies`."""
    kq = keys.quantizer
    if kq.sketch.m != kq.head_dim or not tail_applies(queries, keys, values):
        return None
    dtype = query_dtype(queries)
    term = (_sketch_matrix(kq, dtype), keys.codes["qjl"], keys.codes["rnorm"], sign_codebook())
    term += (1, kq.sketch.scale)
    return codebook_decode_with_turboquant_values(
        queries, rotation_matrix(kq.rc.rotation, dtype), keys.codes["idx"],
        kq.rc.codebook.centroids, kq.rc.bits, keys, values, scale=scale, key_term=term,
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _sketch_matrix(quantizer: TurboQuantProd, dtype) -> mx.array:
    """``M_k S^T`` ``[D, D]`` in ``dtype``: ``q @`` it is the query rotated, then sketched."""
    m = (quantizer.rc.rotation.matrix @ quantizer.sketch.matrix.T).astype(dtype)
    mx.eval(m)
    return m


register_compressed_attention("turboquant_prod", "turboquant_mse", fused_prod_attention)
register_decode_attention("turboquant_prod", "turboquant_mse", fused_prod_decode)
