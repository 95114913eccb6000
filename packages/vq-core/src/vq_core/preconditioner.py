"""Orthogonal preconditioners: rotate vectors before quantizing them, undo it after.

A random orthogonal ``R`` spreads a vector's energy evenly over its coordinates, so each
coordinate of a rotated unit vector follows the same known law (TurboQuant, arXiv
2504.19874, Lemma 1) and one fixed scalar codebook fits every coordinate. Inner products
survive rotation: ``<q, k> = <apply(q), apply(k)>``, which is what lets attention run in the
rotated basis.

Convention: ``apply(x) = x @ M`` and ``inverse(y) = y @ M.T`` for ``x [..., dim]``, where
``M = matrix`` is orthogonal. The random preconditioners are deterministic functions of the
seed; :class:`Dense` holds a given (e.g. calibrated) matrix. Every rotation is applied by
:func:`rotate`, which a compiled graph can also call with a preconditioner's
:attr:`~Preconditioner.graph_form` as inputs (one graph for every layer's rotation).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import mlx.core as mx

from vq_core.errors import ConfigError, ShapeError
from vq_core.streams import stream_key

# mx.hadamard_transform supports n = m * 2**k with m in this set (Sylvester and Paley sizes).
HADAMARD_BASES = (1, 12, 20, 28)


def _key(seed: int) -> mx.array:
    """The ``"rotation"`` stream of ``seed`` (:func:`vq_core.streams.stream_key`)."""
    return stream_key(seed, "rotation")


def rotate(x: mx.array, form: str, param: mx.array) -> mx.array:
    """``x [..., dim]`` rotated by the preconditioner whose ``graph_form`` is ``(form,
    param)``: ``"hadamard"`` (``param`` the signs s: ``H(x * s) / sqrt(dim)``), ``"dense"``
    (``param`` the matrix M: ``x @ M``) or ``"identity"`` (``param`` unused)."""
    if form == "hadamard":
        return mx.hadamard_transform(x * param.astype(x.dtype), scale=x.shape[-1] ** -0.5)
    if form == "dense":
        return x @ param.astype(x.dtype)
    if form == "identity":
        return x
    raise ConfigError(f"rotation form {form!r} is not one of hadamard, dense, identity")


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim < 2:
        raise ConfigError(f"head_dim={dim!r} is not allowed; expected an integer >= 2")


class Preconditioner(ABC):
    """An orthogonal transform of the last axis, ``[..., dim] -> [..., dim]``."""

    name: str
    dim: int
    seed: int

    @abstractmethod
    def apply(self, x: mx.array) -> mx.array:
        """Rotate ``x [..., dim]``."""

    @abstractmethod
    def inverse(self, y: mx.array) -> mx.array:
        """Undo :meth:`apply` on ``y [..., dim]``."""

    @property
    @abstractmethod
    def matrix(self) -> mx.array:
        """The dense ``[dim, dim]`` matrix ``M`` with ``apply(x) == x @ M``."""

    @property
    @abstractmethod
    def graph_form(self) -> tuple[str, mx.array]:
        """``(form, param)`` with ``apply(x) == rotate(x, form, param)``."""

    def _check(self, x: mx.array) -> None:
        if x.shape[-1] != self.dim:
            raise ShapeError(f"{self.name}: expected last dimension {self.dim}, got {x.shape}")


def hadamard_supported(dim: int) -> bool:
    """True when ``dim = m * 2**k`` with ``m`` in :data:`HADAMARD_BASES`."""
    for m in HADAMARD_BASES:
        if dim % m == 0:
            q = dim // m
            if q & (q - 1) == 0:
                return True
    return False


class RandomizedHadamard(Preconditioner):
    """``M = diag(s) · H / sqrt(dim)`` with random signs ``s`` and a Hadamard matrix ``H``.

    Works for ``dim = m * 2**k``, ``m`` in {1, 12, 20, 28}: 64, 80, 96, 112, 128, 256 and
    more. Costs O(dim log dim) per vector through ``mx.hadamard_transform``.
    """

    name = "hadamard"

    def __init__(self, dim: int, seed: int = 0):
        _check_dim(dim)
        if not hadamard_supported(dim):
            raise ConfigError(
                f"head_dim={dim} has no Hadamard matrix here (needs m * 2**k, m in "
                f"{HADAMARD_BASES}); use the 'orthogonal' preconditioner instead"
            )
        self.dim, self.seed = dim, seed
        key = _key(seed)
        self.signs = mx.where(mx.random.bernoulli(0.5, (dim,), key=key), 1.0, -1.0)
        self._scale = 1.0 / math.sqrt(dim)
        h = mx.hadamard_transform(mx.eye(dim), scale=self._scale)
        self._symmetric = bool(mx.array_equal(h, h.T).item())
        self._h = h

    def apply(self, x: mx.array) -> mx.array:
        self._check(x)
        return rotate(x, "hadamard", self.signs)

    def inverse(self, y: mx.array) -> mx.array:
        self._check(y)
        if self._symmetric:
            z = mx.hadamard_transform(y, scale=self._scale)
        else:
            z = y @ self._h.T.astype(y.dtype)
        return z * self.signs.astype(z.dtype)

    @property
    def matrix(self) -> mx.array:
        return self.signs[:, None] * self._h

    @property
    def graph_form(self) -> tuple[str, mx.array]:
        return "hadamard", self.signs


class Dense(Preconditioner):
    """A given orthogonal ``M [dim, dim]`` (a calibrated rotation, e.g. SpectralQuant's PCA
    basis); ``seed`` is 0."""

    name = "dense"

    def __init__(self, matrix: mx.array, seed: int = 0):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ShapeError(f"a dense rotation must be a square matrix, got {matrix.shape}")
        _check_dim(matrix.shape[0])
        self.dim, self.seed = matrix.shape[0], seed
        self._m = matrix

    def apply(self, x: mx.array) -> mx.array:
        self._check(x)
        return rotate(x, "dense", self._m)

    def inverse(self, y: mx.array) -> mx.array:
        self._check(y)
        return rotate(y, "dense", self._m.T)

    @property
    def matrix(self) -> mx.array:
        return self._m

    @property
    def graph_form(self) -> tuple[str, mx.array]:
        return "dense", self._m


class RandomOrthogonal(Dense):
    """A Haar-random dense orthogonal ``M`` (QR of a Gaussian matrix, signs fixed). Any dim."""

    name = "orthogonal"

    def __init__(self, dim: int, seed: int = 0):
        _check_dim(dim)
        g = mx.random.normal((dim, dim), key=_key(seed))
        q, r = mx.linalg.qr(g, stream=mx.cpu)
        super().__init__(q * mx.sign(mx.diagonal(r))[None, :], seed)


class Identity(Preconditioner):
    """No rotation (for baselines and ablations)."""

    name = "identity"

    def __init__(self, dim: int, seed: int = 0):
        _check_dim(dim)
        self.dim, self.seed = dim, seed

    def apply(self, x: mx.array) -> mx.array:
        self._check(x)
        return x

    def inverse(self, y: mx.array) -> mx.array:
        self._check(y)
        return y

    @property
    def matrix(self) -> mx.array:
        return mx.eye(self.dim)

    @property
    def graph_form(self) -> tuple[str, mx.array]:
        return "identity", mx.zeros((self.dim,))


PRECONDITIONERS = {c.name: c for c in (RandomizedHadamard, RandomOrthogonal, Identity)}


def make_preconditioner(name: str, dim: int, seed: int = 0) -> Preconditioner:
    """Build a preconditioner by name: ``"hadamard"``, ``"orthogonal"`` or ``"identity"``."""
    if name not in PRECONDITIONERS:
        raise ConfigError(
            f"rotation={name!r} is not allowed; expected one of {list(PRECONDITIONERS)}"
        )
    return PRECONDITIONERS[name](dim, seed)
