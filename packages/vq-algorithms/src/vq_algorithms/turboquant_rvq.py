"""TurboQuant residual VQ: several TurboQuant-MSE passes, each on the previous residual.

Pass 1 codes the vector (arXiv 2504.19874, Algorithm 1); pass p codes the residual left by
passes 1..p−1 with its own random rotation (seed + p), norm and sphere Lloyd–Max codebook of
``b_p`` bits. The fresh rotation makes the residual's coordinates follow the sphere law
again: reusing pass 1's rotation gave 0.0196 relative MSE at 2+2 bits, a fresh one 0.0135.
``bits`` is the total, split over ``passes`` as evenly as possible, earlier passes getting
the extra bit (5 = 3 + 2).

Honest comparison (d=128, relative MSE on Gaussian vectors, tests/test_turboquant_rvq.py):
2+2 bits ≈ 0.0135 against ≈ 0.0093 for one 4-bit pass, and 1+1 ≈ 0.13 against 0.117 for one
2-bit pass. A single pass is better at equal bits (each pass pays its own norm and the
residual is only approximately spherical). RVQ's use is reaching widths a single scalar
codebook lacks here (5, 6, 8 bits) and the additive structure product-VQ methods build on.
Attention rotates the query once per pass and the output back once per pass. On a GPU
(two passes) vq-kernels' codebook kernel scores pass 1 as its keys and pass 2 as its second
key term (:class:`vq_kernels.KeyTerm`), once per value pass: the passes' value sums live in
different bases, so each is its own launch over the same scores, merged through their
log-sum-exps (:func:`fused_rvq_decode`).

Codes: per pass ``p``: ``idx{p}`` uint32 [..., ceil(D b_p / 32)], ``norm{p}`` f16 [...].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

import vq_kernels
from vq_algorithms._fused import (
    CODEBOOK_OP,
    inverse_matrix,
    kernel_applies,
    one_launch,
    query_dtype,
    rotation_matrix,
    tail_applies,
    valid_tokens,
    view_counts,
)
from vq_algorithms._rotated_codebook import RotatedCodebook, RotatedConfig
from vq_core import (
    FLOAT16_MAX,
    Codes,
    HeadDims,
    Quantizer,
    invalid,
    register,
    register_compressed_attention,
    register_decode_attention,
)


@dataclass(frozen=True)
class TurboQuantRVQConfig(RotatedConfig):
    allowed_bits = (2, 3, 4, 5, 6, 8)
    # The sphere Lloyd–Max codebook needs d >= 3 (coordinate law of the unit sphere).
    head_dims = HeadDims(minimum=3)
    passes: int = 2

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.passes, int) or not 2 <= self.passes <= self.bits:
            raise invalid("passes", self.passes, f"an integer in [2, bits={self.bits}]")
        if -(-self.bits // self.passes) > 4:
            raise invalid(
                "passes", self.passes, f"at least {-(-self.bits // 4)} for {self.bits} bits"
            )

    def split(self) -> tuple[int, ...]:
        base, extra = divmod(self.bits, self.passes)
        return tuple(base + (1 if p < extra else 0) for p in range(self.passes))


@register
class TurboQuantRVQ(Quantizer):
    method = "turboquant_rvq"
    config_class = TurboQuantRVQConfig
    family = "rotation + residual scalar codebooks"
    max_norm = FLOAT16_MAX  # norms are stored as float16
    round_trip_bound = {2: 0.14, 3: 0.046, 4: 0.0145, 5: 0.0043, 6: 0.00125, 8: 0.0001}

    def __init__(self, config: TurboQuantRVQConfig):
        super().__init__(config)
        d = config.head_dim
        self.stages = [
            RotatedCodebook(d, b, config.seed + p, config.rotation)
            for p, b in enumerate(config.split())
        ]

    def field_layout(self):
        out = {}
        for p, st in enumerate(self.stages):
            out.update(st.layout(prefix=f"p{p}_"))
        return out

    def _encode(self, x: mx.array) -> Codes:
        r, codes = x, Codes()
        for p, st in enumerate(self.stages):
            stage = st.encode(r, prefix=f"p{p}_")
            codes.update(stage)
            r = r - st.rotation.inverse(st.decode_rotated(stage, prefix=f"p{p}_"))
        return codes

    def _decode(self, codes: Codes) -> mx.array:
        return sum(
            st.rotation.inverse(st.decode_rotated(codes, prefix=f"p{p}_"))
            for p, st in enumerate(self.stages)
        )

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        q = q.astype(mx.float32)
        total = 0
        for p, st in enumerate(self.stages):
            s = st.rotation.apply(q) @ mx.swapaxes(st.levels(codes[f"p{p}_idx"]), -1, -2)
            total = total + s * codes[f"p{p}_norm"].astype(mx.float32)[..., None, :]
        return total

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        p = p.astype(mx.float32)
        out = 0
        for i, st in enumerate(self.stages):
            pw = p * codes[f"p{i}_norm"].astype(mx.float32)[..., None, :]
            out = out + st.rotation.inverse(pw @ st.levels(codes[f"p{i}_idx"]))
        return out


def _value_passes(values) -> list[tuple] | None:
    """``(idx, norm, centroids, bits, rotation)`` per value pass: TurboQuant-RVQ's (two
    passes) or TurboQuant-MSE's one; None for other value formats."""
    vq = values.quantizer
    if vq.method == "turboquant_mse":
        rc = vq.rc
        return [
            (values.codes["idx"], values.codes["norm"], rc.codebook.centroids, rc.bits, rc.rotation)
        ]
    if vq.method == "turboquant_rvq" and len(vq.stages) == 2:
        return [
            (values.codes[f"p{p}_idx"], values.codes[f"p{p}_norm"], st.codebook.centroids,
             st.bits, st.rotation)
            for p, st in enumerate(vq.stages)
        ]  # fmt: skip
    return None


