"""RaBitQ (Gao & Long, arXiv 2405.12497) and extended RaBitQ (arXiv 2409.09913).

Rotate ``y = k P`` (P from :mod:`vq_core.preconditioner`; the papers' proofs assume a
Haar-random P, rotation ``"orthogonal"``, the default) and let ``o = y/||y||``. The code is
a point of the grid ``G_B = {-(2^B-1)/2, ..., (2^B-1)/2}^d`` (half-integers), ``ō = v/||v||``
its direction. Per vector two float16 correction factors are kept, as the papers define:
``norm = ||k||`` (``||o_r - c||`` with centroid ``c = 0``) and ``ip = <ō, o>``. The
estimator (RaBitQ Sec. 3.2, Thm 3.2; extended RaBitQ Sec. 3) is

    <q, k>  ≈  ||k|| · <ō, q P> / <ō, o>,       unbiased over the random rotation.

``decode`` returns the vector with exactly that inner product, ``k̂ = ||k||/<ō,o> · ō P^T``,
so ``scores``/``weighted_sum`` (done in the rotated basis) equal decode-then-matmul. Its
round-trip error is ``1/<ō,o>² - 1``: 0.571 at B = 1 (``<ō,o> → sqrt(2/π)``).

* B = 1 (RaBitQ): ``v = sign(o)/2``, i.e. the sign bits; ``<ō,o> = ||o||_1 / sqrt(d)``.
* B > 1 (extended RaBitQ, Sec. 3.2, Alg. 1): ``v`` maximizes ``<v/||v||, o>`` over all
  rescalings ``t`` of ``|o|`` rounded onto the grid, ``|v_j| = min(floor(t|o_j|), 2^(B-1)-1)
  + 1/2``, signs from ``o``. As in the paper the search runs over every critical ``t``
  (where some ``floor(t|o_j|)`` steps), exactly; instead of a priority queue the critical
  points are sorted and the cosine is a prefix sum (vectorized per vector).

Query side (RaBitQ Sec. 3.3): with ``binary_query=True`` (B = 1 only) the rotated query is
quantized to ``B_q = 4`` bits, ``q_u = floor((q' - v_l)/Δ + u)``, ``Δ = (v_r - v_l)/15``,
with **randomized rounding** ``u ~ U[0, 1)`` drawn from the seed (so scores are
reproducible, yet unbiased over seeds), and ``<x̄_b, q_u>`` is computed from its 4 bit
planes with AND + popcount (:func:`binary_dot`: vq-kernels' ``sign_dot_planes``, a kernel on
a GPU and pure MLX on the CPU). Otherwise scores use the exact float query.

Codes for ``k [..., d]``: ``idx`` uint32 ``[..., ceil(d·B/32)]`` (``u_j = v_j + (2^B-1)/2``;
its top bit is the sign, 1 for ``o_j >= 0``), ``norm`` and ``ip`` float16 ``[...]``:
``B + 32/d`` bits per element. Values: at B = 1 keys only (``default_value_method`` is
``turboquant_mse``); at B >= 2 RaBitQ compresses values well too (error 0.13/0.03/0.008,
unbiased attention output), but the default partner stays ``turboquant_mse`` because the
registry reads it per class, not per config: pass ``value_method="rabitq"`` to use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

import vq_kernels
from vq_algorithms._fused import (
    CODEBOOK_OP,
    codebook_decode_with_turboquant_values,
    codebook_keys_with_turboquant_values,
    grid_codebook,
    kernel_applies,
    query_dtype,
    rotation_matrix,
    tail_applies,
)
from vq_algorithms._rotated_codebook import RotatedConfig, default_rotation
from vq_core import (
    FLOAT16_MAX,
    Codes,
    CompressedSide,
    ConfigError,
    Quantizer,
    pack,
    packed_words,
    register,
    register_compressed_attention,
    register_decode_attention,
    stream_key,
    unpack,
)
from vq_core.preconditioner import hadamard_supported, make_preconditioner

QUERY_BITS = 4
SEARCH_CHUNK = 4096  # vectors per slice of the extended-RaBitQ code search
_M1, _M2, _M4 = 0x55555555, 0x33333333, 0x0F0F0F0F


@dataclass(frozen=True)
class RaBitQConfig(RotatedConfig):
    """``rotation`` as in turboquant_mse (default Haar ``"orthogonal"``, as the proofs
    assume); ``binary_query`` scores with a 4-bit query and popcounts (B = 1 only)."""

    allowed_bits = (1, 2, 3, 4)
    rotation: str = "orthogonal"
    binary_query: bool = False

    def validate(self) -> None:
        super().validate()
        if self.rotation == "hadamard" and not hadamard_supported(self.head_dim):
            raise ConfigError(
                f"rabitq: head_dim={self.head_dim} has no Hadamard rotation; use "
                "rotation='orthogonal' or 'auto'"
            )
        if not isinstance(self.binary_query, bool):
            raise ConfigError(f"rabitq: binary_query={self.binary_query!r}; expected a bool")
        if self.binary_query and self.bits != 1:
            raise ConfigError(f"rabitq: binary_query=True needs bits=1, got bits={self.bits}")


def popcount(w: mx.array) -> mx.array:
    """Set bits per uint32 word (SWAR), uint32 of the same shape."""
    w = w - ((w >> 1) & _M1)
    w = (w & _M2) + ((w >> 2) & _M2)
    w = (w + (w >> 4)) & _M4
    return (w + (w >> 8) + (w >> 16) + (w >> 24)) & 0x3F


def binary_dot(planes: mx.array, words: mx.array) -> mx.array:
    """``<x_b, q_u>`` from bit planes: ``Σ_j 2^j popcount(x_b AND q_u^(j))``.

    ``planes`` uint32 ``[B, H, M, B_q, W]`` (plane j holds bit j of every ``q_u``),
    ``words`` uint32 ``[B, H, L, W]`` (1-bit codes) -> int32 ``[B, H, M, L]``. Padding bits
    past ``d`` are 0 in both, so the whole ``32 W`` bits are counted.
    """
    return vq_kernels.sign_dot_planes(planes, words, 32 * words.shape[-1])


def grid_magnitudes(a: mx.array, bits: int) -> mx.array:
    """Extended RaBitQ code search: ``a = |o|`` float32 ``[N, d]`` -> ``k [N, d]`` int32 in
    ``[0, 2^(B-1))`` maximizing ``<k + 1/2, a> / ||k + 1/2||`` over the critical rescalings
    ``t = i / a_j`` (i = 1 .. 2^(B-1)-1), at which ``k_j = floor(t a_j)`` steps by one."""
    n, d = a.shape
    steps = (1 << (bits - 1)) - 1
    if steps == 0 or n == 0:
        return mx.zeros((n, d), dtype=mx.int32)
    i = mx.arange(1, steps + 1, dtype=mx.float32)
    t = mx.where(a[..., None] > 0, i / mx.maximum(a[..., None], 1e-30), mx.inf)
    order = mx.argsort(t.reshape(n, d * steps), axis=-1)  # events in order of t
    coord, level = order // steps, order % steps + 1
    # Each event raises |v_j| from level - 1/2 to level + 1/2: <v, a> += a_j, ||v||² += 2·level.
    dot0 = 0.5 * a.sum(-1, keepdims=True)  # <v, a> at t = 0, where every |v_j| = 1/2
    dot = dot0 + mx.cumsum(mx.take_along_axis(a, coord, -1), -1)
    sq = 0.25 * d + mx.cumsum(2 * level, axis=-1).astype(mx.float32)
    cos = mx.concatenate([dot0 / math.sqrt(0.25 * d), dot / mx.sqrt(sq)], -1)  # [N, 1 + E]
    best = mx.argmax(cos, axis=-1)[:, None]  # how many events to take
    taken = mx.argsort(order, axis=-1) < best  # rank of each (coord, level) event
    return taken.reshape(n, d, steps).sum(axis=-1).astype(mx.int32)


@register
class RaBitQ(Quantizer):
    method = "rabitq"
    config_class = RaBitQConfig
    family = "rotation + grid code with unbiased estimator"
    max_norm = FLOAT16_MAX  # norms are stored as float16
    default_value_method = "turboquant_mse"
    # 1/<ō,o>² - 1 on Gaussian vectors, d = 128; seeds 0..31 measured max 0.570, 0.132,
    # 0.0367, 0.0101 (B = 1..4), plus margin for other seeds and float16 factors.
    round_trip_bound = {1: 0.60, 2: 0.14, 3: 0.038, 4: 0.011}

    def __init__(self, config: RaBitQConfig):
        super().__init__(config)
        d, b = config.head_dim, config.bits
        self.rotation = make_preconditioner(default_rotation(d, config.rotation), d, config.seed)
        self.half = ((1 << b) - 1) / 2  # offset between code u and grid value v
        self.words = packed_words(d, b)
        # Independent of the rotation's stream (it was the same key before 0.2).
        self.query_key = stream_key(config.seed, "rounding")

    def field_layout(self):
        f16 = ((), mx.float16)
        return {"idx": ((self.words,), mx.uint32), "norm": f16, "ip": f16}

    def _encode(self, x: mx.array) -> Codes:
        d, lead = self.head_dim, x.shape[:-1]
        y = self.rotation.apply(x).reshape(-1, d)
        o = y / mx.maximum(mx.linalg.norm(y, axis=-1, keepdims=True), 1e-30)
        a = mx.abs(o)  # the search holds [N, d·(2^(B-1)-1)] arrays: do it in slices of N
        parts = [
            grid_magnitudes(a[i : i + SEARCH_CHUNK], self.config.bits)
            for i in range(0, max(a.shape[0], 1), SEARCH_CHUNK)
        ]
        k = mx.concatenate(parts, axis=0).astype(mx.float32)
        v = mx.where(o >= 0, k + 0.5, -(k + 0.5))  # grid point, [N, d]
        ip = (v * o).sum(-1) / mx.linalg.norm(v, axis=-1)
        ip = mx.where(mx.abs(o).sum(-1) > 0, ip, 1.0)  # zero vector: any code, ip = 1
        u = (v + self.half).astype(mx.uint32)
        return Codes(
            {
                "idx": pack(u, self.config.bits).reshape(*lead, self.words),
                "norm": mx.linalg.norm(x, axis=-1).astype(mx.float16),
                "ip": ip.reshape(lead).astype(mx.float16),
            }
        )

    def _rotated(self, codes: Codes) -> tuple[mx.array, mx.array]:
        """Unit ``ō [..., d]`` float32 and the scale ``||k|| / <ō, o>`` ``[...]``."""
        v = unpack(codes["idx"], self.config.bits, self.head_dim).astype(mx.float32) - self.half
        unit = v / mx.linalg.norm(v, axis=-1, keepdims=True)
        scale = codes["norm"].astype(mx.float32) / codes["ip"].astype(mx.float32)
        return unit, scale

    def _decode(self, codes: Codes) -> mx.array:
        unit, scale = self._rotated(codes)
        return self.rotation.inverse(unit * scale[..., None])

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        """``||k_i|| <ō_i, q P> / <ō_i, o_i>``; the query is rotated once, keys never."""
        q_rot = self.rotation.apply(q.astype(mx.float32))
        if self.config.binary_query:
            return self.binary_scores(q_rot, codes)
        unit, scale = self._rotated(codes)
        return (q_rot @ mx.swapaxes(unit, -1, -2)) * scale[..., None, :]

    def quantize_query(self, q_rot: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Rotated ``q' [B, H, M, d]`` -> (``q_u`` uint32 in [0, 15], ``v_l``, ``Δ`` ``[B, H, M]``)
        with randomized rounding; ``Δ q_u + v_l`` is the binarized query."""
        lo, hi = q_rot.min(axis=-1), q_rot.max(axis=-1)
        delta = mx.maximum((hi - lo) / ((1 << QUERY_BITS) - 1), 1e-30)
        u = mx.random.uniform(shape=q_rot.shape, key=self.query_key)
        qu = mx.floor((q_rot - lo[..., None]) / delta[..., None] + u)
        return mx.clip(qu, 0, (1 << QUERY_BITS) - 1).astype(mx.uint32), lo, delta

    def binary_scores(self, q_rot: mx.array, codes: Codes) -> mx.array:
        """RaBitQ Sec. 3.3.2: ``<x̄, q̄> = (2Δ<x_b, q_u> + 2 v_l Σx_b - Δ Σq_u - d v_l)/√d``
        with ``<x_b, q_u>`` by bit-plane AND + popcount, then times ``||k|| / <ō, o>``."""
        d = self.head_dim
        qu, lo, delta = self.quantize_query(q_rot)
        planes = mx.stack([pack((qu >> j) & 1, 1) for j in range(QUERY_BITS)], axis=-2)
        dot = binary_dot(planes, codes["idx"]).astype(mx.float32)  # [B, H, M, L]
        ones = popcount(codes["idx"]).sum(-1).astype(mx.float32)[..., None, :]  # Σ x_b
        qsum = qu.sum(-1).astype(mx.float32)[..., None]  # Σ q_u
        lo, delta = lo[..., None], delta[..., None]
        est = (2 * delta * dot + 2 * lo * ones - delta * qsum - d * lo) / math.sqrt(d)
        scale = codes["norm"].astype(mx.float32) / codes["ip"].astype(mx.float32)
        return est * scale[..., None, :]

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """``(Σ_i p_i s_i ō_i) P^T``: accumulate in the rotated basis, rotate back once."""
        unit, scale = self._rotated(codes)
        pw = p.astype(mx.float32) * scale[..., None, :]
        return self.rotation.inverse(pw @ unit)


