"""The Quantizer abstraction: vectors ``[..., head_dim]`` in, packed codes out.

A method is a frozen config dataclass plus a Quantizer subclass; both are registered under
one name (see :mod:`vq_core.registry`). Codes are named arrays whose leading dimensions are
the input's leading dimensions (``x.shape[:-1]``), so a cache can store and slice them along
the token axis without knowing the method.

Attention contract (shapes after grouped-query folding, ``M = queries per KV head``):

* ``scores(q [B, Hkv, M, D], codes [B, Hkv, L, ...]) -> [B, Hkv, M, L]`` (unscaled ``q·k̂``)
* ``weighted_sum(p [B, Hkv, M, L], codes) -> [B, Hkv, M, D]`` (``Σ_i p_i v̂_i``)

The defaults decode then multiply; methods override them with compressed-domain versions.
Fused kernels for a (key format, value format) pair are not methods of either quantizer:
they are registered in :mod:`vq_core.compressed_attention`'s table.

Position-aware methods (``position_aware = True``, e.g. CommVQ's RoPE-commuting codebooks)
encode keys in a position-free basis and need each token's position: ``encode``, ``decode``
and ``scores`` then take ``start``, the position of the first token along the token axis
(``-2``); token ``t`` is at ``start + t``. Other methods never receive ``start``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx

from vq_core.errors import invalid
from vq_core.validation import FLOAT_DTYPES as FLOAT_DTYPES  # re-exported
from vq_core.validation import (
    HeadDims,
    check_axis,
    check_bits,
    check_codes,
    check_probabilities,
    check_queries,
    check_seed,
    check_values,
    check_vectors,
    empty_like_layout,
    storable,
)


@dataclass(frozen=True)
class QuantizerConfig:
    """Base config: every method has at least ``head_dim``, ``bits`` and ``seed``.

    Subclasses add fields and extend :meth:`validate`; ``version`` changes when a saved
    code layout or artifact of the method would no longer load.
    """

    version: ClassVar[int] = 1
    allowed_bits: ClassVar[tuple[int, ...]] = (1, 2, 3, 4)
    # The head_dims the method takes; methods narrow it (a config may add rules that depend
    # on its other fields, e.g. a group size dividing head_dim, in validate()).
    head_dims: ClassVar[HeadDims] = HeadDims()
    method_name: ClassVar[str | None] = None  # set by vq_core.register, for messages

    head_dim: int = 128
    bits: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        method = self.method_name
        self.head_dims.check(self.head_dim, method=method)
        check_bits(self.bits, self.allowed_bits, method=method)
        check_seed(self.seed, method=method)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Codes(dict):
    """Named packed arrays for a batch of vectors; ``nbytes`` is the bytes really held."""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.values())

    def map(self, fn) -> Codes:
        """Apply ``fn`` to every array (slicing, concatenation, evaluation)."""
        return Codes({k: fn(k, v) for k, v in self.items()})


class Quantizer(ABC):
    """Encode ``[..., head_dim]`` float vectors to :class:`Codes` and back.

    Class attributes a method sets: ``method`` (registry name), ``config_class``, and
    optionally ``token_block`` (tokens that must be encoded together, e.g. KIVI's
    per-channel key groups; a cache flushes whole blocks), ``default_value_method`` (what
    compresses the values next to these keys) and ``keys_only`` (the method cannot compress
    values at all, e.g. RoPE-commuting key codebooks).
    """

    method: ClassVar[str]
    config_class: ClassVar[type[QuantizerConfig]]
    family: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    token_block: ClassVar[int] = 1
    position_aware: ClassVar[bool] = False
    default_value_method: ClassVar[str | None] = None
    keys_only: ClassVar[bool] = False
    # Stated bound on E||x - x̂||² / E||x||² per bit width (Gaussian x, head_dim 128).
    round_trip_bound: ClassVar[dict[int, float]] = {}

    def __init__(self, config: QuantizerConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.method} needs a {self.config_class.__name__}, got {config!r}")
        self.config = config

    @classmethod
    def from_config(cls, config: QuantizerConfig) -> Quantizer:
        """What :func:`vq_core.create` calls: the quantizer for ``config``. Calibrated
        methods override it to load their artifact's tensors (constructors take tensors,
        never paths)."""
        return cls(config)

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def accepts_centering(self) -> bool:
        """Whether a cache may subtract a per-head mean before encoding. Not for calibrated
        codebooks (they model the raw vectors they were trained on) nor position-aware ones
        (a mean of post-RoPE keys is not a mean in the pre-RoPE basis they encode in)."""
        return not (self.needs_calibration or self.position_aware)

    # -- encoding --------------------------------------------------------------------------

    def encode(self, x: mx.array, *, check_finite: bool = True, start: int = 0) -> Codes:
        """Encode ``x [..., head_dim]`` (fp16/bf16/fp32) into packed codes.

        ``check_finite`` forces an evaluation to reject NaN/Inf and values the codes cannot
        store (:attr:`max_norm`, :attr:`max_abs`); the cache turns it off on the decode hot
        path, where such input is not checked (NaN/Inf then reach attention as NaN/Inf).
        ``start``: position of ``x[..., 0, :]`` (position-aware methods only; checked but
        ignored by the others). Zero vectors in give zero-size codes out.
        """
        self.check_input(x, "x", check_finite=check_finite)
        start = _check_start(start)
        if x.size == 0:
            return Codes(empty_like_layout(tuple(x.shape[:-1]), self.field_layout()))
        x = x.astype(mx.float32)
        if self.position_aware:
            return self._encode(x, start=start)
        return self._encode(x)

    def decode(self, codes: Codes, *, start: int = 0) -> mx.array:
        """Reconstruct float32 ``[..., head_dim]`` from codes (``start`` as in encode)."""
        lead = self.check_codes(codes)
        start = _check_start(start)
        if math.prod(lead) == 0:
            return mx.zeros((*lead, self.head_dim))
        codes = Codes(codes)
        if self.position_aware:
            return self._decode(codes, start=start)
        return self._decode(codes)

    @abstractmethod
    def _encode(self, x: mx.array) -> Codes:
        """``x`` float32 ``[..., D]`` (validated) -> codes."""

    @abstractmethod
    def _decode(self, codes: Codes) -> mx.array:
        """codes -> float32 ``[..., D]``."""

    @abstractmethod
    def field_layout(self) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
        """Per code field: (trailing shape per vector, dtype). Defines the exact accounting."""

    def token_strides(self) -> dict[str, int]:
        """Fields stored once per ``token_block`` tokens instead of once per token."""
        return {}

    def tokens_in(self, codes: Codes, axis: int = 2) -> int:
        """Number of tokens held by ``codes`` along ``axis`` (2 for ``[B, H, L, ...]``)."""
        lead = self.check_codes(codes)
        return lead[check_axis(axis, len(lead), method=self.method)]

    @property
    def bits_per_element(self) -> float:
        """Exact bits per input element, including norms, scales and side information."""
        strides = self.token_strides()
        total = 0.0
        for name, (shape, dtype) in self.field_layout().items():
            total += math.prod(shape) * dtype.size * 8 / strides.get(name, 1)
        return total / self.head_dim

    # -- attention in the compressed domain ------------------------------------------------

    def scores(self, q: mx.array, codes: Codes, *, start: int = 0) -> mx.array:
        """``q [B, H, M, D]`` against codes ``[B, H, L, ...]`` -> ``[B, H, M, L]``.

        The leading dimensions of ``q`` and the codes must match (no broadcasting); NaN/Inf
        in ``q`` are not checked and reach the scores as IEEE arithmetic puts them, as in
        decode-then-matmul. ``start`` as in :meth:`encode`.
        """
        lead = self.check_codes(codes)
        check_queries("q", q, lead, self.head_dim, method=self.method)
        start = _check_start(start)
        if q.size == 0 or lead[-1] == 0:
            return mx.zeros((*q.shape[:-1], lead[-1]))
        codes = Codes(codes)
        if self.position_aware:
            return self._scores(q, codes, start=start)
        return self._scores(q, codes)

    def weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """``p [B, H, M, L]`` over codes ``[B, H, L, ...]`` -> ``[B, H, M, D]`` (``p`` float,
        shapes matched as in :meth:`scores`; L = 0 sums to zeros)."""
        lead = self.check_codes(codes)
        check_probabilities("p", p, lead, method=self.method)
        if p.size == 0:
            return mx.zeros((*p.shape[:-1], self.head_dim))
        return self._weighted_sum(p, Codes(codes))

    def _scores(self, q: mx.array, codes: Codes, **position) -> mx.array:
        """Validated, non-empty ``scores`` (``start=`` for position-aware methods); the
        default decodes then multiplies."""
        return q.astype(mx.float32) @ mx.swapaxes(self._decode(codes, **position), -1, -2)

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """Validated, non-empty ``weighted_sum``; the default decodes then multiplies."""
        return p.astype(mx.float32) @ self._decode(codes)

    # -- validation and description --------------------------------------------------------

    # Largest vector norm / entry magnitude the codes can store (float16 side fields), or
    # None; encode refuses larger input when it checks values (check_finite).
    max_norm: ClassVar[float | None] = None
    max_abs: ClassVar[float | None] = None

    def check_input(self, x: mx.array, name: str, *, check_finite: bool = True) -> None:
        """``x [..., head_dim]`` float; with ``check_finite`` also its values (one sync)."""
        check_vectors(name, x, self.head_dim, method=self.method)
        if check_finite:
            check_values(name, x, method=self.method, max_norm=self.max_norm, max_abs=self.max_abs)

    def storable(self, x: mx.array) -> mx.array:
        """Lazy bool scalar: ``x`` is finite and its codes can hold it (no host sync)."""
        return storable(x, max_norm=self.max_norm, max_abs=self.max_abs)

    def check_codes(self, codes: Codes) -> tuple[int, ...]:
        """Codes against :meth:`field_layout` (shapes and dtypes only); their leading shape."""
        return check_codes(codes, self.field_layout(), self.token_strides(), method=self.method)

    def describe(self) -> dict[str, Any]:
        """Method name, config and version: enough to rebuild it with ``create``."""
        return {
            "method": self.method,
            "version": self.config_class.version,
            "config": self.config.to_dict(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _check_start(start: int) -> int:
    if type(start) is not int or start < 0:
        raise invalid("start", start, "a token position (an integer >= 0)")
    return start
