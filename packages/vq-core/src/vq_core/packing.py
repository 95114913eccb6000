"""Bit packing of b-bit codes into uint32 words along the last axis.

Layout (the same in every vq package and kernel): the codes ``c_0 .. c_{n-1}`` of one row
form a little-endian bit stream. Code ``i`` occupies stream bits ``[i*b, i*b + b)``; stream
bit ``s`` lives in word ``s // 32`` at bit position ``s % 32`` (bit 0 is the least
significant). A row of ``n`` codes takes ``ceil(n*b / 32)`` words, so 3-bit codes cost 3
bits, not 4; for b in {3, 5, 6} a code may straddle two words. Unused high bits of the last
word are zero.

Example, b=3: codes 0..10 fill word 0 bits 0..29, code 10 puts its low 2 bits at word 0
bits 30..31 and its high bit at word 1 bit 0.

:func:`pack_stream` / :func:`unpack_stream` put groups of codes of different widths (any
1..16) one after another in one such stream: group ``g`` starts at bit ``Σ_{h<g} n_h b_h``
and each of its codes is written least-significant bit first, as above.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from vq_core.errors import DTypeError, ShapeError, invalid

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)


def packed_words(n: int, bits: int) -> int:
    """Number of uint32 words holding ``n`` codes of ``bits`` bits."""
    _check_bits(bits)
    return -(-n * bits // 32)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise invalid("bits", bits, f"one of {SUPPORTED_BITS}")


@cache
def _group_layout(bits: int) -> tuple[tuple[tuple[int, int], ...], mx.array, mx.array, ...]:
    """Static tables for one group of 32 codes, which fills exactly ``bits`` words.

    Returns per word the code range ``[j0, j1)`` whose low parts start in it, plus for
    unpacking: the word of each code's start, its bit offset, and a spill mask.
    """
    ranges = []
    for w in range(bits):
        j0 = -(-32 * w // bits)
        j1 = -(-32 * (w + 1) // bits)
        ranges.append((j0, min(j1, 32)))
    start = [j * bits for j in range(32)]
    word = mx.array([s // 32 for s in start], dtype=mx.uint32)
    offset = mx.array([s % 32 for s in start], dtype=mx.uint32)
    spills = [(s % 32) + bits > 32 for s in start]
    spill = mx.array([1 if f else 0 for f in spills], dtype=mx.uint32)
    hi_word = mx.array([min(s // 32 + 1, bits - 1) for s in start], dtype=mx.uint32)
    hi_shift = mx.array(
        [(32 - s % 32) if f else 0 for s, f in zip(start, spills, strict=False)], mx.uint32
    )
    return tuple(ranges), word, offset, spill, hi_word, hi_shift


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack integer codes ``[..., n]`` (values < 2**bits) into uint32 ``[..., ceil(n*bits/32)]``."""
    _check_bits(bits)
    if not mx.issubdtype(codes.dtype, mx.integer):
        raise DTypeError(f"codes must be an integer array, got dtype {codes.dtype}")
    if codes.ndim == 0:
        raise ShapeError("codes must have at least one dimension")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    groups = -(-n // 32)
    c = codes.astype(mx.uint32)
    if groups * 32 != n:
        c = mx.pad(c, [(0, 0)] * len(lead) + [(0, groups * 32 - n)])
    c = c.reshape(*lead, groups, 32)
    ranges, _, offset, spill, _, hi_shift = _group_layout(bits)
    low = mx.left_shift(c, offset)
    high = mx.right_shift(c, hi_shift) * spill
    words = []
    for w, (j0, j1) in enumerate(ranges):
        word = low[..., j0:j1].sum(axis=-1)
        if w > 0 and (32 * w) % bits:  # the previous word's last code spills into this one
            word = word + high[..., j0 - 1]
        words.append(word)
    out = mx.stack(words, axis=-1).astype(mx.uint32).reshape(*lead, groups * bits)
    return out[..., : packed_words(n, bits)]


def unpack(words: mx.array, bits: int, n: int) -> mx.array:
    """Unpack uint32 ``[..., ceil(n*bits/32)]`` into uint32 codes ``[..., n]``."""
    _check_bits(bits)
    return _unpack(words, bits, n)


def unpack_fields(words: mx.array, width: int, n: int) -> mx.array:
    """Read a packed stream as ``n`` fields of ``width`` bits (1–16), uint32 ``[..., n]``.

    A field of width ``G*b`` holds ``G`` consecutive ``b``-bit codes, lowest first, so a
    decoder can look whole groups of codes up in one table (see vq-algorithms). The stream
    must hold exactly ``n * width`` bits, rounded up to whole words.
    """
    if not isinstance(width, int) or not 1 <= width <= 16:
        raise ShapeError(f"width={width!r} is not allowed; expected 1..16")
    return _unpack(words, width, n)


def _unpack(words: mx.array, bits: int, n: int) -> mx.array:
    if words.dtype != mx.uint32:
        raise DTypeError(f"packed words must be uint32, got {words.dtype}")
    need = -(-n * bits // 32)
    if words.shape[-1] != need:
        raise ShapeError(f"{n} codes of {bits} bits take {need} words, got {words.shape[-1]}")
    lead = words.shape[:-1]
    groups = -(-n // 32)
    if groups * bits != need:
        words = mx.pad(words, [(0, 0)] * len(lead) + [(0, groups * bits - need)])
    g = words.reshape(*lead, groups, bits)
    _, word, offset, spill, hi_word, hi_shift = _group_layout(bits)
    lo = mx.right_shift(mx.take(g, word, axis=-1), offset)
    hi = mx.left_shift(mx.take(g, hi_word, axis=-1), hi_shift) * spill
    mask = mx.array((1 << bits) - 1, dtype=mx.uint32)
    codes = mx.bitwise_and(mx.bitwise_or(lo, hi), mask)
    return codes.reshape(*lead, groups * 32)[..., :n]


def pack_stream(parts: list[tuple[mx.array, int]]) -> mx.array:
    """Groups ``(codes [..., n_g], bits_g)`` (same leading shape, ``bits_g`` in 1..16) as one
    bit stream, uint32 ``[..., ceil(Σ n_g bits_g / 32)]``."""
    if not parts:
        raise ShapeError("pack_stream needs at least one group of codes")
    stream = []
    for codes, bits in parts:
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise invalid("bits", bits, "an integer in 1..16")
        c = codes.astype(mx.uint32)
        b = mx.right_shift(c[..., None], mx.arange(bits, dtype=mx.uint32)) & 1
        stream.append(b.reshape(*c.shape[:-1], -1))
    return pack(mx.concatenate(stream, axis=-1), 1)


def unpack_stream(words: mx.array, layout: list[tuple[int, int]]) -> list[mx.array]:
    """The groups of :func:`pack_stream` back: ``layout`` lists ``(n_g, bits_g)``; uint32
    codes ``[..., n_g]`` per group."""
    total = sum(n * b for n, b in layout)
    bits = unpack(words, 1, total)
    out, start = [], 0
    for n, b in layout:
        chunk = bits[..., start : start + n * b].reshape(*bits.shape[:-1], n, b)
        out.append(mx.left_shift(chunk, mx.arange(b, dtype=mx.uint32)).sum(axis=-1))
        start += n * b
    return out
