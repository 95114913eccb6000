"""The 1-bit Gaussian sketch shared by QJL-style estimators (arXiv 2406.03482, Lemma 3.2).

For a Gaussian ``S [m, d]`` and any ``q, k``:
``E[ sqrt(π/2)/m · ||k|| · <S q, sign(S k)> ] = <q, k>``. The signs are packed 32 per word
(bit = 1 for a non-negative projection). :func:`gaussian_sketch` is the one sketch matrix
of vq (QJL's and turboquant_prod's).
"""

from __future__ import annotations

import math

import mlx.core as mx

from vq_core import pack, packed_words, unpack


def gaussian_sketch(m: int, d: int, key: mx.array, orthogonal: bool = False) -> mx.array:
    """``S [m, d]`` whose rows are each N(0, I_d), drawn from ``key`` (a
    :func:`vq_core.stream_key`); with ``orthogonal``, rows within each block of ``d`` are
    mutually orthogonal (Gram–Schmidt of the Gaussian rows, each then rescaled to its
    Gaussian row's length, which is independent of the direction)."""
    g = mx.random.normal((m, d), key=key)
    if not orthogonal:
        return g
    blocks = []
    for start in range(0, m, d):
        blk = g[start : start + d]  # [b, d], b <= d
        q, r = mx.linalg.qr(blk.T, stream=mx.cpu)  # q [d, b]: Gram–Schmidt of blk's rows
        directions = (q * mx.sign(mx.diagonal(r))[None, :]).T
        blocks.append(directions * mx.linalg.norm(blk, axis=-1, keepdims=True))
    return mx.concatenate(blocks, axis=0)


class SignSketch:
    """Packed signs of ``S x`` for ``S`` = :func:`gaussian_sketch` ``[m, d]`` from ``key``."""

    def __init__(self, dim: int, sketch_dim: int, key: mx.array, orthogonal: bool = False):
        self.dim, self.m = dim, sketch_dim
        self.matrix = gaussian_sketch(sketch_dim, dim, key, orthogonal)
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
