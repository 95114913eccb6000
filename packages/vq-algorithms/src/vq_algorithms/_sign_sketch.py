"""The 1-bit Gaussian sketch shared by QJL-style estimators (arXiv 2406.03482, Lemma 3.2).

For a Gaussian ``S [m, d]`` and any ``q, k``:
``E[ sqrt(π/2)/m · ||k|| · <S q, sign(S k)> ] = <q, k>``. The signs are packed 32 per word
(bit = 1 for a non-negative projection).
"""

from __future__ import annotations

import math

import mlx.core as mx

from vq_core import pack, packed_words, unpack


class SignSketch:
    """``S [m, d]`` drawn from ``seed``; optional orthogonalized rows (blocks of d)."""

    def __init__(self, dim: int, sketch_dim: int, seed: int, orthogonal: bool = False):
        self.dim, self.m = dim, sketch_dim
        key = mx.random.key(seed)
        s = mx.random.normal((sketch_dim, dim), key=key)
        if orthogonal:
            blocks = []
            for i in range(0, sketch_dim, dim):
                g = s[i : i + dim]
                q, _ = mx.linalg.qr(g.T, stream=mx.cpu)  # [d, rows], orthonormal columns
                rows = q.T[: g.shape[0]]
                blocks.append(rows * math.sqrt(dim))  # keep E||row||² = d like a Gaussian row
            s = mx.concatenate(blocks, axis=0)
        self.matrix = s
        self.scale = math.sqrt(math.pi / 2) / sketch_dim

    @property
    def words(self) -> int:
        return packed_words(self.m, 1)

    def signs(self, x: mx.array) -> mx.array:
        """``x [..., d]`` -> packed sign bits uint32 ``[..., ceil(m/32)]``."""
        return pack((x @ self.matrix.T >= 0).astype(mx.uint32), 1)

    def pm_one(self, packed: mx.array) -> mx.array:
        """Packed signs -> ±1 float32 ``[..., m]``."""
        return unpack(packed, 1, self.m).astype(mx.float32) * 2 - 1

    def project(self, q: mx.array) -> mx.array:
        """``q [..., d]`` -> ``S q`` ``[..., m]``."""
        return q.astype(mx.float32) @ self.matrix.T

    def reconstruct(self, packed: mx.array, norm: mx.array) -> mx.array:
        """Unbiased estimate ``sqrt(π/2)/m · norm · S^T sign`` of the sketched vector."""
        return (self.pm_one(packed) @ self.matrix) * (self.scale * norm[..., None])
