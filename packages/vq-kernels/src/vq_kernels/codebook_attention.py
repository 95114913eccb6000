"""Fused decode attention over scalar-codebook K/V codes, in the rotated basis.

Scores: s_i = scale * norm_k,i * sum_j q_j c_k[idx_ij] (inner products survive the rotation);
values: out = sum_i p_i norm_v,i c_v[idx_i] / sum_i p_i, returned in the rotated basis for the
caller to rotate back. The kernel streams packed words (online softmax in base 2,
flash-decoding splits merged inside the same launch on CUDA); keys and values may use
different bits; batch rows may have different valid lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from vq_kernels import _attention, codebook_attention_cpu
from vq_kernels._attention import (
    KERNEL_HEAD_DIMS,
    DecodeTail,
    _placeholder,
    batch_lengths,
    decode_launch,
    float_bits,
    gqa_groups,
    no_tail_inputs,
    softmax_attention,
    tail_reference,
    valid_length,
)
from vq_kernels._backend import explicit_choice, resolve_backend
from vq_kernels.codebook import codebook_dequantize_reference, n_words


@dataclass(frozen=True)
class KeyTerm:
    """A second additive key term inside the softmax: ``s_i += scale * norm_i * (q_term .
    codebook[idx_i])`` with ``bits``-bit scalar codes in the term's own basis.
    TurboQuant-prod's 1-bit residual sketch (arXiv 2504.19874, Algorithm 2; QJL's
    estimator) is the case ``bits=1``, codebook ``(-1, +1)``, ``scale = sqrt(pi/2) / m``;
    a residual VQ's second pass is the case of its codebook with ``scale=1``.

    * ``q_term [B, Hq, Lq, D]`` (fp32 or fp16): the query in the term's basis (``q_rot @
      S^T`` for a sketch; with a decode tail the caller's ``q @ M``);
    * ``codes`` uint32 ``[B, Hkv, Lbuf, ceil(D * bits / 32)]``; ``norm`` float16
      ``[B, Hkv, Lbuf]``; ``codebook`` fp32 ``[2^bits]``; ``bits`` in 1-4; ``scale`` a float.
    """

    q_term: mx.array
    codes: mx.array
    norm: mx.array
    codebook: mx.array
    bits: int
    scale: float = 1.0

    def check(self, q: mx.array, k_norm: mx.array) -> None:
        d = q.shape[-1]
        if self.bits not in (1, 2, 3, 4) or self.codebook.shape != (1 << self.bits,):
            raise ValueError(
                f"a key term needs bits in 1-4 and a codebook of 2^bits levels, got bits="
                f"{self.bits} and codebook {self.codebook.shape}"
            )
        if self.q_term.shape != q.shape:
            raise ValueError(f"q_term must have q's shape {q.shape}, got {self.q_term.shape}")
        want = (*k_norm.shape, n_words(d, self.bits))
        if self.codes.shape != want or self.codes.dtype != mx.uint32:
            raise ValueError(
                f"key term codes must be uint32 {want}, got {self.codes.dtype} {self.codes.shape}"
            )
        if self.norm.shape != k_norm.shape:
            raise ValueError(f"norm must have k_norm's shape {k_norm.shape}, got {self.norm.shape}")

    def rows(self, i: int) -> KeyTerm:
        """Batch row ``i`` alone."""
        one = slice(i, i + 1)
        return KeyTerm(
            self.q_term[one], self.codes[one], self.norm[one], self.codebook, self.bits,
            self.scale,
        )  # fmt: skip


def codebook_decode_attention_reference(
    q_rot: mx.array,
    k_packed: mx.array,
    k_norm: mx.array,
    k_centroids: mx.array,
    k_bits: int,
    v_packed: mx.array,
    v_norm: mx.array,
    v_centroids: mx.array,
    v_bits: int,
    *,
    scale: float,
    length: int | None = None,
    lengths: mx.array | None = None,
    k_divisor: mx.array | None = None,
    k_unit: bool = False,
    k_term: KeyTerm | None = None,
    tail: DecodeTail | None = None,
) -> tuple[mx.array, mx.array]:
    """Pure-MLX :func:`codebook_decode_attention`: dequantize, then exact softmax attention.

    With ``lengths`` each batch row is computed on its own valid tokens (a host read).
    """
    if tail is not None:
        return _tail_reference(
            q_rot, k_packed, k_norm, k_centroids, k_bits, v_packed, v_norm, v_centroids, v_bits,
            scale=scale, k_divisor=k_divisor, k_unit=k_unit, k_term=k_term, tail=tail,
        )  # fmt: skip
    d = q_rot.shape[-1]
    if lengths is not None:
        rows = []
        for i, n in enumerate(batch_lengths(lengths, q_rot.shape[0], k_packed.shape[2]).tolist()):
            one = (q_rot[i : i + 1], k_packed[i : i + 1], k_norm[i : i + 1], k_centroids, k_bits)
            one += (v_packed[i : i + 1], v_norm[i : i + 1], v_centroids, v_bits)
            div = None if k_divisor is None else k_divisor[i : i + 1]
            sk = None if k_term is None else k_term.rows(i)
            rows.append(
                codebook_decode_attention_reference(
                    *one, scale=scale, length=n, k_divisor=div, k_unit=k_unit, k_term=sk
                )
            )
        return mx.concatenate([o for o, _ in rows]), mx.concatenate([s for _, s in rows])
    n = valid_length(length, k_packed.shape[2])
    kp = k_packed[:, :, :n]
    weight = k_norm[:, :, :n].astype(mx.float32)
    if k_divisor is not None:
        weight = weight / k_divisor[:, :, :n].astype(mx.float32)
    if k_unit:
        levels = codebook_dequantize_reference(kp, mx.ones(weight.shape), k_centroids, k_bits, d)
        cn = mx.linalg.norm(levels, axis=-1)
        weight = mx.where(cn > 0, weight / mx.where(cn > 0, cn, 1.0), 0.0)
    k = codebook_dequantize_reference(kp, weight, k_centroids, k_bits, d)
    v = codebook_dequantize_reference(v_packed[:, :, :n], v_norm[:, :, :n], v_centroids, v_bits, d)
    if k_term is not None:  # the second term as more dims of one inner product
        t = k_term
        norm = t.norm[:, :, :n].astype(mx.float32) * t.scale
        k2 = codebook_dequantize_reference(t.codes[:, :, :n], norm, t.codebook, t.bits, d)
        q_rot = mx.concatenate([q_rot.astype(mx.float32), t.q_term.astype(mx.float32)], -1)
        k = mx.concatenate([k, k2], axis=-1)
    return softmax_attention(q_rot, k, v, scale)


def _tail_reference(q, kp, kn, kc, kb, vp, vn, vc, vb, *, scale, k_divisor, k_unit, k_term, tail):
    """:func:`~vq_kernels._attention.tail_reference` over codebook codes."""

    def compressed(i, q_keys, n):
        one = slice(i, i + 1)
        div = None if k_divisor is None else k_divisor[one]
        sk = None if k_term is None else k_term.rows(i)
        return codebook_decode_attention_reference(
            q_keys, kp[one], kn[one], kc, kb, vp[one], vn[one], vc, vb,
            scale=scale, length=n, k_divisor=div, k_unit=k_unit, k_term=sk,
        )  # fmt: skip

    return tail_reference(q, tail, scale, compressed)


def _mma_applies(backend: str, d: int, k_bits: int, v_bits: int, k_divisor, k_unit, k_term) -> bool:
    """The tensor-core loop: CUDA, switched on (``_attention.USE_MMA``), 1/2/4-bit codes,
    no second key term, head_dim a multiple of 16 (RaBitQ's divisor and unit-norm keys
    included: the loop takes the code vectors' norms from tensor-core Gram products)."""
    del k_divisor, k_unit
    return (
        backend == "cuda"
        and _attention.USE_MMA
        and k_bits in (1, 2, 4)
        and v_bits in (1, 2, 4)
        and k_term is None
        and d % 16 == 0
    )


def codebook_decode_attention(
    q_rot: mx.array,
    k_packed: mx.array,
    k_norm: mx.array,
    k_centroids: mx.array,
    k_bits: int,
    v_packed: mx.array,
    v_norm: mx.array,
    v_centroids: mx.array,
    v_bits: int,
    *,
    scale: float,
    length: int | None = None,
    lengths: mx.array | None = None,
    k_divisor: mx.array | None = None,
    k_unit: bool = False,
    k_term: KeyTerm | None = None,
    tail: DecodeTail | None = None,
    backend: str | None = None,
) -> tuple[mx.array, mx.array]:
    """Decode attention of rotated queries over scalar-codebook codes.

    Args:
        q_rot: fp32 (or fp16) [B, Hq, Lq, D], already rotated; Hq = g * Hkv (GQA).
        k_packed, v_packed: uint32 [B, Hkv, Lbuf, ceil(D*bits/32)] packed codes.
        k_norm, v_norm: float16 [B, Hkv, Lbuf].
        k_centroids, v_centroids: sorted fp32 [2**bits]; k_bits, v_bits in {1, 2, 3, 4}.
        scale: softmax scale.
        length: valid tokens at the front of the buffer for every batch row (default Lbuf);
            sent to the GPU as a fresh [B] array each call.
        lengths: int32 [B] valid tokens per batch row, already on the device (ragged batches;
            no host copy per call). At most one of ``length`` and ``lengths``.
        k_divisor: float16 [B, Hkv, Lbuf] dividing each key's norm (RaBitQ's <ō, o>), or None.
        k_unit: divide each key by the norm of its code vector ||k_centroids[idx]|| (RaBitQ's
            ō = v / ||v||). Keys are k_i = k_norm_i / k_divisor_i * c[idx_i] (/ ||c[idx_i]||).
        k_term: a :class:`KeyTerm` (TurboQuant-prod's residual sketch, a residual VQ's
            second pass): a second term of every score (the GPU runs the fp32 loop for it).
        tail: a :class:`~vq_kernels.DecodeTail`: ``q_rot`` is then the query in the original
            basis (one token per row) and the op returns the whole attention (compressed and
            exact tokens, rotated back, means added) from one launch; ``counts`` replaces
            ``length``/``lengths``. GPU: CUDA only (the merge runs in the kernel); on the
            "cpu" backend a tail runs the reference.

    Returns:
        out_rot fp32 [B, Hq, Lq, D] (softmax over these tokens, rotated basis; with a tail,
        the whole attention in the original basis, in q's dtype if float16) and
        lse fp32 [B, Hq, Lq], the natural log-sum-exp of the scaled scores.

    On a GPU one launch (``codebook_attn``, see :func:`~vq_kernels._attention.decode_launch`)
    reads every kv head's codes once for all its query rows. On the "cpu" backend native
    code (``cpu/codebook_attn.cpp``, built at first use with the system C++ compiler: see
    :mod:`vq_kernels.codebook_attention_cpu`) runs the same one pass over the codes, any
    head_dim; not inside ``mx.compile`` (it reads its inputs' values when called).
    """
    b, _, _, d = q_rot.shape
    _, hkv, lbuf, wk = k_packed.shape
    gqa_groups(q_rot, hkv)
    if length is not None and lengths is not None:
        raise ValueError("pass length or lengths, not both")
    if tail is not None:
        if length is not None or lengths is not None:
            raise ValueError("with a tail the valid counts come from tail.counts")
        tail.check(q_rot, hkv)
    n = None if lengths is not None else valid_length(length, lbuf)
    if wk != n_words(d, k_bits) or v_packed.shape[-1] != n_words(d, v_bits):
        raise ValueError("packed K/V widths do not match head_dim and bits")
    if k_divisor is not None and k_divisor.shape != k_norm.shape:
        raise ValueError(
            f"k_divisor must have k_norm's shape {k_norm.shape}, got {k_divisor.shape}"
        )
    if k_term is not None:
        k_term.check(q_rot, k_norm)
    be = resolve_backend(backend, op="codebook_decode_attention")
    if (
        be == "cpu"
        and tail is None
        and codebook_attention_cpu.available(explicit=explicit_choice(backend))
    ):
        return codebook_attention_cpu.codebook_attention_cpu(
            q_rot, k_packed, k_norm, k_centroids, k_bits, v_packed, v_norm, v_centroids, v_bits,
            scale=scale, lengths=n if lengths is None else batch_lengths(lengths, b, lbuf),
            k_divisor=k_divisor, k_unit=k_unit, k_term=k_term, explicit=True,
        )  # fmt: skip
    if be in ("reference", "cpu"):
        return codebook_decode_attention_reference(
            q_rot, k_packed, k_norm, k_centroids, k_bits, v_packed, v_norm, v_centroids, v_bits,
            scale=scale, length=n, lengths=lengths, k_divisor=k_divisor, k_unit=k_unit,
            k_term=k_term, tail=tail,
        )  # fmt: skip
    if d not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the codebook kernel needs head_dim in {KERNEL_HEAD_DIMS}, got {d}")
    inputs = [
        k_packed,
        k_norm.astype(mx.float16),
        k_centroids.astype(mx.float32),
        v_packed,
        v_norm.astype(mx.float16),
        v_centroids.astype(mx.float32),
        k_norm.astype(mx.float16) if k_divisor is None else k_divisor.astype(mx.float16),
    ]
    if k_term is None:
        inputs += [_placeholder(mx.float32), _placeholder(mx.uint32), _placeholder(mx.float16)]
        inputs.append(_placeholder(mx.float32))
    else:
        q2 = k_term.q_term
        q2 = q2 if q2.dtype in (mx.float16, mx.float32) else q2.astype(mx.float32)
        inputs += [q2, k_term.codes, k_term.norm.astype(mx.float16)]
        inputs.append(k_term.codebook.astype(mx.float32))
    extra, flags = no_tail_inputs() if tail is None else tail.inputs(q_rot, hkv)
    template = [("D", d), ("KB", k_bits), ("VB", v_bits)]
    template += [("KDIV", int(k_divisor is not None)), ("KUNIT", int(bool(k_unit))), *flags]
    term_bits, term_scale = (0, 0.0) if k_term is None else (k_term.bits, float(k_term.scale))
    template += [("K2", term_bits), ("K2SCALE", float_bits(term_scale))]
    mma = _mma_applies(be, d, k_bits, v_bits, k_divisor, k_unit, k_term)
    template += [("MMA", int(mma)), ("PF", _attention.MMA_PREFETCH if mma else 1)]
    if tail is not None:
        n, lens = None, tail.counts.astype(mx.int32)
    else:
        lens = None if lengths is None else batch_lengths(lengths, b, lbuf)
    return decode_launch(
        "codebook_attn", be, q_rot, inputs + extra, template, scale=scale, lbuf=lbuf, length=n,
        lengths=lens, tail=tail is not None,
    )  # fmt: skip
