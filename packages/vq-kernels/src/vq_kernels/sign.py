"""XOR + popcount scoring of 1-bit sign codes (QJL, RaBitQ).

Sign code of x [D]: bit j of the packed row (layout of :mod:`vq_kernels.packing`, b = 1) is 1
iff x_j >= 0. GQA: q's leading dims flatten to NQ rows of heads, k's to NK, NQ = g * NK, and
q row n reads k row n // g (so [B, Hq] against [B, Hkv] with Hq = g * Hkv works).
"""

from __future__ import annotations

import mlx.core as mx

from vq_kernels._backend import launch, params, resolve_backend
from vq_kernels.packing import n_words, unpack_bits_reference


def _lead(q: mx.array, k: mx.array, q_tail: int) -> tuple[int, int, int]:
    nq = 1
    for s in q.shape[:-q_tail]:
        nq *= s
    nk = 1
    for s in k.shape[:-2]:
        nk *= s
    if nk == 0 or nq % nk:
        raise ValueError(f"q rows {nq} are not a multiple of k rows {nk}")
    return nq, nk, nq // nk


def _expand(k: mx.array, nq: int, nk: int, g: int) -> mx.array:
    """k [..., L, X] -> [NQ, L, X] with q row n reading k row n // g."""
    kf = k.reshape(nk, *k.shape[-2:])
    return mx.repeat(kf, g, axis=0) if g > 1 else kf


def sign_scores_reference(q_packed: mx.array, k_packed: mx.array, dim: int) -> mx.array:
    """Pure-MLX :func:`sign_scores`."""
    nq, nk, g = _lead(q_packed, k_packed, 2)
    sq = 2 * unpack_bits_reference(q_packed, 1, dim).astype(mx.int32) - 1
    sk = 2 * unpack_bits_reference(k_packed, 1, dim).astype(mx.int32) - 1
    sq = sq.reshape(nq, *sq.shape[-2:]).astype(mx.float32)
    sk = _expand(sk, nq, nk, g).astype(mx.float32)
    out = (sq @ sk.swapaxes(-1, -2)).astype(mx.int32)
    return out.reshape(*q_packed.shape[:-1], k_packed.shape[-2])


def sign_dot_planes_reference(q_planes: mx.array, k_packed: mx.array, dim: int) -> mx.array:
    """Pure-MLX :func:`sign_dot_planes`."""
    nq, nk, g = _lead(q_planes, k_packed, 3)
    bq = q_planes.shape[-2]
    planes = unpack_bits_reference(q_planes, 1, dim).astype(mx.int32)  # [..., Lq, Bq, dim]
    qint = mx.sum(planes << mx.arange(bq, dtype=mx.int32)[:, None], axis=-2)
    kb = _expand(unpack_bits_reference(k_packed, 1, dim).astype(mx.int32), nq, nk, g)
    qint = qint.reshape(nq, *qint.shape[-2:]).astype(mx.float32)
    # exact: every partial sum is an integer below 2**24 for Bq <= 8 and dim <= 65536
    out = (qint @ kb.astype(mx.float32).swapaxes(-1, -2)).astype(mx.int32)
    return out.reshape(*q_planes.shape[:-2], k_packed.shape[-2])


def sign_scores(
    q_packed: mx.array, k_packed: mx.array, dim: int, *, backend: str | None = None
) -> mx.array:
    """Sign agreement of 1-bit codes: q uint32 [..., Lq, W], k uint32 [..., L, W] -> int32.

    out [..., Lq, L] = sum_j s_q,j s_k,j with s in {-1, +1}, i.e. dim - 2 popcount(q xor k);
    W = ceil(dim / 32).
    """
    be = resolve_backend(backend)
    if be == "reference":
        return sign_scores_reference(q_packed, k_packed, dim)
    nq, nk, g = _lead(q_packed, k_packed, 2)
    lq, w = q_packed.shape[-2:]
    length = k_packed.shape[-2]
    if w != n_words(dim, 1) or k_packed.shape[-1] != w:
        raise ValueError(f"dim {dim} needs {n_words(dim, 1)} words per row")
    (out,) = launch(
        "sign_scores",
        be,
        [
            q_packed.reshape(nq, lq, w),
            k_packed.reshape(nk, length, w),
            params(nq, lq, length, w, g, dim),
        ],
        template=[],
        grid=(max(nq * lq * length, 1), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(nq, lq, length)],
        output_dtypes=[mx.int32],
    )
    return out.reshape(*q_packed.shape[:-1], length)


def sign_dot_planes(
    q_planes: mx.array, k_packed: mx.array, dim: int, *, backend: str | None = None
) -> mx.array:
    """Asymmetric RaBitQ estimator core: sum_j qint_j * kbit_j as int32 [..., Lq, L].

    q_planes uint32 [..., Lq, Bq, W]: plane p holds bit p of the unsigned query integers qint
    (packed with b = 1); k_packed uint32 [..., L, W] 1-bit codes. Computed as
    sum_p 2^p popcount(q_plane_p & k).
    """
    be = resolve_backend(backend)
    if be == "reference":
        return sign_dot_planes_reference(q_planes, k_packed, dim)
    nq, nk, g = _lead(q_planes, k_packed, 3)
    lq, bq, w = q_planes.shape[-3:]
    length = k_packed.shape[-2]
    if w != n_words(dim, 1) or k_packed.shape[-1] != w:
        raise ValueError(f"dim {dim} needs {n_words(dim, 1)} words per row")
    (out,) = launch(
        "sign_dot_planes",
        be,
        [
            q_planes.reshape(nq, lq, bq, w),
            k_packed.reshape(nk, length, w),
            params(nq, lq, length, w, g, bq),
        ],
        template=[],
        grid=(max(nq * lq * length, 1), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(nq, lq, length)],
        output_dtypes=[mx.int32],
    )
    return out.reshape(*q_planes.shape[:-3], lq, length)
