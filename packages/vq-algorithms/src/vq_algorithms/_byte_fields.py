"""Reading packed code streams a byte at a time (faster on the CPU than word unpacking)."""

from __future__ import annotations

import mlx.core as mx


def pad_last(x: mx.array, size: int) -> mx.array:
    """Zero-pad the last axis of ``x`` to ``size`` (no-op when it is long enough)."""
    extra = size - x.shape[-1]
    return x if extra <= 0 else mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def twelve_bit_fields(stream: mx.array, n: int) -> mx.array:
    """``n`` 12-bit fields (uint16 ``[..., n]``) of a little-endian stream held as uint32
    words or bytes: every 3 bytes hold two fields (vq-core's packing layout)."""
    pairs = -(-n // 2)
    b = pad_last(stream.view(mx.uint8)[..., : 3 * pairs], 3 * pairs).astype(mx.uint16)
    b = b.reshape(*b.shape[:-1], pairs, 3)
    lo = b[..., 0] | ((b[..., 1] & 0xF) << 8)
    hi = (b[..., 1] >> 4) | (b[..., 2] << 4)
    fields = mx.stack([lo, hi], axis=-1).reshape(*stream.shape[:-1], 2 * pairs)
    return fields if 2 * pairs == n else fields[..., :n]
