"""One sequence's cache content (:class:`CacheRow`), and the helpers that pack rows into a
batch's arrays: what passes between :class:`~vq_core.CompressedKVCache` and
:class:`~vq_core.BatchCompressedKVCache` when mlx-lm merges or extracts sequences."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from vq_core.quantizer import Codes


@dataclass
class CacheRow:
    """One sequence's content, arrays ``[1, H, n, D]`` (None when that part is empty).

    ``sink``/``exact``: (keys, values) exact; ``codes``: (key, value) :class:`Codes` of the
    ``n_comp`` compressed tokens; ``mean``: (key mean, value mean) ``[1, H, 1, D]`` float32
    or None; ``finite``: lazy bool scalar or None; ``dtype``: of the exact tokens.
    """

    sink: tuple[mx.array, mx.array] | None
    codes: tuple[Codes, Codes] | None
    n_comp: int
    exact: tuple[mx.array, mx.array] | None
    mean: tuple[mx.array | None, mx.array | None]
    finite: mx.array | None
    dtype: mx.Dtype


def map_pair(pair, fn):
    """``fn`` applied to both sides of a (keys, values) pair; None stays None."""
    return None if pair is None else tuple(None if a is None else fn(a) for a in pair)


def pair_cat(pair, new):
    return tuple(mx.concatenate([a, b], axis=2) for a, b in zip(pair, new, strict=True))


def copy_arrays(value):
    """A fresh copy of arrays (also inside tuples and Codes); other values as they are."""
    if isinstance(value, mx.array):
        return mx.array(value)
    if isinstance(value, Codes):
        return value.map(lambda _, a: mx.array(a))
    if isinstance(value, tuple):
        return tuple(copy_arrays(v) for v in value)
    if isinstance(value, list):
        return list(value)
    return value


def copied(row: CacheRow) -> CacheRow:
    """``row`` with every array copied (so no buffer of the batch stays referenced)."""
    return CacheRow(
        copy_arrays(row.sink),
        copy_arrays(row.codes),
        row.n_comp,
        copy_arrays(row.exact),
        copy_arrays(row.mean),
        row.finite,
        row.dtype,
    )


def stack_rows(pairs, width: int, hd: tuple[int, int], dtype, *, left: bool):
    """(keys, values) ``[B, H, width, D]`` from per-row pairs ``[1, H, n_b, D]`` (or None),
    each row left-aligned (``left``) or right-aligned, zero padding elsewhere."""
    h, d = hd
    out = ([], [])
    for pair in pairs:
        for side in (0, 1):
            a = None if pair is None else pair[side].astype(dtype)
            n = 0 if a is None else a.shape[2]
            pad = mx.zeros((1, h, width - n, d), dtype=dtype)
            parts = [pad] if a is None else ([a, pad] if left else [pad, a])
            out[side].append(mx.concatenate(parts, axis=2) if len(parts) > 1 else parts[0])
    return tuple(mx.concatenate(rows, axis=0) for rows in out)
