"""When a vq-kernels fused decode kernel applies to a compressed segment.

The kernels (vq_kernels.codebook_decode_attention, affine_decode_attention) are registered
per (key method, value method) in vq_core's compressed-attention table by the method
modules; each implementation returns None (the reference segment runs) unless
:func:`kernel_applies`.
"""

from __future__ import annotations

import functools

import mlx.core as mx

import vq_kernels
from vq_core import CompressedSide
from vq_kernels import _attention
from vq_kernels._attention import MERGE_IN_KERNEL
from vq_kernels.codebook_attention import KERNEL_HEAD_DIMS

MAX_FUSED_ROWS = 32  # query rows per KV head (GQA group x tokens) sent to a decode kernel
# The vq-kernels ops a segment implementation sends work to (kernel_applies' ``op``).
CODEBOOK_OP = "codebook_decode_attention"
AFFINE_OP = "affine_decode_attention"
PQ_OP = "pq_decode_attention"


def kernel_applies(head_dim: int, rows: int, op: str) -> bool:
    """vq-kernels op ``op`` (its name, e.g. ``"codebook_decode_attention"``) runs a kernel
    here, not its reference (a GPU backend, or the "cpu" backend for an op with native CPU
    code: ``vq_kernels.CPU_OPS``), the kernels are built for ``head_dim`` and ``rows`` query
    rows per KV head are a decode step (a prefill chunk runs the tiled reference path)."""
    return (
        vq_kernels.resolve_backend(op=op) != "reference"
        and head_dim in KERNEL_HEAD_DIMS
        and rows <= MAX_FUSED_ROWS
    )


def codebook_keys_with_turboquant_values(
    q_keys: mx.array,
    key_codes: mx.array,
    key_centroids: mx.array,
    key_bits: int,
    keys: CompressedSide,
    values: CompressedSide,
    *,
    scale: float,
    **key_options,
) -> tuple[mx.array, mx.array]:
    """vq-kernels' codebook kernel over keys prepared by their method and TurboQuant-MSE
    values: ``q_keys [B, H, M, D]`` is the query in the keys' basis, ``key_codes`` their
    packed codes (norms from ``keys.codes["norm"]``); returns ``(out [B, H, M, D], lse)``
    with ``out`` rotated back from the values' basis."""
    vc = values.quantizer.rc
    out_rot, lse = vq_kernels.codebook_decode_attention(
        q_keys,
        key_codes,
        keys.codes["norm"],
        key_centroids,
        key_bits,
        values.codes["idx"],
        values.codes["norm"],
        vc.codebook.centroids,
        vc.bits,
        scale=scale,
        **key_options,
        **valid_tokens(keys),
    )
    return vc.rotation.inverse(out_rot), lse


def tail_applies(queries: mx.array, keys, values) -> bool:
    """The one-launch decode applies: CUDA with the in-kernel merge, one query token per
    row, a head_dim the kernel is built for, few enough query rows per KV head, and exact
    tokens in a dtype the kernel reads."""
    _, hq, lq, d = queries.shape
    return (
        lq == 1
        and vq_kernels.resolve_backend() == "cuda"
        and MERGE_IN_KERNEL
        and d in KERNEL_HEAD_DIMS
        and hq // keys.buffer.shape[1] <= MAX_FUSED_ROWS
        and keys.buffer.dtype in (mx.float16, mx.float32)
        and queries.dtype in (mx.float16, mx.float32)
    )


def codebook_decode_with_turboquant_values(
    queries: mx.array,
    key_matrix: mx.array,
    key_codes: mx.array,
    key_centroids: mx.array,
    key_bits: int,
    keys,
    values,
    *,
    scale: float,
    key_term: tuple | None = None,
    **key_options,
) -> mx.array:
    """The whole decode step of a cache in one launch of vq-kernels' codebook kernel:
    ``queries [B, Hq, 1, D]`` against the compressed keys (``q @ key_matrix`` is the query in
    their basis; ``key_codes`` and ``keys.codes["norm"]`` their codes) with TurboQuant-MSE
    values, plus the views' exact sink and recent tokens, centering means and finite flag.
    ``keys``, ``values``: the cache's :class:`~vq_core.attention.CacheView` pair.
    ``key_term``: ``(matrix [D, D], codes, norm, codebook, bits, scale)`` of a second key
    term (``queries @ matrix`` the query in its basis; :class:`vq_kernels.KeyTerm`), or
    None. Returns ``[B, Hq, 1, D]`` in the queries' dtype."""
    vc = values.quantizer.rc
    optional = (key_options.get("k_divisor"), keys.mean, values.mean, keys.finite)
    config = (
        key_bits, vc.bits, float(scale), bool(key_options.get("k_unit", False)),
        tuple(x is not None for x in optional), queries.dtype,
        None if key_term is None else (int(key_term[4]), float(key_term[5])),
    )  # fmt: skip
    arrays = [queries, key_matrix, inverse_matrix(vc.rotation), keys.buffer, values.buffer]
    arrays += [view_counts(keys, queries.shape[0]), key_codes, keys.codes["norm"], key_centroids]
    arrays += [values.codes["idx"], values.codes["norm"], vc.codebook.centroids]
    arrays += [x for x in optional if x is not None]
    arrays += [] if key_term is None else list(key_term[:4])
    return one_launch(_codebook_step, config, queries, keys, arrays)


