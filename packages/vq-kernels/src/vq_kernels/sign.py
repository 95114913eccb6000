"""AND + popcount scoring of 1-bit codes against a bit-plane query (RaBitQ Sec. 3.3).

RaBitQ's ``binary_query`` scores (vq_algorithms.rabitq) call :func:`sign_dot_planes`: the
kernel on a GPU, its pure-MLX reference on the CPU. Sign code of x [D]: bit j of the packed
row (layout of :mod:`vq_kernels.packing`, b = 1) is 1 iff x_j >= 0. GQA: q's leading dims
flatten to NQ rows of heads, k's to NK, NQ = g * NK, and q row n reads k row n // g (so
[B, Hq] against [B, Hkv] with Hq = g * Hkv works).
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


def sign_dot_planes(
    q_planes: mx.array, k_packed: mx.array, dim: int, *, backend: str | None = None
) -> mx.array:
    """Asymmetric RaBitQ estimator core: sum_j qint_j * kbit_j as int32 [..., Lq, L].

    q_planes uint32 [..., Lq, Bq, W]: plane p holds bit p of the unsigned query integers qint
    (packed with b = 1); k_packed uint32 [..., L, W] 1-bit codes. Computed as
    sum_p 2^p popcount(q_plane_p & k).
    """
    be = resolve_backend(backend, op="sign_dot_planes")
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
