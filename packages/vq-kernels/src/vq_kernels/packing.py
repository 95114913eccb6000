"""Bit packing of b-bit codes into little-endian uint32 streams.

Layout (fixed): codes c_0..c_{n-1} of ``bits`` bits along the last axis form one bit stream;
code i occupies stream bits [i*b, i*b + b); stream bit s is bit ``s % 32`` (bit 0 = LSB) of
uint32 word ``s // 32``. A row holds ``ceil(n*b/32)`` words; for b in {3, 5, 6} a code may
straddle two words; unused high bits of the last word are 0.
"""

from __future__ import annotations

import mlx.core as mx

from vq_kernels._backend import launch, params, resolve_backend

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)


def n_words(n: int, bits: int) -> int:
    """Number of uint32 words holding ``n`` codes of ``bits`` bits."""
    return (n * bits + 31) // 32


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack_bits_reference(codes: mx.array, bits: int) -> mx.array:
    """Pure-MLX :func:`pack_bits`: codes [..., n] (any int dtype) -> uint32 [..., W]."""
    _check_bits(bits)
    *lead, n = codes.shape
    w = n_words(n, bits)
    c = codes.astype(mx.uint32) & ((1 << bits) - 1)
    stream = (c[..., None] >> mx.arange(bits, dtype=mx.uint32)) & 1
    stream = stream.reshape(*lead, n * bits)
    pad = w * 32 - n * bits
    if pad:
        stream = mx.concatenate([stream, mx.zeros((*lead, pad), dtype=mx.uint32)], axis=-1)
    stream = stream.reshape(*lead, w, 32) << mx.arange(32, dtype=mx.uint32)
    return mx.sum(stream, axis=-1).astype(mx.uint32)


def unpack_bits_reference(words: mx.array, bits: int, n: int) -> mx.array:
    """Pure-MLX :func:`unpack_bits`: uint32 [..., W] -> uint32 codes [..., n]."""
    _check_bits(bits)
    *lead, w = words.shape
    if w != n_words(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {n_words(n, bits)} words, got {w}")
    stream = (words[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1
    stream = stream.reshape(*lead, w * 32)[..., : n * bits].reshape(*lead, n, bits)
    return mx.sum(stream << mx.arange(bits, dtype=mx.uint32), axis=-1).astype(mx.uint32)


def pack_bits(codes: mx.array, bits: int, *, backend: str | None = None) -> mx.array:
    """Pack codes [..., n] (values < 2**bits, any int dtype) into uint32 words [..., W].

    W = ceil(n * bits / 32); bits in {1, 2, 3, 4, 5, 6, 8}; layout in the module docstring.
    """
    _check_bits(bits)
    be = resolve_backend(backend, op="pack_bits")
    if be == "reference":
        return pack_bits_reference(codes, bits)
    *lead, n = codes.shape
    rows = 1
    for s in lead:
        rows *= s
    w = n_words(n, bits)
    (out,) = launch(
        "pack_bits",
        be,
        [codes.astype(mx.uint32).reshape(rows, n), params(rows, n)],
        template=[("BITS", bits)],
        grid=(max(rows * w, 1), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(rows, w)],
        output_dtypes=[mx.uint32],
    )
    return out.reshape(*lead, w)


def unpack_bits(words: mx.array, bits: int, n: int, *, backend: str | None = None) -> mx.array:
    """Unpack uint32 words [..., W] into ``n`` codes per row: uint32 [..., n]."""
    _check_bits(bits)
    be = resolve_backend(backend, op="unpack_bits")
    if be == "reference":
        return unpack_bits_reference(words, bits, n)
    *lead, w = words.shape
    if w != n_words(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {n_words(n, bits)} words, got {w}")
    rows = 1
    for s in lead:
        rows *= s
    (out,) = launch(
        "unpack_bits",
        be,
        [words.astype(mx.uint32).reshape(rows, w), params(rows, n)],
        template=[("BITS", bits)],
        grid=(max(rows * n, 1), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(rows, n)],
        output_dtypes=[mx.uint32],
    )
    return out.reshape(*lead, n)