def view_counts(keys, batch: int) -> mx.array:
    """The one-launch kernels' counts int32 ``[2, B]`` (compressed, exact tokens per row) of
    a :class:`~vq_core.attention.CacheView`: a compiled step's own, else built from ints."""
    if keys.counts is not None:
        return keys.counts
    n_exact = keys.buffer.shape[2] if keys.n_exact is None else keys.n_exact
    return mx.array([[keys.n_comp] * batch, [n_exact] * batch], dtype=mx.int32)


_WARM: set = set()


def one_launch(build, config: tuple, queries: mx.array, keys, arrays: list) -> mx.array:
    """``build(*config)(*arrays)``: a one-launch decode step, compiled (one graph per static
    ``config`` and the kernels' loop switches, ``USE_MMA`` and ``MMA_PREFETCH``, which the
    trace holds) so that a step's Python costs one call whatever the kernel wrapper checks;
    MLX traces again only when a shape changes (the code buffers grow in steps). The kernel
    wrapper evaluates the first launch of each kernel specialization (to report its compile
    time and errors), which a compiled trace cannot: the first call of each (configuration,
    head layout, dtypes) runs uncompiled, the rest compiled."""
    switches = (_attention.USE_MMA, _attention.MMA_PREFETCH)
    layout = (build, config, switches, queries.shape[1:], keys.buffer.shape[1], keys.buffer.dtype)
    step = _compiled(build, config, switches) if layout in _WARM else build(*config)
    _WARM.add(layout)
    return step(*arrays)


@functools.lru_cache(maxsize=256)
def _compiled(build, config: tuple, switches: tuple):
    del switches  # keys the cache: the trace holds the loop the switches chose
    return mx.compile(build(*config))


def _codebook_step(k_bits, v_bits, scale, k_unit, present, dtype, term):
    """The codebook kernel's decode step (:func:`codebook_decode_with_turboquant_values`)."""

    def step(q, mk, mvt, ek, ev, counts, kw, kn, kc, vw, vn, vc, *rest):
        it = iter(rest)
        k_div, k_mean, v_mean, finite = (next(it) if p else None for p in present)
        tail = vq_kernels.DecodeTail(mk, mvt, ek, ev, counts, k_mean, v_mean, finite)
        k_term = None
        if term is not None:  # (bits, scale); then matrix, codes, norm, codebook
            tm, codes, norm, codebook = next(it), next(it), next(it), next(it)
            k_term = vq_kernels.KeyTerm(q @ tm, codes, norm, codebook, *term)
        out, _ = vq_kernels.codebook_decode_attention(
            q, kw, kn, kc, k_bits, vw, vn, vc, v_bits, scale=scale, tail=tail,
            k_divisor=k_div, k_unit=k_unit, k_term=k_term,
        )  # fmt: skip
        return out.astype(dtype)

    return step


@functools.lru_cache(maxsize=4096)
def rotation_matrix(rotation, dtype=mx.float32) -> mx.array:
    """A preconditioner's ``[D, D]`` matrix (``apply(x) = x @ M``) in ``dtype``, built once
    (a decode step's queries are rotated in their own dtype: :func:`query_dtype`)."""
    m = rotation.matrix.astype(dtype)
    mx.eval(m)
    return m


@functools.lru_cache(maxsize=4096)
def inverse_matrix(rotation) -> mx.array:
    """``M.T`` (``inverse(y) = y @ M.T``), contiguous, built once."""
    m = mx.contiguous(rotation_matrix(rotation).T)
    mx.eval(m)
    return m


def query_dtype(queries: mx.array):
    """The dtype a one-launch decode rotates ``queries`` in: float16 queries in float16 (one
    tensor-core GEMM; see :class:`vq_kernels.DecodeTail`), anything else in float32."""
    return mx.float16 if queries.dtype == mx.float16 else mx.float32


def valid_tokens(keys: CompressedSide) -> dict:
    """The kernels' valid-token argument: per-row ``lengths`` if ragged, else ``length``."""
    return {"length": keys.length} if keys.lengths is None else {"lengths": keys.lengths}


@functools.cache
def grid_codebook(bits: int) -> mx.array:
    """Code u -> u - (2^bits - 1) / 2 (RaBitQ's half-integer grid; bits = 1 gives ±1/2)."""
    return mx.arange(1 << bits, dtype=mx.float32) - ((1 << bits) - 1) / 2


@functools.cache
def sign_codebook() -> mx.array:
    """Sign bit -> -1 or +1 (QJL)."""
    return mx.array([-1.0, 1.0], dtype=mx.float32)
