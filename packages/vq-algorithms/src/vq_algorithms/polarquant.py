"""PolarQuant (Han, Kacham, Karbasi, Mirrokni, Zandieh; arXiv 2502.02617).

Section 3: precondition with a random rotation ``y = x @ R`` (here the orthogonal
preconditioner of :mod:`vq_core.preconditioner`, Hadamard with random signs where the size
allows), then apply the recursive polar transform over ``L`` levels: level 1 turns each
coordinate pair ``(y_2j, y_2j+1)`` into an angle ``θ ∈ [0, 2π)`` and a radius; level
``ℓ >= 2`` pairs the radii of level ``ℓ-1`` into ``ψ = atan2(r_odd, r_even) ∈ [0, π/2]`` and
a radius. What is left is ``D / 2**L`` radii (kept in float16, as in the paper) plus angles.
For a rotated vector the angles are independent with known laws (Section 3): level 1
uniform on [0, 2π), level ``ℓ`` with density ∝ ``sin^(2**(ℓ-1) - 1)(2ψ)``, concentrated at
π/4. Each level gets the Lloyd–Max codebook of its law (the paper's offline codebooks,
computed from the known distributions; its online, per-prompt k-means variant is not
implemented), so no scale or zero point is stored.

Bits per angle (``bits`` caps the average bits per element; bits per angle at levels 1..L):

* ``bits=4``: the paper's split (its experiments), ``L = 4``, 4 bits at level 1 and 2 bits at
  levels 2–4: ``4/2 + 2/4 + 2/8 + 2/16 = 2.875`` angle bits + ``16/16`` radius bits =
  **3.875** bits per element. ``head_dim`` a multiple of 16.
* ``bits=3``: ``L = 5``, split (3, 2, 2, 2, 2): ``2.4375`` angle bits + ``16/32`` radius
  bits = 2.9375 bits per element. ``head_dim`` a multiple of 32. (Measured alternatives at
  head_dim 128: (2, 2, 2, 2) costs 2.875 bits for 3x the error; a 2-bit level 1 is what
  hurts, since level 1 carries half the angles.)

Codes for ``x [..., D]``: ``angles`` uint8 ``[..., ceil(A / 8)]`` — one little-endian bit
stream of the level-1 codes, then level 2, ... (each code LSB first), ``A = Σ_ℓ b_ℓ D / 2**ℓ``
bits — and ``radius`` float16 ``[..., D / 2**L]``. At D=128, bits=4 that is exactly
46 + 16 bytes = 3.875 bits per element.

Attention stays in the rotated basis (rotate the query once, the output once); the
reference rebuilds the rotated keys/values from the angle codebooks without rotating them
back. A kernel would instead look up ``q'_pair · (cos θ_k, sin θ_k)`` in a per-query table.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

import mlx.core as mx

from vq_algorithms._rotated_codebook import RotatedConfig, default_rotation
from vq_core import (
    FLOAT16_MAX,
    Codes,
    ConfigError,
    Quantizer,
    ScalarCodebook,
    make_preconditioner,
    pack_stream,
    register,
    unpack_stream,
)

# bits -> bits per angle at levels 1..L.
LEVEL_BITS: dict[int, tuple[int, ...]] = {4: (4, 2, 2, 2), 3: (3, 2, 2, 2, 2)}


@cache
def angle_codebook(level: int, bits: int, grid: int = 1 << 14) -> tuple[float, ...]:
    """Lloyd–Max centroids for the level-``level`` polar angle (Lemma 2), sorted.

    Level 1 is uniform on [0, 2π), whose optimal codebook is the uniform grid of cell
    centres; level ``ℓ >= 2`` has density ∝ ``sin(2ψ)^(2**(ℓ-1) - 1)`` on [0, π/2].
    """
    k = 1 << bits
    if level == 1:
        return tuple((i + 0.5) * 2 * math.pi / k for i in range(k))
    expo = (1 << (level - 1)) - 1
    step = (math.pi / 2) / grid
    xs = [(i + 0.5) * step for i in range(grid)]
    ws = [math.sin(2 * v) ** expo for v in xs]
    cents = [(i + 0.5) * (math.pi / 2) / k for i in range(k)]
    for _ in range(500):
        bounds = [0.5 * (a + b) for a, b in itertools.pairwise(cents)]
        mass, first = [0.0] * k, [0.0] * k
        cell = 0
        for v, w in zip(xs, ws, strict=False):
            while cell < k - 1 and v >= bounds[cell]:
                cell += 1
            mass[cell] += w
            first[cell] += w * v
        new = [f / m if m > 0 else c for f, m, c in zip(first, mass, cents, strict=False)]
        shift = max(abs(a - b) for a, b in zip(new, cents, strict=False))
        cents = new
        if shift < 1e-12:
            break
    return tuple(cents)


def polar_transform(y: mx.array, depth: int) -> tuple[list[mx.array], mx.array]:
    """``y [..., D]`` -> (angles per level ``[..., D / 2**ℓ]``, radii ``[..., D / 2**L]``)."""
    r, angles = y, []
    for level in range(1, depth + 1):
        even, odd = r[..., 0::2], r[..., 1::2]
        a = mx.arctan2(odd, even)
        if level == 1:
            a = mx.where(a < 0, a + 2 * math.pi, a)
        angles.append(a)
        r = mx.sqrt(even * even + odd * odd)
    return angles, r


def inverse_polar(angles: list[mx.array], radius: mx.array) -> mx.array:
    """Undo :func:`polar_transform`: radii ``[..., D / 2**L]`` and angles -> ``[..., D]``."""
    r = radius
    for a in reversed(angles):
        r = mx.stack([r * mx.cos(a), r * mx.sin(a)], axis=-1).reshape(*a.shape[:-1], -1)
    return r


@dataclass(frozen=True)
class PolarQuantConfig(RotatedConfig):
    """``bits``: 4 (the paper's 3.875-bit split) or 3 (2.9375 bits); see the module doc."""

    allowed_bits = (3, 4)

    def validate(self) -> None:
        super().validate()
        block = 1 << len(LEVEL_BITS[self.bits])
        if self.head_dim % block:
            raise ConfigError(
                f"polarquant: head_dim={self.head_dim} is not a multiple of {block}; the "
                f"{len(LEVEL_BITS[self.bits])}-level polar transform works on blocks of {block}"
            )


@register
class PolarQuant(Quantizer):
    method = "polarquant"
    config_class = PolarQuantConfig
    family = "rotation + polar angles"
    max_norm = FLOAT16_MAX  # norms (radii) are stored as float16
    # Measured on N(0,1) at head_dim 128 (3 seeds): 0.0714-0.0717 (bits=3), 0.0319-0.0322
    # (bits=4), plus ~8% margin.
    round_trip_bound = {3: 0.078, 4: 0.035}

    def __init__(self, config: PolarQuantConfig):
        super().__init__(config)
        self.level_bits = LEVEL_BITS[config.bits]
        self.depth = len(self.level_bits)
        self.rotation = make_preconditioner(
            default_rotation(config.head_dim, config.rotation), config.head_dim, config.seed
        )
        self.codebooks = [
            ScalarCodebook(angle_codebook(level, b)) for level, b in enumerate(self.level_bits, 1)
        ]
        self.counts = [config.head_dim >> level for level in range(1, self.depth + 1)]
        self.angle_bits = sum(n * b for n, b in zip(self.counts, self.level_bits, strict=False))

    def field_layout(self):
        return {
            "angles": ((-(-self.angle_bits // 8),), mx.uint8),
            "radius": ((self.head_dim >> self.depth,), mx.float16),
        }

    # -- codes <-> rotated vectors ---------------------------------------------------------

    def _pack_angles(self, idx: list[mx.array]) -> mx.array:
        """Per-level codes -> one bit stream in bytes (each code LSB first)."""
        words = pack_stream(list(zip(idx, self.level_bits, strict=False)))
        shifts = mx.array([0, 8, 16, 24], dtype=mx.uint32)
        octets = mx.bitwise_and(mx.right_shift(words[..., None], shifts), 0xFF)
        octets = octets.reshape(*words.shape[:-1], -1).astype(mx.uint8)
        return octets[..., : -(-self.angle_bits // 8)]

    def _unpack_angles(self, stream: mx.array) -> list[mx.array]:
        n_words = -(-self.angle_bits // 32)
        o = stream.astype(mx.uint32)
        o = mx.pad(o, [(0, 0)] * (o.ndim - 1) + [(0, 4 * n_words - o.shape[-1])])
        o = o.reshape(*o.shape[:-1], n_words, 4)
        words = mx.left_shift(o, mx.array([0, 8, 16, 24], dtype=mx.uint32)).sum(axis=-1)
        layout = list(zip(self.counts, self.level_bits, strict=False))
        return unpack_stream(words.astype(mx.uint32), layout)

    def _encode(self, x: mx.array) -> Codes:
        angles, radius = polar_transform(self.rotation.apply(x), self.depth)
        idx = [cb.quantize(a) for cb, a in zip(self.codebooks, angles, strict=False)]
        return Codes({"angles": self._pack_angles(idx), "radius": radius.astype(mx.float16)})

    def decode_rotated(self, codes: Codes) -> mx.array:
        """Codes -> the rotated reconstruction ``ŷ [..., D]`` (float32)."""
        idx = self._unpack_angles(codes["angles"])
        angles = [cb.dequantize(i) for cb, i in zip(self.codebooks, idx, strict=False)]
        return inverse_polar(angles, codes["radius"].astype(mx.float32))

    def _decode(self, codes: Codes) -> mx.array:
        return self.rotation.inverse(self.decode_rotated(codes))

    # -- attention in the rotated basis ----------------------------------------------------

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        """``(q R) · ŷ_i``: the query is rotated once, the keys never rotated back."""
        q_rot = self.rotation.apply(q.astype(mx.float32))
        return q_rot @ mx.swapaxes(self.decode_rotated(codes), -1, -2)

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """``(Σ_i p_i ŷ_i) Rᵀ``: accumulate in the rotated basis, rotate the output once."""
        return self.rotation.inverse(p.astype(mx.float32) @ self.decode_rotated(codes))
