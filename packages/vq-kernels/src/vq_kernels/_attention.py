"""Pieces shared by the decode-attention ops: shape checks, the split plan, the partials
reduce kernel and the exact softmax-attention reference that every op's reference ends in.

Flash-decoding: the ``length`` valid tokens of each KV head are cut into S splits of
``chunk`` tokens; one thread group per (split, kv head, row tile) writes base-2 partials
(running max m, sum l, unnormalized output), and ``attn_reduce`` merges them per query row.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import mlx.core as mx

from vq_kernels._backend import launch, params

TOKENS_PER_STEP = 128  # tokens a thread group of pq_attn_partial consumes per loop step
TARGET_GROUPS = 264  # two thread groups per SM of an H100/H200: measured faster than four
LOG2E = 1.4426950408889634
MAX_ROW_TILE = 4  # query rows per thread group (codebook_attn: 128 registers at 4; 227 at 8)
TOKENS_PER_LANE = 4  # tokens a lane scores per loop step (NT); 8 needs 168 registers
MERGE_IN_KERNEL = True  # CUDA: the last thread group merges the splits (else attn_reduce)
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)  # 8-dim chunks, a power of two per token, <= 32
# CUDA tensor-core loop of codebook_attn (sources/mma_loop.inc) for 1/2/4-bit codes without
# RaBitQ's divisor/unit norm: on an H200 at 128k tokens 143 us against the fp32 loop's 198.
USE_MMA = True
# Tiles of 16 tokens each warp of the tensor-core loop has in flight (its register ring).
# On an H200 (2026-12-03, one run, 4-bit with the tail, 4k / 32k / 128k tokens) 1 took
# 33.4 / 54.9 / 113.9 us, 2: 36.0 / 56.3 / 137.0, 3: 39.1 / 51.8 / 133.6 (168 registers
# from 2 on, against 128): the loop is not waiting on its loads.
MMA_PREFETCH = 1
# Four groups per SM for codebook_attn over long caches (at head_dim <= 128 its 128
# registers per thread fit four, and the tensor-core loop's 35 KiB of shared memory; 256
# needs 254 registers): on an H200 at 128k tokens the tensor-core loop took 125 us against
# 143 with two groups, RaBitQ's fp32 loop 182 against 273 (4-bit keys, with the tail).
LONG_GROUPS = 528
LONG_TOKENS = 1 << 19  # valid-token slots x (kv head, row tile) groups from which it pays
MAX_SPLITS = 256  # splits per launch that the in-kernel merge's scratch holds (tail included)


@dataclass(frozen=True)
class DecodeTail:
    """What a one-launch decode folds in besides the codes (``tail=`` of the decode ops).

    With a tail the op's query is in the original basis and its output is the whole
    attention of a cache: softmax over the compressed tokens and the exact ones together.

    * ``key_matrix [D, D]``: the keys' basis, ``q_keys = q @ key_matrix``; with float16
      queries and a float16 matrix that product is one float16 GEMM (fp32 accumulate, its
      output rounded to float16: a relative error of at most 2^-11 per element, the queries'
      own rounding), otherwise it is computed in float32; None for codes in the original
      basis (affine, KIVI: no rotation, ``value_matrix_t`` None too);
    * ``value_matrix_t [D, D]``: back from the values' basis, ``out = y @ value_matrix_t``;
    * ``exact_k, exact_v [B, Hkv, C, D]`` (float16 or float32): exact tokens, the first
      ``counts[1, b]`` of batch row ``b`` valid (the rest of the buffer is ignored);
    * ``counts`` int32 ``[2, B]``: valid compressed tokens per row, then exact tokens;
    * ``key_mean, value_mean [B, Hkv, 1, D]`` or None: the compressed keys/values were
      centered by them (every compressed score gains ``scale q . key_mean``, every compressed
      value ``value_mean``);
    * ``finite``: a boolean scalar or None; False makes the output NaN.
    """

    key_matrix: mx.array | None
    value_matrix_t: mx.array | None
    exact_k: mx.array
    exact_v: mx.array
    counts: mx.array
    key_mean: mx.array | None = None
    value_mean: mx.array | None = None
    finite: mx.array | None = None

    def check(self, q: mx.array, n_kv_heads: int) -> None:
        """Shapes against ``q [B, Hq, 1, D]`` and ``n_kv_heads`` KV heads."""
        b, _, lq, d = q.shape
        if lq != 1:
            raise ValueError(f"a decode tail takes one query token per row, got {lq}")
        if (self.key_matrix is None) != (self.value_matrix_t is None):
            raise ValueError("key_matrix and value_matrix_t come together (or neither)")
        for name in ("key_matrix", "value_matrix_t"):
            if getattr(self, name) is not None and getattr(self, name).shape != (d, d):
                raise ValueError(f"{name} must be [{d}, {d}], got {getattr(self, name).shape}")
        for name in ("exact_k", "exact_v"):
            x = getattr(self, name)
            if x.ndim != 4 or x.shape[:2] != (b, n_kv_heads) or x.shape[3] != d:
                raise ValueError(f"{name} must be [{b}, {n_kv_heads}, C, {d}], got {x.shape}")
            if x.dtype not in (mx.float16, mx.float32):
                raise ValueError(f"{name} must be float16 or float32, got {x.dtype}")
        if self.exact_v.shape != self.exact_k.shape:
            raise ValueError("exact_k and exact_v differ in shape")
        if self.counts.shape != (2, b) or not mx.issubdtype(self.counts.dtype, mx.integer):
            raise ValueError(f"counts must be integers of shape (2, {b}), got {self.counts.shape}")
        for name in ("key_mean", "value_mean"):
            x = getattr(self, name)
            if x is not None and x.shape != (b, n_kv_heads, 1, d):
                raise ValueError(f"{name} must be [{b}, {n_kv_heads}, 1, {d}], got {x.shape}")
        if self.finite is not None and self.finite.size != 1:
            raise ValueError(f"finite must be one boolean, got shape {self.finite.shape}")

    def keys_basis_query(self, q: mx.array) -> mx.array:
        """``q @ key_matrix`` for ``q [B, Hq, 1, D]``: one float16 GEMM (a tensor-core GEMM
        with no split-K reduce or cast) when both are float16, else float32; ``q`` itself
        without a key matrix."""
        if self.key_matrix is None:
            return q
        if q.dtype == mx.float16 and self.key_matrix.dtype == mx.float16:
            return q @ self.key_matrix
        return q.astype(mx.float32) @ self.key_matrix.astype(mx.float32)

    def inputs(self, q: mx.array, hkv: int) -> tuple[list[mx.array], list[tuple[str, int]]]:
        """The kernel inputs ``qk, mvt, ek, ev, kmu, vmu, fin`` and template flags for
        queries ``q [B, Hq, 1, D]``: ``qk = q @ key_matrix`` is one matmul here (in float16
        when both are, else float32), since every thread group computing it in the kernel
        cost more than the attention."""
        b, _, _, d = q.shape
        cen = self.key_mean is not None or self.value_mean is not None
        zero = _zeros(b * hkv * d)
        kmu = zero if self.key_mean is None else self.key_mean.astype(mx.float32)
        vmu = zero if self.value_mean is None else self.value_mean.astype(mx.float32)
        fin = _true() if self.finite is None else self.finite
        rot = self.key_matrix is not None
        if rot:
            arrays = [self.keys_basis_query(q), self.value_matrix_t.astype(mx.float32)]
        else:  # unread: the kernel scores against q and adds no rotation
            arrays = [_placeholder(mx.float32)] * 2
        arrays += [self.exact_k, self.exact_v, kmu, vmu, fin]
        flags = [("TAIL", 1), ("ROT", int(rot)), ("CEN", int(cen))]
        flags.append(("FIN", int(self.finite is not None)))
        return arrays, flags


def tail_reference(q: mx.array, tail: DecodeTail, scale: float, compressed) -> tuple:
    """Pure-MLX one-launch decode, every batch row on its own: the compressed part
    (``compressed(i, q_keys, n)`` -> ``(out, lse)`` of row ``i`` over its first ``n``
    compressed tokens, ``q_keys [1, Hq, 1, D]`` fp32 in the keys' basis, ``out`` in the
    values' basis), rotated back, the means added, merged with the exact part as one
    softmax; NaN where ``tail.finite`` is false. Returns ``(out, lse)`` as the kernels."""
    counts = tail.counts.tolist()
    outs, lses = [], []
    for i in range(q.shape[0]):
        n, m = counts[0][i], counts[1][i]
        one = slice(i, i + 1)
        o_c, l_c = compressed(i, tail.keys_basis_query(q[one]).astype(mx.float32), n)
        if tail.value_matrix_t is not None:
            o_c = o_c @ tail.value_matrix_t.astype(mx.float32)
        _, hq, lq, d = q[one].shape
        hkv = tail.exact_k.shape[1]
        if tail.key_mean is not None:
            qg = q[one].astype(mx.float32).reshape(1, hkv, hq // hkv * lq, d)
            shift = (qg @ mx.swapaxes(tail.key_mean[one].astype(mx.float32), -1, -2))[..., 0]
            l_c = l_c + scale * shift.reshape(l_c.shape)
        if tail.value_mean is not None:
            vm = tail.value_mean[one].astype(mx.float32)  # [1, Hkv, 1, D] -> per query head
            o_c = o_c + mx.repeat(vm, hq // hkv, axis=1)
        o_e, l_e = softmax_attention(
            q[one], tail.exact_k[one, :, :m], tail.exact_v[one, :, :m], scale
        )
        top = mx.maximum(l_c, l_e)
        top = mx.where(mx.isfinite(top), top, 0.0)
        w_c, w_e = mx.exp(l_c - top), mx.exp(l_e - top)
        total = w_c + w_e
        o = (w_c[..., None] * o_c + w_e[..., None] * o_e) / mx.maximum(total, 1e-30)[..., None]
        outs.append(o)
        lses.append(mx.log(total) + top)
    out, lse = mx.concatenate(outs), mx.concatenate(lses)
    if tail.finite is not None:
        out = mx.where(tail.finite.reshape(()), out, mx.nan)
    return out.astype(q.dtype if q.dtype == mx.float16 else mx.float32), lse


@functools.cache
def _zeros(n: int) -> mx.array:
    return mx.zeros((n,), mx.float32)


@functools.cache
def _true() -> mx.array:
    return mx.array([True])


@functools.cache
def _placeholder(dtype) -> mx.array:
    """A one-element input for a kernel argument a specialization never reads."""
    return mx.zeros((1, 1, 1, 1), dtype)


def no_tail_inputs() -> tuple[list[mx.array], list[tuple[str, int]]]:
    """Placeholders for the tail inputs of a kernel launched without a tail."""
    f32 = _placeholder(mx.float32)
    arrays = [f32, f32, _placeholder(mx.float16), _placeholder(mx.float16), f32, f32, _true()]
    return arrays, [("TAIL", 0), ("ROT", 0), ("CEN", 0), ("FIN", 0)]


def gqa_groups(q: mx.array, n_kv_heads: int) -> int:
    """g = Hq / Hkv for q [B, Hq, Lq, D]; raises if Hq is not a multiple of Hkv."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Hq, Lq, D], got shape {q.shape}")
    hq = q.shape[1]
    if hq % n_kv_heads:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {n_kv_heads}")
    return hq // n_kv_heads


