"""Input checks shared by every quantizer and the cache: one helper per kind of argument.

Every check here reads Python values and array shapes and dtypes only, so it runs before
any MLX op and costs no host synchronization; :func:`check_values` alone looks at the
numbers (one synchronization), and only where a caller asks for it (``check_finite``).

Each failure is a vq error (:mod:`vq_core.errors`) naming the method, the argument, what it
got and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from vq_core.errors import (
    ConfigError,
    DTypeError,
    NonFiniteError,
    RangeError,
    ShapeError,
    invalid_choice,
)
from vq_core.preconditioner import hadamard_supported

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
FLOAT16_MAX = 65504.0  # largest finite float16: the ceiling of every float16 side field
MAX_SEED = 2**32  # seeds are offset per stage/rotation inside methods; keep them small ints
MAX_HEAD_DIM = 1024  # dense rotations hold D² floats and cost D³ to build


def _prefix(method: str | None) -> str:
    return f"{method}: " if method else ""


def is_int(value: object) -> bool:
    """An exact integer: ``bool`` (an int subclass) and integral floats do not count."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    name: str, value: object, *, low: int | None = None, high: int | None = None, method=None
) -> int:
    """``value`` as an exact int in ``[low, high]`` (either end optional)."""
    if (
        not is_int(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        if low is not None and high is not None:
            want = f"an integer in [{low}, {high}]"
        elif low is not None:
            want = f"an integer >= {low}"
        else:
            want = "an integer"
        raise ConfigError(f"{_prefix(method)}{name}={value!r} is not allowed; expected {want}")
    return value


def check_bool(name: str, value: object, *, method=None) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{_prefix(method)}{name}={value!r} is not allowed; expected a bool")
    return value


def check_choice(name: str, value: object, choices, *, method=None):
    """``value`` one of ``choices``, compared with its type (so ``2.0`` or ``True`` is not 2)."""
    invalid_choice(f"{_prefix(method)}{name}", value, choices)
    return value


def check_bits(bits: object, allowed, *, method=None) -> int:
    """``bits`` an exact int of ``allowed`` (``2.0`` and ``True`` are refused)."""
    return check_choice("bits", bits, allowed, method=method)


def check_seed(seed: object, *, method=None) -> int:
    return check_int("seed", seed, low=0, high=MAX_SEED - 1, method=method)


@dataclass(frozen=True)
class HeadDims:
    """The head_dims a method takes: an integer in ``[minimum, maximum]``, a multiple of
    ``multiple``, and with ``hadamard`` of the form ``m·2^k``, m in (1, 12, 20, 28) (the
    sizes ``mx.hadamard_transform`` has)."""

    minimum: int = 2
    maximum: int = MAX_HEAD_DIM
    multiple: int = 1
    hadamard: bool = False

    def describe(self) -> str:
        parts = [f"an integer in [{self.minimum}, {self.maximum}]"]
        if self.multiple > 1:
            parts.append(f"a multiple of {self.multiple}")
        if self.hadamard:
            parts.append("of the form m*2**k with m in (1, 12, 20, 28)")
        return ", ".join(parts)

    def check(self, head_dim: object, *, method=None) -> int:
        ok = (
            is_int(head_dim)
            and self.minimum <= head_dim <= self.maximum
            and head_dim % self.multiple == 0
            and (not self.hadamard or hadamard_supported(head_dim))
        )
        if not ok:
            raise ConfigError(
                f"{_prefix(method)}head_dim={head_dim!r} is not allowed; expected {self.describe()}"
            )
        return head_dim


def check_array(name: str, x: object, *, method=None, dtypes=FLOAT_DTYPES) -> mx.array:
    """``x`` an ``mx.array`` of one of ``dtypes``."""
    if not isinstance(x, mx.array):
        raise DTypeError(f"{_prefix(method)}{name} must be an mx.array, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("mlx.core.") for d in dtypes)
        raise DTypeError(f"{_prefix(method)}{name} has dtype {x.dtype}; expected {names}")
    return x


def check_vectors(name: str, x: object, head_dim: int, *, method=None) -> mx.array:
    """Float vectors ``[..., head_dim]`` (at least one axis)."""
    check_array(name, x, method=method)
    if x.ndim == 0 or x.shape[-1] != head_dim:
        raise ShapeError(
            f"{_prefix(method)}{name} has shape {tuple(x.shape)}; "
            f"the last dimension must be head_dim={head_dim}"
        )
    return x


def storable(x: mx.array, *, max_norm=None, max_abs=None) -> mx.array:
    """Lazy bool scalar (no sync): ``x`` is finite and within ``max_norm``/``max_abs``."""
    ok = mx.isfinite(x).all()
    if x.size and max_norm is not None:
        ok = ok & (mx.linalg.norm(x.astype(mx.float32), axis=-1).max() <= max_norm)
    if x.size and max_abs is not None:
        ok = ok & (mx.abs(x).max() <= max_abs)
    return ok


def check_values(name: str, x: mx.array, *, method=None, max_norm=None, max_abs=None) -> None:
    """NaN/Inf, and norms or entries past what the method stores, refused (one host sync).

    ``max_norm``: largest ``||x||`` along the last axis the codes can hold (float16 norms);
    ``max_abs``: largest ``|x_i|`` (float16 scales and offsets).
    """
    if x.size == 0 or storable(x, max_norm=max_norm, max_abs=max_abs).item():
        return
    if not mx.isfinite(x).all().item():
        raise NonFiniteError(f"{_prefix(method)}{name} contains NaN or Inf")
    if max_norm is not None:
        top = mx.linalg.norm(x.astype(mx.float32), axis=-1).max().item()
        if top > max_norm:
            raise RangeError(
                f"{_prefix(method)}{name} holds a vector of norm {top:.6g}; its codes keep "
                f"norms as float16, which holds at most {max_norm:g} (scale the input down)"
            )
    top = mx.abs(x).max().item()
    raise RangeError(
        f"{_prefix(method)}{name} holds an entry of magnitude {top:.6g}; its float16 scales "
        f"hold at most {max_abs:g} (scale the input down)"
    )


def check_codes(codes: object, layout: dict, strides: dict, *, method=None) -> tuple[int, ...]:
    """Codes against their declared ``field_layout``; returns the leading shape ``[..., L]``.

    Every field must be present (and no other), an ``mx.array`` of its declared dtype and
    trailing shape, and all fields must agree on the leading dimensions, the token axis
    (the last leading one) counting ``L // stride`` entries for a strided field.
    """
    pre = _prefix(method)
    if not isinstance(codes, dict):
        raise ShapeError(f"{pre}codes must be a dict of arrays (Codes), got {type(codes).__name__}")
    missing = sorted(set(layout) - set(codes))
    extra = sorted(set(codes) - set(layout))
    if missing or extra:
        raise ShapeError(
            f"{pre}codes have fields {sorted(codes)}; expected {sorted(layout)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {extra})" if extra else "")
        )
    lead: tuple[int, ...] | None = None
    first = ""
    for name, (trail, dtype) in layout.items():
        a = codes[name]
        if not isinstance(a, mx.array):
            raise DTypeError(f"{pre}codes field {name} must be an mx.array, got {type(a).__name__}")
        if a.dtype != dtype:
            raise DTypeError(f"{pre}codes field {name} has dtype {a.dtype}; expected {dtype}")
        k = len(trail)
        if a.ndim < k or tuple(a.shape[a.ndim - k :]) != tuple(trail):
            raise ShapeError(
                f"{pre}codes field {name} has shape {tuple(a.shape)}; its trailing shape per "
                f"vector must be {tuple(trail)}"
            )
        here = list(a.shape[: a.ndim - k])
        if here:
            here[-1] *= strides.get(name, 1)
        if lead is None:
            lead, first = tuple(here), name
        elif tuple(here) != lead:
            raise ShapeError(
                f"{pre}codes field {name} is for vectors {tuple(here)} but field {first} for "
                f"{lead} (fields must hold the same tokens)"
            )
    return lead or ()


def check_queries(name: str, q: object, lead: tuple[int, ...], head_dim: int, *, method=None):
    """``q [..., M, head_dim]`` against codes ``[..., L, ...]``: same leading dims but L."""
    check_vectors(name, q, head_dim, method=method)
    want = (*lead[:-1], "M", head_dim)
    if q.ndim != len(lead) + 1 or tuple(q.shape[:-2]) != tuple(lead[:-1]):
        raise ShapeError(
            f"{_prefix(method)}{name} has shape {tuple(q.shape)}; codes for {tuple(lead)} "
            f"tokens need {want}"
        )
    return q


def check_probabilities(name: str, p: object, lead: tuple[int, ...], *, method=None):
    """``p [..., M, L]`` over codes ``[..., L, ...]``."""
    check_array(name, p, method=method)
    if not lead:
        raise ShapeError(f"{_prefix(method)}codes hold a single vector; {name} needs tokens")
    want = (*lead[:-1], "M", lead[-1])
    if p.ndim != len(lead) + 1 or tuple(p.shape[:-2]) != lead[:-1] or p.shape[-1] != lead[-1]:
        raise ShapeError(
            f"{_prefix(method)}{name} has shape {tuple(p.shape)}; codes for {tuple(lead)} "
            f"tokens need {want}"
        )
    return p


def check_axis(axis: object, ndim: int, *, method=None) -> int:
    """A token axis of a ``ndim``-dimensional leading shape, as a non-negative index."""
    if not is_int(axis) or not -ndim <= axis < ndim:
        raise ShapeError(
            f"{_prefix(method)}axis={axis!r} is not allowed; codes have {ndim} leading "
            f"dimensions (an integer in [{-ndim}, {ndim - 1}])"
        )
    return axis % ndim


def empty_like_layout(lead: tuple[int, ...], layout: dict) -> dict[str, mx.array]:
    """Zero-size codes ``lead + trailing`` per field, for inputs without a single vector."""
    return {name: mx.zeros((*lead, *trail), dtype=dt) for name, (trail, dt) in layout.items()}


def size(shape) -> int:
    return math.prod(shape)
