"""Scalar-codebook codes (TurboQuant MSE style), used for keys and values.

The caller rotates x first (y = R x, R orthogonal). The code of y [D] is ``norm = ||y||_2``
(float16) and ``idx_j = argmin_k |y_j / norm - c_k|`` for a sorted fp32 codebook c of 2**bits
entries, packed with :mod:`vq_kernels.packing` into uint32 [ceil(D*bits/32)]. Reconstruction in
the rotated basis: y_hat_j = norm * c[idx_j]. A zero vector has norm 0 and codes of v = 0.
"""

from __future__ import annotations

import mlx.core as mx

from vq_kernels._backend import launch, params, resolve_backend
from vq_kernels.packing import n_words, pack_bits_reference, unpack_bits_reference

CODEBOOK_BITS = (1, 2, 3, 4)


def _check(centroids: mx.array, bits: int) -> None:
    if bits not in CODEBOOK_BITS:
        raise ValueError(f"codebook bits must be one of {CODEBOOK_BITS}, got {bits}")
    if centroids.shape != (1 << bits,):
        raise ValueError(f"centroids must have shape ({1 << bits},), got {centroids.shape}")


def _rows(shape: tuple[int, ...]) -> int:
    rows = 1
    for s in shape:
        rows *= s
    return rows


def codebook_quantize_reference(
    y: mx.array, centroids: mx.array, bits: int
) -> tuple[mx.array, mx.array]:
    """Pure-MLX :func:`codebook_quantize`."""
    _check(centroids, bits)
    y = y.astype(mx.float32)
    norm = mx.sqrt(mx.sum(y * y, axis=-1, keepdims=True))
    v = mx.where(norm > 0, y / mx.where(norm > 0, norm, 1.0), 0.0)
    idx = mx.argmin(mx.abs(v[..., None] - centroids.astype(mx.float32)), axis=-1)
    return pack_bits_reference(idx, bits), norm[..., 0].astype(mx.float16)


def codebook_dequantize_reference(
    packed: mx.array, norm: mx.array, centroids: mx.array, bits: int, dim: int
) -> mx.array:
    """Pure-MLX :func:`codebook_dequantize`."""
    _check(centroids, bits)
    idx = unpack_bits_reference(packed, bits, dim)
    return norm.astype(mx.float32)[..., None] * centroids.astype(mx.float32)[idx]


def codebook_quantize(
    y: mx.array, centroids: mx.array, bits: int, *, backend: str | None = None
) -> tuple[mx.array, mx.array]:
    """Quantize rotated vectors y [..., D] against a sorted codebook centroids [2**bits].

    Returns ``(packed, norm)``: packed uint32 [..., ceil(D*bits/32)], norm float16 [...].
    bits in {1, 2, 3, 4}.
    """
    be = resolve_backend(backend, op="codebook_quantize")
    if be == "reference":
        return codebook_quantize_reference(y, centroids, bits)
    _check(centroids, bits)
    *lead, d = y.shape
    rows, w = _rows(tuple(lead)), n_words(d, bits)
    packed, norm = launch(
        "codebook_quantize",
        be,
        [
            y.astype(mx.float32).reshape(rows, d),
            centroids.astype(mx.float32),
            params(rows),
        ],
        template=[("D", d), ("BITS", bits)],
        grid=(max(rows, 1), 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(rows, w), (rows,)],
        output_dtypes=[mx.uint32, mx.float16],
    )
    return packed.reshape(*lead, w), norm.reshape(*lead)


def codebook_dequantize(
    packed: mx.array,
    norm: mx.array,
    centroids: mx.array,
    bits: int,
    dim: int,
    *,
    backend: str | None = None,
) -> mx.array:
    """Reconstruct in the rotated basis: packed [..., W], norm [...] -> fp32 [..., dim]."""
    be = resolve_backend(backend, op="codebook_dequantize")
    if be == "reference":
        return codebook_dequantize_reference(packed, norm, centroids, bits, dim)
    _check(centroids, bits)
    *lead, w = packed.shape
    if w != n_words(dim, bits):
        raise ValueError(f"dim {dim} at {bits} bits needs {n_words(dim, bits)} words, got {w}")
    rows = _rows(tuple(lead))
    (out,) = launch(
        "codebook_dequantize",
        be,
        [
            packed.astype(mx.uint32).reshape(rows, w),
            norm.astype(mx.float16).reshape(rows),
            centroids.astype(mx.float32),
            params(rows),
        ],
        template=[("D", dim), ("BITS", bits)],
        grid=(max(rows * dim, 1), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(rows, dim)],
        output_dtypes=[mx.float32],
    )
    return out.reshape(*lead, dim)
