"""Scalar Lloyd–Max codebooks and vector (centroid) codebooks.

Scalar codebooks are optimal 2**b-level quantizers (Lloyd 1982, Max 1960) for

* ``"gaussian"``: the standard normal N(0, 1) (closed-form cell moments), and
* ``"sphere"``: one coordinate of a uniformly random unit vector in dimension ``d``, whose
  density is ``Γ(d/2) / (√π Γ((d-1)/2)) · (1 - x²)^((d-3)/2)`` on [-1, 1]
  (TurboQuant, arXiv 2504.19874, Lemma 1). After a random rotation every coordinate of a
  unit vector follows it, which is why rotate-then-quantize works without calibration.

They are computed once per (distribution, d, bits) in pure Python (no numpy) and cached.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cache

import mlx.core as mx

from vq_core.errors import ShapeError, invalid

SCALAR_BITS = (1, 2, 3, 4, 5, 6, 8)
DISTRIBUTIONS = ("gaussian", "sphere")


@dataclass(frozen=True)
class LloydMax:
    """A solved scalar quantizer: sorted ``centroids``, ``boundaries`` between them, ``mse``.

    ``mse`` is the expected squared error of one coordinate under the distribution.
    """

    distribution: str
    dim: int
    bits: int
    centroids: tuple[float, ...]
    boundaries: tuple[float, ...]
    mse: float


class _Moments:
    """Cell mass and first/second moments of a density on an interval."""

    def __init__(self, distribution: str, dim: int, grid: int = 1 << 16):
        self.gaussian = distribution == "gaussian"
        if self.gaussian:
            self.lo, self.hi = -12.0, 12.0
            return
        # Midpoint grid over the support, trimmed to 12 standard deviations (sd = 1/sqrt(d)).
        half = min(1.0, 12.0 / math.sqrt(dim))
        self.lo, self.hi = -half, half
        step = 2 * half / grid
        self.x = [self.lo + (i + 0.5) * step for i in range(grid)]
        expo = (dim - 3) / 2
        w = [(1.0 - v * v) ** expo for v in self.x]
        total = math.fsum(w)
        self.p0, self.p1, self.p2 = [0.0], [0.0], [0.0]
        a0 = a1 = a2 = 0.0
        for v, wi in zip(self.x, w, strict=False):
            wi /= total
            a0 += wi
            a1 += wi * v
            a2 += wi * v * v
            self.p0.append(a0)
            self.p1.append(a1)
            self.p2.append(a2)

    def cell(self, a: float, b: float) -> tuple[float, float, float]:
        """(mass, ∫x, ∫x²) of the density over [a, b]."""
        if self.gaussian:
            return _gauss_moments(a, b)
        i = bisect.bisect_left(self.x, a)
        j = bisect.bisect_left(self.x, b)
        return (self.p0[j] - self.p0[i], self.p1[j] - self.p1[i], self.p2[j] - self.p2[i])


def _gauss_moments(a: float, b: float) -> tuple[float, float, float]:
    def cdf(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def pdf(x: float) -> float:
        return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    mass = cdf(b) - cdf(a)
    first = pdf(a) - pdf(b)
    second = mass + a * pdf(a) - b * pdf(b)
    return mass, first, second


@cache
def lloyd_max(distribution: str, bits: int, dim: int = 0) -> LloydMax:
    """Solve the Lloyd–Max quantizer with ``2**bits`` levels (cached).

    Args:
        distribution: ``"gaussian"`` or ``"sphere"`` (coordinate of a unit vector in ``dim``).
        bits: 1–6 or 8.
        dim: the sphere's dimension (>= 3); ignored for ``"gaussian"``.
    """
    if distribution not in DISTRIBUTIONS:
        raise invalid("distribution", distribution, f"one of {DISTRIBUTIONS}")
    if bits not in SCALAR_BITS:
        raise invalid("bits", bits, f"one of {SCALAR_BITS}")
    if distribution == "sphere" and (not isinstance(dim, int) or dim < 3):
        raise invalid("dim", dim, "an integer >= 3 for the sphere distribution")
    moments = _Moments(distribution, dim)
    levels = 1 << bits
    scale = 1.0 if distribution == "gaussian" else 1.0 / math.sqrt(dim)
    # Start from a uniform spread over +-3 sd, then iterate centroid/threshold updates.
    cents = [scale * 3.0 * (2 * k + 1 - levels) / levels for k in range(levels)]
    for _ in range(5000):
        bounds = [0.5 * (cents[k] + cents[k + 1]) for k in range(levels - 1)]
        edges = [moments.lo, *bounds, moments.hi]
        new = []
        for k in range(levels):
            mass, first, _ = moments.cell(edges[k], edges[k + 1])
            new.append(first / mass if mass > 1e-300 else cents[k])
        shift = max(abs(u - v) for u, v in zip(new, cents, strict=False))
        cents = new
        if shift < 1e-13 * scale:
            break
    bounds = [0.5 * (cents[k] + cents[k + 1]) for k in range(levels - 1)]
    edges = [moments.lo, *bounds, moments.hi]
    mse = 0.0
    for k in range(levels):
        mass, first, second = moments.cell(edges[k], edges[k + 1])
        mse += second - 2 * cents[k] * first + cents[k] * cents[k] * mass
    return LloydMax(distribution, dim, bits, tuple(cents), tuple(bounds), mse)


class ScalarCodebook:
    """A sorted scalar codebook ``centroids [K]`` with nearest-level assignment.

    ``quantize(x [...]) -> uint32 [...]`` and ``dequantize(idx [...]) -> float32 [...]``.
    """

    def __init__(self, centroids: list[float] | tuple[float, ...] | mx.array):
        c = mx.array(centroids, dtype=mx.float32)
        if c.ndim != 1 or c.shape[0] < 2:
            raise ShapeError(f"scalar codebook needs a 1-D array of >= 2 levels, got {c.shape}")
        self.centroids = c
        self.boundaries = 0.5 * (c[1:] + c[:-1])

    @classmethod
    def lloyd_max(cls, distribution: str, bits: int, dim: int = 0) -> ScalarCodebook:
        return cls(lloyd_max(distribution, bits, dim).centroids)

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    def quantize(self, x: mx.array) -> mx.array:
        """Index of the nearest level for every element (ties go to the upper level)."""
        return (x[..., None] >= self.boundaries).sum(axis=-1).astype(mx.uint32)

    def dequantize(self, idx: mx.array) -> mx.array:
        return self.centroids[idx]


class VectorCodebook:
    """Centroids ``[K, sub_dim]``, or one codebook per subspace ``[S, K, sub_dim]`` (product
    VQ), with nearest-centroid (squared Euclidean) assignment: the one nearest-centroid
    search of vq (VecInfer's product codebooks use it)."""

    def __init__(self, centroids: mx.array):
        if centroids.ndim not in (2, 3):
            raise ShapeError(
                f"vector codebook needs centroids [K, sub_dim] or [S, K, sub_dim], got "
                f"{centroids.shape}"
            )
        self.centroids = centroids.astype(mx.float32)
        self._sq = (self.centroids * self.centroids).sum(axis=-1)  # [K] or [S, K]

    @property
    def size(self) -> int:
        return self.centroids.shape[-2]

    @property
    def sub_dim(self) -> int:
        return self.centroids.shape[-1]

    def assign(self, x: mx.array) -> mx.array:
        """``x [..., sub_dim]`` (``[..., S, sub_dim]`` for per-subspace codebooks) -> uint32
        ``[...]`` (``[..., S]``) index of the nearest centroid, by ``argmin_k ||c_k||² -
        2 x·c_k``."""
        if x.shape[-1] != self.sub_dim:
            raise ShapeError(f"expected last dimension {self.sub_dim}, got {x.shape[-1]}")
        if self.centroids.ndim == 3 and (x.ndim < 2 or x.shape[-2] != self.centroids.shape[0]):
            raise ShapeError(f"expected [..., {self.centroids.shape[0]}, {self.sub_dim}] vectors")
        x = x.astype(mx.float32)
        c = self.centroids if self.centroids.ndim == 3 else self.centroids[None]
        x3 = x if self.centroids.ndim == 3 else x[..., None, :]
        dots = (x3[..., None, :] @ mx.swapaxes(c, -1, -2))[..., 0, :]  # [..., S, K]
        sq = self._sq if self.centroids.ndim == 3 else self._sq[None]
        idx = mx.argmin(sq - 2 * dots, axis=-1).astype(mx.uint32)
        return idx if self.centroids.ndim == 3 else idx[..., 0]

    def lookup(self, idx: mx.array) -> mx.array:
        """``idx [...]`` -> ``[..., sub_dim]`` (2-D codebooks)."""
        return self.centroids[idx]