def valid_length(length: int | None, lbuf: int) -> int:
    """The number of valid tokens: ``length`` (default the whole buffer), checked."""
    n = lbuf if length is None else int(length)
    if not 0 <= n <= lbuf:
        raise ValueError(f"length {n} is outside the buffer of {lbuf} tokens")
    return n


def batch_lengths(lengths: mx.array, batch: int, lbuf: int) -> mx.array:
    """``lengths`` checked as int32 [B] (values are clamped to [0, Lbuf] by the kernels)."""
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
    if not mx.issubdtype(lengths.dtype, mx.integer):
        raise ValueError(f"lengths must be integers, got {lengths.dtype}")
    return lengths.astype(mx.int32)


def float_bits(x: float) -> int:
    """The bits of fp32 ``x`` as a signed int (a compile-time constant of a kernel)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def plan_split_count(
    length: int, step: int, groups: int, extra: int = 0, target: int | None = None
) -> int:
    """Splits S along the sequence, at least a step each, such that the launch's
    ``groups * (S + extra)`` thread groups (``extra`` more per (kv head, row tile): the decode
    tail's) stay within ``target`` (default TARGET_GROUPS), one wave: a launch one group over
    it runs its last groups after the first ones end, doubling its time."""
    steps = max(1, math.ceil(length / step))
    per = (target or TARGET_GROUPS) // max(groups, 1) - extra
    return max(1, min(per, steps, MAX_SPLITS - extra))


def row_tile(rows: int, cap: int) -> int:
    """The largest divisor of ``rows`` (query rows per kv head) that is at most ``cap``."""
    for t in range(min(rows, cap), 0, -1):
        if rows % t == 0:
            return t
    return 1


def plan_splits(length: int, groups: int) -> tuple[int, int]:
    """(chunk, S): S splits of ``chunk`` tokens (a multiple of 128) covering ``length``."""
    steps = max(1, math.ceil(length / TOKENS_PER_STEP))
    want = max(1, math.ceil(TARGET_GROUPS / max(groups, 1)))
    splits = min(want, steps)
    chunk = math.ceil(steps / splits) * TOKENS_PER_STEP
    return chunk, max(1, math.ceil(length / chunk))


def reduce_partials(
    pm: mx.array, pl: mx.array, pacc: mx.array, backend: str
) -> tuple[mx.array, mx.array]:
    """Merge partials pm, pl [N, S] and pacc [N, S, D] into out [N, D] and natural lse [N]."""
    n, s, d = pacc.shape
    out, lse = launch(
        "attn_reduce",
        backend,
        [pm, pl, pacc, params(n, s)],
        template=[("D", d)],
        grid=(n * d, 1, 1),
        threadgroup=(d, 1, 1),
        output_shapes=[(n, d), (n,)],
        output_dtypes=[mx.float32, mx.float32],
    )
    return out, lse


def split_attention(
    kernel: str,
    backend: str,
    inputs: list[mx.array],
    template: list[tuple[str, int]],
    *,
    heads: int,
    rows: int,
    tile: int,
    length: int,
    lbuf: int,
    d: int,
) -> tuple[mx.array, mx.array]:
    """Launch a flash-decoding ``kernel`` and merge its partials.

    ``inputs`` are the kernel's arrays (the split parameters are appended); the kernel takes
    ``template`` plus ``G`` (query rows per kv head) and ``GT`` (rows per thread group).
    Returns out [heads, rows, D] and natural lse [heads, rows].
    """
    chunk, splits = plan_splits(length, heads * (rows // tile))
    pm, pl, pacc = launch(
        kernel,
        backend,
        [*inputs, params(length, lbuf, chunk, splits)],
        template=[*template, ("G", rows), ("GT", tile)],
        grid=(splits * 128, heads, rows // tile),
        threadgroup=(128, 1, 1),
        output_shapes=[(heads, rows, splits)] * 2 + [(heads, rows, splits, d)],
        output_dtypes=[mx.float32] * 3,
    )
    nrow = heads * rows
    out, lse = reduce_partials(
        pm.reshape(nrow, splits), pl.reshape(nrow, splits), pacc.reshape(nrow, splits, d), backend
    )
    return out.reshape(heads, rows, d), lse.reshape(heads, rows)


def decode_launch(
    kernel: str,
    backend: str,
    q: mx.array,
    codes: list[mx.array],
    template: list[tuple[str, int]],
    *,
    scale: float,
    lbuf: int,
    length: int | None,
    lengths: mx.array | None,
    tokens_per_lane: int | None = None,
    tail: bool = False,
) -> tuple[mx.array, mx.array]:
    """One launch of a one-pass decode kernel (``codebook_attn``, ``affine_attn``).

    The kernel takes q [B, Hq, Lq, D] (fp32 or fp16, unscaled), then ``codes`` (whose first
    array is [B, Hkv, Lbuf, ...]), then lengths int32 [B] and a semaphore; ``template`` holds
    its format ints, and the shared ones (rows, row tile, tokens per lane, scale, FUSED) are
    added here (``tokens_per_lane`` defaults to ``TOKENS_PER_LANE``). Thread groups of 128
    threads cover (split, kv head, row tile); S splits give about ``TARGET_GROUPS`` groups.
    On CUDA the last group of each (kv head, row tile) merges the splits (the semaphore is a
    fresh zero array per call: MLX's CUDA graphs may run independent calls concurrently;
    the kernel leaves it zero, since ``mx.compile`` merges equal zero arrays of a traced
    graph into one that its launches then share one after another); on
    Metal, or with ``MERGE_IN_KERNEL`` off, ``attn_reduce`` does. ``length`` (an int for
    every row) is sent as a fresh [B] array. With ``tail`` (CUDA, merged in the kernel
    only) one more thread group per (kv head, row tile) takes the exact tokens and
    ``lengths`` is the ``[2, B]`` counts of :class:`DecodeTail`.
    Returns out [B, Hq, Lq, D] (fp32; with ``tail`` in q's dtype) and natural lse fp32
    [B, Hq, Lq].
    """
    b, hq, lq, d = q.shape
    hkv = codes[0].shape[1]
    rows = (hq // hkv) * lq
    tile = row_tile(rows, MAX_ROW_TILE)
    nt = min(tokens_per_lane or TOKENS_PER_LANE, d // 8)
    groups = b * hkv * (rows // tile)
    step = (128 // (d // 8)) * nt
    planned = lbuf if length is None else length
    target = TARGET_GROUPS
    fmt = dict(template)
    if kernel == "codebook_attn" and fmt["D"] <= 128 and planned * groups >= LONG_TOKENS:
        target = LONG_GROUPS
    splits = plan_split_count(planned, step, groups, int(tail), target)
    fused = backend == "cuda" and MERGE_IN_KERNEL
    if tail and not fused:
        raise ValueError("a decode tail needs the CUDA kernel with its in-kernel merge")
    splits += int(tail)
    lens = mx.array([length] * b, dtype=mx.int32) if lengths is None else lengths
    qin = q if q.dtype in (mx.float32, mx.float16) else q.astype(mx.float32)
    nrow = b * hkv * rows
    shared = [("SCALE", float_bits(scale * LOG2E)), ("FUSED", int(fused))]
    shared.append(("MAX_SPLITS", MAX_SPLITS))
    out_dtype = qin.dtype if tail else mx.float32
    out, lse, pm, pl, pacc = launch(
        kernel,
        backend,
        [qin, *codes, lens, mx.zeros((groups,), mx.int32) if fused else lens],
        template=[*template, ("G", rows), ("GT", tile), ("NT", nt), *shared],
        grid=(splits * 128, b * hkv, rows // tile),
        threadgroup=(128, 1, 1),
        output_shapes=[(b, hq, lq, d), (b, hq, lq), *[(nrow, splits)] * 2, (nrow, splits, d)],
        output_dtypes=[out_dtype] + [mx.float32] * 4,
    )
    if not fused:
        out, lse = reduce_partials(pm, pl, pacc, backend)
    return out.reshape(b, hq, lq, d), lse.reshape(b, hq, lq)


def softmax_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float
) -> tuple[mx.array, mx.array]:
    """Exact reference: q [B, Hq, Lq, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] (fp32).

    Returns out [B, Hq, Lq, Dv] = softmax(scale q k^T) v and lse [B, Hq, Lq]; for L = 0 the
    output is 0 and lse is -inf.
    """
    b, hq, lq, d = q.shape
    hkv, length, dv = k.shape[1], k.shape[2], v.shape[-1]
    if length == 0:
        return mx.zeros((b, hq, lq, dv), mx.float32), mx.full((b, hq, lq), -mx.inf, mx.float32)
    qg = q.astype(mx.float32).reshape(b, hkv, (hq // hkv) * lq, d)
    s = scale * (qg @ k.astype(mx.float32).swapaxes(-1, -2))
    lse = mx.logsumexp(s, axis=-1)
    out = mx.exp(s - lse[..., None]) @ v.astype(mx.float32)
    return out.reshape(b, hq, lq, dv), lse.reshape(b, hq, lq)
