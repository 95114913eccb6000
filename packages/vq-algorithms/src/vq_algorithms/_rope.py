"""Rotary position embedding (RoPE, arXiv 2104.09864) as a geometry: pairs and frequencies.

RoPE rotates each of ``P = D/2`` coordinate pairs ``(x[a_j], x[b_j])`` of a key at position
``m`` by the angle ``m·ω_j``. Written as complex numbers ``z_j = x[a_j] + i·x[b_j]`` it is
``z_j -> e^{i m ω_j} z_j``. :class:`RopeGeometry` holds the pairing (``perm``: the
coordinates in pair order, ``[a_0, b_0, a_1, b_1, ...]``) and ``ω`` ``[P]``; coordinates a
model leaves unrotated (partial rotary) are paired with ``ω = 0``.

:func:`probe_rope` reads the geometry off any ``rope(x, offset=...)`` callable (mlx-lm's
``nn.RoPE``, ``Llama3RoPE``, ...) by rotating basis vectors, then checks it reproduces the
callable at far positions, so a rope that is not a pure per-pair rotation (e.g. YaRN's
magnitude scaling) is refused instead of silently mis-modelled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx

from vq_core import ConfigError

_ANGLE_TABLES: dict[tuple[float, ...], tuple[mx.array, mx.array]] = {}


@dataclass(frozen=True)
class RopeGeometry:
    """``perm [D]`` (int32, pair order) and ``freqs [D/2]`` (float32, radians per token)."""

    perm: mx.array
    freqs: mx.array

    @classmethod
    def identity(cls, head_dim: int) -> RopeGeometry:
        """No rotation: consecutive pairs with ``ω = 0`` (values, untrained keys)."""
        return cls(mx.arange(head_dim, dtype=mx.int32), mx.zeros((head_dim // 2,)))

    @classmethod
    def standard(cls, head_dim: int, base: float, traditional: bool = False) -> RopeGeometry:
        """``nn.RoPE(head_dim, traditional, base)``: ``ω_j = base^(-2j/D)``; pairs ``(2j, 2j+1)``
        when ``traditional`` else ``(j, j + D/2)``."""
        p = head_dim // 2
        freqs = mx.array([base ** (-2.0 * j / head_dim) for j in range(p)], dtype=mx.float32)
        half = [c for j in range(p) for c in (j, j + p)]
        perm = list(range(head_dim)) if traditional else half
        return cls(mx.array(perm, dtype=mx.int32), freqs)

    @property
    def pairs(self) -> int:
        return self.freqs.shape[0]

    @property
    def inverse_perm(self) -> mx.array:
        return mx.argsort(self.perm).astype(mx.int32)

    def to_pairs(self, x: mx.array) -> mx.array:
        """``x [..., D]`` -> ``[..., P, 2]`` (real, imaginary) per pair."""
        z = mx.take(x, self.perm, axis=-1)
        return z.reshape(*x.shape[:-1], self.pairs, 2)

    def from_pairs(self, z: mx.array) -> mx.array:
        """Inverse of :meth:`to_pairs`."""
        flat = z.reshape(*z.shape[:-2], 2 * self.pairs)
        return mx.take(flat, self.inverse_perm, axis=-1)

    @cached_property
    def _key(self) -> tuple[float, ...]:
        return tuple(self.freqs.tolist())

    def cos_sin(self, n: int, start: int) -> tuple[mx.array, mx.array]:
        """``cos, sin [n, P]`` of the angles ``(start + t)·ω`` for ``t < n``.

        Read from a table shared by every geometry with these frequencies (every layer of a
        model, usually), grown in powers of two: the trigonometry was most of a decode step.
        """
        end = start + n
        table = _ANGLE_TABLES.get(self._key)
        if table is None or table[0].shape[0] < end:
            size = max(1024, 1 << max(end - 1, 1).bit_length())
            angle = mx.arange(size, dtype=mx.float32)[:, None] * self.freqs[None, :]
            table = (mx.cos(angle), mx.sin(angle))
            mx.eval(table)
            _ANGLE_TABLES[self._key] = table
        return table[0][start:end], table[1][start:end]

    def rotate_pairs(self, z: mx.array, start: int, inverse: bool = False) -> mx.array:
        """Rotate pairs ``z [..., n, P, 2]`` of tokens at ``start, start+1, ...``."""
        cos, sin = self.cos_sin(z.shape[-3], start)
        if inverse:
            sin = -sin
        re, im = z[..., 0], z[..., 1]
        return mx.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)

    def matches(self, other: RopeGeometry, tol: float = 1e-6) -> bool:
        return (
            self.perm.shape == other.perm.shape
            and mx.array_equal(self.perm, other.perm).item()
            and mx.allclose(self.freqs, other.freqs, rtol=tol, atol=tol).item()
        )


def probe_rope(rope: Callable[..., mx.array], head_dim: int) -> RopeGeometry:
    """The geometry of ``rope(x [B, H, L, D], offset=m)`` (pure per-pair rotation checked).

    Basis vector ``e_c`` at position 1 (and 37 and 4099, so a tiny or unlucky angle is still
    seen) lands in its pair partner's coordinate; the angle at position 1 is ``ω``.
    """
    eye = mx.eye(head_dim, dtype=mx.float32).reshape(1, head_dim, 1, head_dim)
    rotated = [
        rope(eye, offset=m).astype(mx.float32).reshape(head_dim, head_dim) for m in (1, 37, 4099)
    ]
    off = sum(mx.abs(r) for r in rotated) * (1 - mx.eye(head_dim))
    best, arg = off.max(axis=1).tolist(), mx.argmax(off, axis=1).tolist()
    partner = [j if m > 1e-5 else -1 for j, m in zip(arg, best, strict=True)]
    r1 = rotated[0].tolist()
    perm, freqs, seen = [], [], set()
    for a in range(head_dim):
        b = partner[a]
        if a in seen or b < 0:
            continue
        if partner[b] != a:
            raise ConfigError(f"rope: coordinate {a} rotates with {b} but {b} with {partner[b]}")
        lo, hi = (a, b) if a < b else (b, a)
        perm += [lo, hi]
        freqs.append(math.atan2(r1[lo][hi], r1[lo][lo]))
        seen |= {a, b}
    still = [c for c in range(head_dim) if c not in seen]  # unrotated coordinates
    for i in range(0, len(still) - 1, 2):
        perm += [still[i], still[i + 1]]
        freqs.append(0.0)
    if len(perm) != head_dim:
        raise ConfigError(f"rope: could not pair the {head_dim} coordinates of a key")
    geometry = RopeGeometry(mx.array(perm, dtype=mx.int32), mx.array(freqs, dtype=mx.float32))
    _check_reproduces(rope, geometry, head_dim)
    return geometry


def _check_reproduces(rope, geometry: RopeGeometry, head_dim: int) -> None:
    x = mx.random.normal((1, 1, 3, head_dim), key=mx.random.key(0))
    for offset in (1, 100, 2049):
        want = rope(x, offset=offset).astype(mx.float32)
        z = geometry.rotate_pairs(geometry.to_pairs(x), offset)
        got = geometry.from_pairs(z)
        err = mx.abs(got - want).max().item()
        if err > 1e-3 * max(mx.abs(want).max().item(), 1.0):
            raise ConfigError(
                f"rope: this model's rotary embedding is not a plain per-pair rotation "
                f"(mismatch {err:.3g} at position {offset}); RoPE-commuting codebooks need one"
            )
