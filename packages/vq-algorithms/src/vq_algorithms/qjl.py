"""QJL: 1-bit quantized Johnson–Lindenstrauss keys (Zandieh et al., arXiv 2406.03482).

A sketch ``S [m, d]`` with N(0, 1) rows maps a key to ``m`` sign bits ``sign(S k)``; the
key's norm is kept in float16. For any query, Lemma 3.2 (Sec. 3) gives the unbiased
estimator ``<q, k> = E[ sqrt(π/2)/m · ||k|| · <S q, sign(S k)> ]``: the query is sketched
but never quantized, so the estimate is unbiased for every ``q`` while the key costs
``m + 16`` bits (``m`` rounded up to whole words). ``decode`` returns the same estimator as a vector,
``k̂ = sqrt(π/2)/m · ||k|| · S^T sign(S k)``, so ``q·k̂`` is the estimate exactly.

``orthogonal=True`` (the default) orthogonalizes the rows of each
block of ``d`` rows and gives row ``i`` the length of the Gaussian row it came from
(orthogonal random features, Yu et al. 2016): each row is still exactly N(0, I_d), so the
estimator stays unbiased, but the rows of a block no longer overlap. The round-trip error
is then ``E||k̂ - k||² / ||k||² = (π/2 - 1)·d/m`` (0.571 at ``m = d``, 0.285 at ``m = 2d``;
``m`` a multiple of ``d``), against ``(π/2·d - 1)/m`` (1.56 at ``m = d``) for i.i.d.
Gaussian rows. That variance is the point of the method: it is unbiased, not
accurate per vector, and its attention error averages out over many keys (the paper pairs
it with exact or outlier-kept channels; here it is the plain estimator). The stated
``round_trip_bound`` is for the default sketch (``m = d``, orthogonal).

Codes for ``k [..., d]``: ``signs`` uint32 ``[..., ceil(m/32)]`` (bit ``i`` of the stream
is 1 where ``(S k)_i >= 0``, vq_core packing layout) and ``norm`` float16 ``[...]``:
``32·ceil(m/32)/d + 16/d`` bits per element (1.125 at ``m = d = 128``). Keys only: values
default to ``turboquant_mse``. Scores sketch the query once (``S q``, ``[B, H, M, m]``) and
contract it with the ±1 signs. On a GPU (``sketch_dim == head_dim``, TurboQuant-MSE values)
vq-kernels' codebook kernel runs the whole segment: 1-bit codes with the codebook ±1, the
norms, and the sketched query scaled by ``sqrt(π/2)/m``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mlx.core as mx

from vq_algorithms._fused import (
    CODEBOOK_OP,
    codebook_decode_with_turboquant_values,
    codebook_keys_with_turboquant_values,
    kernel_applies,
    query_dtype,
    sign_codebook,
    tail_applies,
)
from vq_algorithms._sign_sketch import gaussian_sketch
from vq_core import (
    FLOAT16_MAX,
    Codes,
    CompressedSide,
    HeadDims,
    Quantizer,
    QuantizerConfig,
    check_bool,
    check_int,
    pack,
    packed_words,
    register,
    register_compressed_attention,
    register_decode_attention,
    stream_key,
    unpack,
)


@dataclass(frozen=True)
class QJLConfig(QuantizerConfig):
    """``sketch_dim`` m (``None``: ``head_dim``); ``orthogonal`` rows per block of d rows."""

    allowed_bits = (1,)
    # One sketch's error concentrates as d grows: over 16 seeds (m = d) it spans 0.53-0.63
    # at d = 32 but 0.46-0.80 at d = 12 and up to 1.2 at d = 5 (the bound 0.60 is for d = 128).
    head_dims = HeadDims(minimum=32)
    bits: int = 1
    sketch_dim: int | None = None
    orthogonal: bool = True

    def __post_init__(self) -> None:
        if self.sketch_dim is None and isinstance(self.head_dim, int):
            object.__setattr__(self, "sketch_dim", self.head_dim)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        m = self.sketch_dim
        check_int("sketch_dim", m, low=1, high=8 * self.head_dim, method="qjl")
        check_bool("orthogonal", self.orthogonal, method="qjl")


@register
class QJL(Quantizer):
    method = "qjl"
    config_class = QJLConfig
    family = "1-bit sketch (unbiased inner products)"
    max_norm = FLOAT16_MAX  # norms are stored as float16
    default_value_method = "turboquant_mse"
    # π/2 - 1 = 0.571 expected at m = d (orthogonal); seeds 0..63 measured 0.558..0.584.
    round_trip_bound = {1: 0.60}

    def __init__(self, config: QJLConfig):
        super().__init__(config)
        self.m = config.sketch_dim
        key = stream_key(config.seed, "sketch")
        self.sketch = gaussian_sketch(self.m, config.head_dim, key, config.orthogonal)
        self.scale = math.sqrt(math.pi / 2) / self.m

    def field_layout(self):
        return {"signs": ((packed_words(self.m, 1),), mx.uint32), "norm": ((), mx.float16)}

    def _encode(self, x: mx.array) -> Codes:
        bits = (x @ self.sketch.T >= 0).astype(mx.uint32)  # [..., m]
        norm = mx.linalg.norm(x, axis=-1)
        return Codes({"signs": pack(bits, 1), "norm": norm.astype(mx.float16)})

    def signs(self, codes: Codes) -> mx.array:
        """±1 float32 ``[..., m]`` from the packed sign bits."""
        return unpack(codes["signs"], 1, self.m).astype(mx.float32) * 2 - 1

    def _weights(self, codes: Codes) -> mx.array:
        """``sqrt(π/2)/m · ||k||`` per key, float32 ``[...]``."""
        return codes["norm"].astype(mx.float32) * self.scale

    def _decode(self, codes: Codes) -> mx.array:
        return (self.signs(codes) * self._weights(codes)[..., None]) @ self.sketch

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        """``sqrt(π/2)/m · ||k_i|| · <S q, sign(S k_i)>``: ``S q`` once per query."""
        sq = q.astype(mx.float32) @ self.sketch.T  # [B, H, M, m]
        s = sq @ mx.swapaxes(self.signs(codes), -1, -2)  # [B, H, M, L]
        return s * self._weights(codes)[..., None, :]

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """``(Σ_i p_i w_i sign(S k_i)) S``: accumulate in the sketch space, map back once."""
        pw = p.astype(mx.float32) * self._weights(codes)[..., None, :]
        return (pw @ self.signs(codes)) @ self.sketch


def fused_qjl_attention(
    q: mx.array, keys: CompressedSide, values: CompressedSide, *, scale: float
) -> tuple[mx.array, mx.array] | None:
    """QJL keys with TurboQuant-MSE values in vq-kernels' codebook kernel: the query is
    sketched once (``sqrt(π/2)/m · S q``), the signs are 1-bit codes over ±1 with the key
    norms. None when ``sketch_dim != head_dim`` (the kernel's key and value dims are one)
    and unless :func:`~vq_algorithms._fused.kernel_applies`."""
    kq = keys.quantizer
    if kq.m != kq.head_dim or not kernel_applies(kq.head_dim, q.shape[2], CODEBOOK_OP):
        return None
    q_keys = (q.astype(mx.float32) @ kq.sketch.T) * kq.scale
    return codebook_keys_with_turboquant_values(
        q_keys, keys.codes["signs"], sign_codebook(), 1, keys, values, scale=scale
    )


@functools.lru_cache(maxsize=4096)
def _query_sketch(quantizer, dtype=mx.float32) -> mx.array:
    """``[D, m]``: the query's sketch as one matrix, ``q_keys = q @ it``, in ``dtype``
    (built once)."""
    m = mx.contiguous((quantizer.sketch.T.astype(mx.float32) * quantizer.scale).astype(dtype))
    mx.eval(m)
    return m


def fused_qjl_decode(queries: mx.array, keys, values, *, scale: float) -> mx.array | None:
    """A whole decode step over QJL keys and TurboQuant-MSE values in one launch (CUDA);
    None when ``sketch_dim != head_dim`` and unless
    :func:`~vq_algorithms._fused.tail_applies`."""
    kq = keys.quantizer
    if kq.m != kq.head_dim or not tail_applies(queries, keys, values):
        return None
    return codebook_decode_with_turboquant_values(
        queries, _query_sketch(kq, query_dtype(queries)), keys.codes["signs"], sign_codebook(), 1,
        keys, values, scale=scale,
    )  # fmt: skip


register_compressed_attention("qjl", "turboquant_mse", fused_qjl_attention)
register_decode_attention("qjl", "turboquant_mse", fused_qjl_decode)
