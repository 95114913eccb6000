"""VecInfer (arXiv 2510.06175): outlier-suppressed product vector quantization of the cache.

Per layer and per keys/values, calibration (vq-calibrate) saves per-channel smoothing factors
``s [D]`` (``s_c = sqrt(max |x_c|)``, normalized to geometric mean 1) and product-VQ
codebooks ``centroids [S, 256, D/S]`` trained by k-means on the transformed vectors
``z = H(x / s)``, where ``H`` is the orthonormal Hadamard transform (fixed signs, seed 0, so
an artifact does not depend on the cache's seed). Smoothing divides out the outlier channels;
the Hadamard transform spreads what is left over every coordinate, so the sub-vectors are
easy to cluster.

Codes: ``idx`` uint8 ``[..., S]``, one 8-bit centroid index per sub-vector of ``D/S`` dims
(``D/S = 8, 4, 2`` for 1, 2, 4 bits per element): exactly ``bits`` bits per element, no
fp16 reconstruction and no norm. The layout is vq-kernels' ``pq_decode_attention`` layout,
which runs VecInfer keys and values together on a GPU (1 and 2 bits: the lookup table of
``S · 256`` floats must fit the kernel's 8192).

Scores use a per-query lookup table: ``q' = H(q ⊙ s)``, ``LUT[s, k] = q'_s · centroids[s, k]``
and ``q·k̂ = Σ_s LUT[s, idx_s]`` (``⟨q, H⁻¹(ĉ) ⊙ s⟩ = ⟨H(q ⊙ s), ĉ⟩``).

``untrained=True`` (and no artifact) asks for the *untrained* neighbour: smoothing 1 and
codebooks of standard-normal samples drawn from ``seed`` (suited only to unit-variance
inputs). It exists for unit use and tests; with neither an artifact nor ``untrained=True``
the quantizer is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

import vq_kernels
from vq_algorithms._artifact import Calibrated, CalibratedConfig, check_tensors
from vq_algorithms._fused import PQ_OP, kernel_applies
from vq_core import (
    Codes,
    CompressedSide,
    ConfigError,
    HeadDims,
    RandomizedHadamard,
    VectorCodebook,
    register,
    register_compressed_attention,
    stream_key,
)
from vq_core.preconditioner import hadamard_supported
from vq_kernels.pq_attention import LUT_FLOATS

CODEBOOK_SIZE = 256


@dataclass(frozen=True)
class VecInferConfig(CalibratedConfig):
    """Artifact from ``vq calibrate --method vecinfer`` (see :class:`CalibratedConfig`)."""

    allowed_bits = (1, 2, 4)
    head_dims = HeadDims(hadamard=True)  # and a multiple of the sub-vector size (below)

    def validate(self) -> None:
        super().validate()
        if self.head_dim % self.sub_dim or not hadamard_supported(self.head_dim):
            raise ConfigError(
                f"vecinfer: head_dim={self.head_dim} must be a multiple of {self.sub_dim} "
                "with a Hadamard matrix (m * 2**k, m in 1, 12, 20, 28)"
            )

    @property
    def sub_dim(self) -> int:
        return 8 // self.bits

    @property
    def subspaces(self) -> int:
        return self.head_dim // self.sub_dim


@register
class VecInfer(Calibrated):
    method = "vecinfer"
    config_class = VecInferConfig
    family = "smoothing + Hadamard + product VQ (k-means codebooks)"
    needs_calibration = True
    # Untrained (random Gaussian codebooks) on Gaussian vectors; trained codebooks do better.
    round_trip_bound = {1: 0.38, 2: 0.135, 4: 0.023}

    def __init__(self, config: VecInferConfig, tensors: dict[str, mx.array] | None = None):
        """``tensors``: one layer's ``smooth [D]`` and ``centroids [S, 256, D/S]`` (None with
        ``untrained=True``)."""
        super().__init__(config)
        d, n_sub, sub = config.head_dim, config.subspaces, config.sub_dim
        self.hadamard = RandomizedHadamard(d, seed=0)
        a = check_tensors(self.method, config, tensors, ("smooth", "centroids"))
        if a is not None:
            self.smooth, self.centroids = a["smooth"], a["centroids"]
            if tuple(self.centroids.shape) != (n_sub, CODEBOOK_SIZE, sub):
                raise ConfigError(
                    f"vecinfer: artifact codebooks have shape {tuple(self.centroids.shape)}, "
                    f"bits={config.bits} needs {(n_sub, CODEBOOK_SIZE, sub)} (calibrate with "
                    "these bits)"
                )
        else:
            self.smooth = mx.ones((d,))
            key = stream_key(config.seed, "codebook")
            self.centroids = mx.random.normal((n_sub, CODEBOOK_SIZE, sub), key=key)
        self._flat = self.centroids.reshape(n_sub * CODEBOOK_SIZE, sub)
        self.book = VectorCodebook(self.centroids)  # [S, K, sub]
        self._offsets = mx.arange(n_sub, dtype=mx.uint32) * CODEBOOK_SIZE

    def field_layout(self):
        return {"idx": ((self.config.subspaces,), mx.uint8)}

    def _split(self, z: mx.array) -> mx.array:
        """``[..., D]`` -> ``[..., S, D/S]``."""
        return z.reshape(*z.shape[:-1], self.config.subspaces, self.config.sub_dim)

    def _encode(self, x: mx.array) -> Codes:
        z = self._split(self.hadamard.apply(x / self.smooth))  # [..., S, sub]
        return Codes({"idx": self.book.assign(z).astype(mx.uint8)})

    def _decode(self, codes: Codes) -> mx.array:
        idx = codes["idx"].astype(mx.uint32) + self._offsets
        z = mx.take(self._flat, idx, axis=0)  # [..., S, sub]
        z = z.reshape(*z.shape[:-2], self.head_dim)
        return self.hadamard.inverse(z) * self.smooth

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        """``Σ_s LUT[s, idx_s]`` with ``LUT = H(q ⊙ s)_s · centroids[s]`` per query."""
        qz = self._split(self.hadamard.apply(q.astype(mx.float32) * self.smooth))
        lut = (qz[..., None, :] @ mx.swapaxes(self.centroids, -1, -2))[..., 0, :]  # [.., M, S, K]
        *lead, m, n_sub, k = lut.shape
        flat = lut.reshape(*lead, m, n_sub * k)
        idx = codes["idx"].astype(mx.uint32) + self._offsets  # [..., L, S]
        length = idx.shape[-2]
        idx = mx.broadcast_to(idx.reshape(*lead, 1, length * n_sub), (*lead, m, length * n_sub))
        picked = mx.take_along_axis(flat, idx, axis=-1)
        return picked.reshape(*lead, m, length, n_sub).sum(axis=-1)


def fused_vecinfer_attention(
    q: mx.array, keys: CompressedSide, values: CompressedSide, *, scale: float
) -> tuple[mx.array, mx.array] | None:
    """VecInfer keys and values in vq-kernels' product-VQ lookup-table kernel.

    Scores ``H(q ⊙ s_k) · ĉ_k``; the kernel sums ``Σ p ĉ_v`` in the transformed space, and
    ``H⁻¹(·) ⊙ s_v`` maps it back once. None for unequal key/value widths, a table over the
    kernel's ``LUT_FLOATS``, ragged batches (the kernel takes one length), and unless
    :func:`~vq_algorithms._fused.kernel_applies`."""
    kq, vq = keys.quantizer, values.quantizer
    if kq.centroids.shape != vq.centroids.shape or keys.lengths is not None:
        return None
    if kq.config.subspaces * CODEBOOK_SIZE > LUT_FLOATS:
        return None
    if not kernel_applies(kq.head_dim, q.shape[2], PQ_OP):
        return None
    qz = kq.hadamard.apply(q.astype(mx.float32) * kq.smooth)
    out_z, lse = vq_kernels.pq_decode_attention(
        qz, keys.codes["idx"], kq.centroids, values.codes["idx"], vq.centroids,
        scale=scale, length=keys.length,
    )  # fmt: skip
    return vq.hadamard.inverse(out_z) * vq.smooth, lse


register_compressed_attention("vecinfer", "vecinfer", fused_vecinfer_attention)