def _key_passes(keys):
    """Pass 1's (idx, norm, centroids, bits) and pass 2's the same, of two-pass keys."""
    return tuple(
        (keys.codes[f"p{p}_idx"], keys.codes[f"p{p}_norm"], st.codebook.centroids, st.bits)
        for p, st in enumerate(keys.quantizer.stages)
    )


def fused_rvq_attention(q: mx.array, keys, values, *, scale: float):
    """Two-pass TurboQuant-RVQ keys (with RVQ or TurboQuant-MSE values) in vq-kernels'
    codebook kernel: pass 1 as its keys, pass 2 as its second key term; one launch per value
    pass, each rotated back and summed (the launches share the scores, so their lse is
    one). None unless :func:`~vq_algorithms._fused.kernel_applies`."""
    kq = keys.quantizer
    passes = _value_passes(values)
    if (
        len(kq.stages) != 2
        or passes is None
        or not kernel_applies(kq.head_dim, q.shape[2], CODEBOOK_OP)
    ):
        return None
    q32 = q.astype(mx.float32)
    (i0, n0, c0, b0), (i1, n1, c1, b1) = _key_passes(keys)
    term = vq_kernels.KeyTerm(kq.stages[1].rotation.apply(q32), i1, n1, c1, b1)
    q0 = kq.stages[0].rotation.apply(q32)
    out, lse = 0.0, None
    for vi, vn, vc, vb, rot in passes:
        o, lse = vq_kernels.codebook_decode_attention(
            q0, i0, n0, c0, b0, vi, vn, vc, vb, scale=scale, k_term=term, **valid_tokens(keys)
        )
        out = out + rot.inverse(o)
    return out, lse


def fused_rvq_decode(queries: mx.array, keys, values, *, scale: float) -> mx.array | None:
    """A whole decode step over two-pass TurboQuant-RVQ keys in one launch per value pass
    (CUDA): the first launch carries the decode tail (exact tokens, means, finite flag) and
    value pass 1; each further value pass is a launch over the compressed tokens alone,
    weighted into the first by ``exp(lse_pass + scale q . key_mean - lse_first)`` (the same
    scores, normalized over the compressed tokens only). None unless
    :func:`~vq_algorithms._fused.tail_applies`."""
    kq = keys.quantizer
    passes = _value_passes(values)
    if len(kq.stages) != 2 or passes is None or not tail_applies(queries, keys, values):
        return None
    dtype = query_dtype(queries)
    k_passes = _key_passes(keys)
    optional = (keys.mean, values.mean, keys.finite)
    config = (
        tuple(p[3] for p in k_passes), tuple(p[3] for p in passes), float(scale),
        tuple(x is not None for x in optional), queries.dtype,
    )  # fmt: skip
    arrays = [queries, *(rotation_matrix(st.rotation, dtype) for st in kq.stages)]
    arrays += [keys.buffer, values.buffer, view_counts(keys, queries.shape[0])]
    arrays += [a for p in k_passes for a in p[:3]]
    arrays += [a for p in passes for a in (*p[:3], inverse_matrix(p[4]))]
    arrays += [x for x in optional if x is not None]
    return one_launch(_rvq_step, config, queries, keys, arrays)


def _rvq_step(k_bits, v_bits, scale, present, dtype):
    """The decode step of :func:`fused_rvq_decode`."""

    def step(q, m0, m1, ek, ev, counts, i0, n0, c0, i1, n1, c1, *rest):
        it = iter(rest)
        values = [(next(it), next(it), next(it), next(it)) for _ in v_bits]
        k_mean, v_mean, finite = (next(it) if p else None for p in present)
        term = vq_kernels.KeyTerm(q @ m1, i1, n1, c1, k_bits[1])
        (vi, vn, vc, mvt), *more = values
        tail = vq_kernels.DecodeTail(m0, mvt, ek, ev, counts, k_mean, v_mean, finite)
        out, lse = vq_kernels.codebook_decode_attention(
            q, i0, n0, c0, k_bits[0], vi, vn, vc, v_bits[0], scale=scale, tail=tail,
            k_term=term,
        )  # fmt: skip
        out = out.astype(mx.float32)
        if more:
            q0 = q @ m0
            shift = 0.0
            if k_mean is not None:  # the first launch's compressed scores gained it
                b, hq, _, d = q.shape
                hkv = k_mean.shape[1]
                qg = q.astype(mx.float32).reshape(b, hkv, hq // hkv, d)
                shift = scale * (qg @ mx.swapaxes(k_mean.astype(mx.float32), -1, -2))
                shift = shift.reshape(b, hq, 1)
            for (vi, vn, vc, mvt), vb in zip(more, v_bits[1:], strict=True):
                o, l_p = vq_kernels.codebook_decode_attention(
                    q0, i0, n0, c0, k_bits[0], vi, vn, vc, vb, scale=scale, k_term=term,
                    lengths=counts[0],
                )  # fmt: skip
                out = out + (o @ mvt) * mx.exp(l_p + shift - lse)[..., None]
        return out.astype(dtype)

    return step


for _values in ("turboquant_rvq", "turboquant_mse"):
    register_compressed_attention("turboquant_rvq", _values, fused_rvq_attention)
    register_decode_attention("turboquant_rvq", _values, fused_rvq_decode)
