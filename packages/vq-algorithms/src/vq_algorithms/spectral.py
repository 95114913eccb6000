"""SpectralQuant: a calibrated PCA rotation with bits allocated by reverse water-filling.

Per layer and per keys/values, calibration (vq-calibrate) measures the mean ``μ [D]`` and
covariance of the vectors and saves ``rotation V [D, D]`` (eigenvectors, descending
eigenvalue) and ``eigenvalues λ [D]``. A vector ``x [D]`` becomes ``y = (x - μ) V``; the
coordinates of ``y`` are decorrelated with variances ``λ_j``. Bits follow reverse
water-filling (Cover & Thomas, *Elements of Information Theory*, §10.3.3: spend bits where
the variance is above the "water level", none below), solved on the real quantizers: starting
from zero, each of the ``bits·D`` bits goes to the coordinate with the largest distortion drop
``λ_j (m(b_j) - m(b_j + 1))``, where ``m(b)`` is the Gaussian Lloyd–Max MSE at ``b`` bits
(``m(0) = 1``). This meets the budget exactly. Coordinates with 0 bits are the noise part
(reconstructed as 0); the rest is the signal part.

Codes: ``norm = ||y||`` (float16) and ``idx`` uint32 ``[..., ceil(bits·D/32)]``: the
``b_j``-bit index of ``u_j = y_j / (norm σ_j)``, ``σ_j² = λ_j / Σλ``, against the
``b_j``-bit Gaussian Lloyd–Max codebook, for the coded coordinates grouped by width
(ascending), each index written least-significant bit first, as one bit stream packed with
``pack(bits=1)``. Bits per element: ``bits + 16/D`` exactly, like ``turboquant_mse``.

``untrained=True`` (and no artifact) asks for the *untrained* neighbour: a random orthogonal
rotation from ``seed`` and a flat spectrum (every coordinate gets ``bits`` bits, μ = 0). It
exists for unit use and tests; with a flat spectrum SpectralQuant is a random-rotation scalar
quantizer. With neither an artifact nor ``untrained=True`` the quantizer is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from vq_algorithms._artifact import Calibrated, CalibratedConfig, check_tensors
from vq_core import (
    FLOAT16_MAX,
    Codes,
    Dense,
    RandomOrthogonal,
    ScalarCodebook,
    lloyd_max,
    pack_stream,
    packed_words,
    register,
    unpack_stream,
)

MAX_BITS = 6  # per coordinate; pack() and the Gaussian Lloyd–Max tables cover 1..6


def allocate_bits(eigenvalues: list[float], bits: int, max_bits: int = MAX_BITS) -> list[int]:
    """Greedy reverse water-filling: ``bits * len(eigenvalues)`` bits, at most ``max_bits``
    per coordinate. Ties go to the lower index, so a flat spectrum gets ``bits`` everywhere."""
    mse = [1.0] + [lloyd_max("gaussian", b).mse for b in range(1, max_bits + 1)]
    lam = [max(float(v), 0.0) for v in eigenvalues]
    alloc = [0] * len(lam)
    for _ in range(bits * len(lam)):
        best, gain = -1, -1.0
        for j, (v, b) in enumerate(zip(lam, alloc, strict=True)):
            if b < max_bits and v * (mse[b] - mse[b + 1]) > gain:
                best, gain = j, v * (mse[b] - mse[b + 1])
        alloc[best] += 1
    return alloc


@dataclass(frozen=True)
class SpectralConfig(CalibratedConfig):
    """Artifact from ``vq calibrate --method spectral`` (see :class:`CalibratedConfig`)."""

    allowed_bits = (1, 2, 3, 4)


@register
class Spectral(Calibrated):
    method = "spectral"
    config_class = SpectralConfig
    family = "calibrated PCA rotation + water-filled scalar codebooks"
    needs_calibration = True
    # Untrained default on Gaussian vectors: Gaussian Lloyd–Max MSE (0.363, 0.118, 0.0345,
    # 0.0095) plus the fp16 norm and sampling margin.
    round_trip_bound = {1: 0.37, 2: 0.122, 3: 0.037, 4: 0.0105}

    def __init__(self, config: SpectralConfig, tensors: dict[str, mx.array] | None = None):
        """``tensors``: one layer's ``rotation [D, D]``, ``eigenvalues [D]``, ``mean [D]``
        (None with ``untrained=True``)."""
        super().__init__(config)
        d = config.head_dim
        a = check_tensors(self.method, config, tensors, ("rotation", "eigenvalues", "mean"))
        if a is not None:
            self.rotation, self.mean = Dense(a["rotation"]), a["mean"]
            lam = a["eigenvalues"].tolist()
        else:
            self.rotation = RandomOrthogonal(d, config.seed)
            self.mean, lam = mx.zeros((d,)), [1.0] * d
        # codes keep ||x - mean|| as float16: refuse what could exceed it (check_finite)
        self.max_norm = FLOAT16_MAX - mx.linalg.norm(self.mean).item()
        self.alloc = allocate_bits(lam, config.bits)
        total = sum(max(v, 0.0) for v in lam) or 1.0
        sigma = [math.sqrt(max(v, 0.0) / total) for v in lam]
        # Coordinates grouped by width: order[w] lists the coordinates coded with w bits.
        self.widths = sorted({b for b in self.alloc if b > 0})
        self.groups = {w: [j for j, b in enumerate(self.alloc) if b == w] for w in self.widths}
        zero = [j for j, b in enumerate(self.alloc) if b == 0]
        order = [j for w in self.widths for j in self.groups[w]] + zero
        self.order = mx.array(order, dtype=mx.uint32)
        self.inverse_order = mx.array(sorted(range(d), key=order.__getitem__), dtype=mx.uint32)
        self.sigma_sorted = mx.array([sigma[j] for j in order], dtype=mx.float32)
        self.n_zero = len(zero)
        self.books = {w: ScalarCodebook.lloyd_max("gaussian", w) for w in self.widths}
        self.signal_dims = d - len(zero)
        self._cols = {
            w: (
                mx.array(self.groups[w], dtype=mx.uint32),
                mx.array([sigma[j] for j in self.groups[w]], dtype=mx.float32),
            )
            for w in self.widths
        }

    def field_layout(self):
        total = sum(self.alloc)
        return {"norm": ((), mx.float16), "idx": ((packed_words(total, 1),), mx.uint32)}

    def _encode(self, x: mx.array) -> Codes:
        y = self.rotation.apply(x - self.mean)
        norm = mx.linalg.norm(y, axis=-1)
        codes = Codes({"norm": norm.astype(mx.float16)})
        safe = mx.maximum(norm, 1e-30)[..., None]
        parts = []
        for w in self.widths:
            cols, sig = self._cols[w]
            parts.append((self.books[w].quantize(mx.take(y, cols, axis=-1) / (safe * sig)), w))
        codes["idx"] = pack_stream(parts)
        return codes

    def _sorted_levels(self, codes: Codes) -> mx.array:
        """Reconstruction of ``y`` in the sorted coordinate order, fp32 ``[..., D]``."""
        layout = [(len(self.groups[w]), w) for w in self.widths]
        parts = [
            self.books[w].dequantize(idx.astype(mx.uint32))
            for w, idx in zip(self.widths, unpack_stream(codes["idx"], layout), strict=True)
        ]
        if self.n_zero:
            parts.append(mx.zeros((*codes["norm"].shape, self.n_zero)))
        y = mx.concatenate(parts, axis=-1) * self.sigma_sorted
        return y * codes["norm"].astype(mx.float32)[..., None]

    def _decode(self, codes: Codes) -> mx.array:
        y = mx.take(self._sorted_levels(codes), self.inverse_order, axis=-1)
        return self.rotation.inverse(y) + self.mean

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        """``(q V)[order] · ŷ_sorted + q·μ``: the query is rotated once, the keys never."""
        q = q.astype(mx.float32)
        q_rot = mx.take(self.rotation.apply(q), self.order, axis=-1)
        s = q_rot @ mx.swapaxes(self._sorted_levels(codes), -1, -2)
        return s + (q @ self.mean)[..., None]

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """``(Σ p_i ŷ_i) V^T + (Σ p_i) μ``, accumulated in the rotated, sorted basis."""
        p = p.astype(mx.float32)
        acc = mx.take(p @ self._sorted_levels(codes), self.inverse_order, axis=-1)
        return self.rotation.inverse(acc) + p.sum(axis=-1, keepdims=True) * self.mean