def fused_rabitq_attention(
    q: mx.array, keys: CompressedSide, values: CompressedSide, *, scale: float
) -> tuple[mx.array, mx.array] | None:
    """RaBitQ keys (float query) with TurboQuant-MSE values in vq-kernels' codebook kernel.

    The kernel's keys are ``norm / ip · v / ||v||`` with ``v = u - (2^B - 1)/2`` from the
    grid codebook: the estimator of :meth:`RaBitQ.scores`. None in ``binary_query`` mode
    (the quantized query is a different estimator) and unless
    :func:`~vq_algorithms._fused.kernel_applies`.
    """
    kq = keys.quantizer
    if kq.config.binary_query or not kernel_applies(kq.head_dim, q.shape[2], CODEBOOK_OP):
        return None
    return codebook_keys_with_turboquant_values(
        kq.rotation.apply(q.astype(mx.float32)),
        keys.codes["idx"],
        grid_codebook(kq.config.bits),
        kq.config.bits,
        keys,
        values,
        scale=scale,
        k_divisor=keys.codes["ip"],
        k_unit=True,
    )


def fused_rabitq_decode(queries: mx.array, keys, values, *, scale: float) -> mx.array | None:
    """A whole decode step over RaBitQ keys (float query) and TurboQuant-MSE values in one
    launch (CUDA); None in ``binary_query`` mode and unless
    :func:`~vq_algorithms._fused.tail_applies`."""
    kq = keys.quantizer
    if kq.config.binary_query or not tail_applies(queries, keys, values):
        return None
    return codebook_decode_with_turboquant_values(
        queries, rotation_matrix(kq.rotation, query_dtype(queries)), keys.codes["idx"],
        grid_codebook(kq.config.bits), kq.config.bits, keys, values, scale=scale,
        k_divisor=keys.codes["ip"], k_unit=True,
    )  # fmt: skip


register_compressed_attention("rabitq", "turboquant_mse", fused_rabitq_attention)
register_decode_attention("rabitq", "turboquant_mse", fused_rabitq_decode)
