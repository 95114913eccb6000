"""PolarQuant: exact bit split, lossless polar transform, angle laws and codebooks."""

import itertools
import math

import mlx.core as mx
import pytest

from vq_algorithms.polarquant import LEVEL_BITS, angle_codebook, inverse_polar, polar_transform
from vq_core import ConfigError, create


def _x(shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


def test_paper_split_is_3_875_bits_at_head_dim_128():
    q = create("polarquant", head_dim=128, bits=4)
    assert LEVEL_BITS[4] == (4, 2, 2, 2)
    # 64 x 4 + 32 x 2 + 16 x 2 + 8 x 2 = 368 angle bits = 46 bytes; 8 fp16 radii = 16 bytes.
    assert q.field_layout() == {"angles": ((46,), mx.uint8), "radius": ((8,), mx.float16)}
    assert q.bits_per_element == 3.875
    codes = q.encode(_x((5, 128)))
    assert codes.nbytes == 5 * (46 + 16)


def test_three_bit_split_fits_its_budget():
    q = create("polarquant", head_dim=128, bits=3)
    # (3, 2, 2, 2, 2): 192 + 64 + 32 + 16 + 8 = 312 bits = 39 bytes; 4 radii of 32 coords.
    assert q.field_layout() == {"angles": ((39,), mx.uint8), "radius": ((4,), mx.float16)}
    assert q.bits_per_element == 2.9375 <= 3


@pytest.mark.parametrize("levels", [1, 2, 4, 7])
def test_polar_transform_round_trip_is_exact_without_quantization(levels):
    y = _x((3, 7, 128), 1)
    angles, radius = polar_transform(y, levels)
    assert [a.shape[-1] for a in angles] == [128 >> lv for lv in range(1, levels + 1)]
    assert radius.shape == (3, 7, 128 >> levels)
    assert mx.allclose(inverse_polar(angles, radius), y, rtol=1e-5, atol=1e-5).item()


def test_angle_ranges_and_final_radius():
    y = _x((256, 128), 2)
    angles, radius = polar_transform(y, 4)
    assert angles[0].min().item() >= 0 and angles[0].max().item() < 2 * math.pi
    for a in angles[1:]:
        assert a.min().item() >= 0 and a.max().item() <= math.pi / 2
    block_norm = mx.linalg.norm(y.reshape(256, 8, 16), axis=-1)
    assert mx.allclose(radius, block_norm, rtol=1e-5).item()


def test_angles_concentrate_at_pi_over_4_as_lemma_2_says():
    # Level l >= 2 has density ∝ sin(2ψ)^(2^(l-1) - 1): mean π/4, spread shrinking with l.
    angles, _ = polar_transform(_x((4096, 128), 3), 5)
    spreads = []
    for a in angles[1:]:
        assert abs(a.mean().item() - math.pi / 4) < 0.01
        spreads.append(a.std().item())
    assert spreads == sorted(spreads, reverse=True)
    # Variance of ψ for density ∝ sin(2ψ) on [0, π/2] is π²/16 - 1/2.
    assert spreads[0] ** 2 == pytest.approx(math.pi**2 / 16 - 0.5, rel=0.03)


@pytest.mark.parametrize(("level", "bits"), [(2, 2), (3, 2), (4, 2), (2, 3)])
def test_codebooks_are_symmetric_and_beat_a_uniform_grid(level, bits):
    c = angle_codebook(level, bits)
    assert all(abs(a + b - math.pi / 2) < 1e-6 for a, b in zip(c, reversed(c), strict=True))
    angles, _ = polar_transform(_x((2048, 128), 4), level)
    a = angles[-1].reshape(-1)

    def mse(levels):
        cb = mx.array(levels)
        return ((a[:, None] - cb[None]) ** 2).min(axis=-1).mean().item()

    k = 1 << bits
    uniform = [(i + 0.5) * (math.pi / 2) / k for i in range(k)]
    assert mse(c) < 0.9 * mse(uniform)


def test_level_one_codebook_is_the_uniform_grid():
    c = angle_codebook(1, 4)
    assert c[0] == pytest.approx(math.pi / 16)
    assert all(b - a == pytest.approx(math.pi / 8) for a, b in itertools.pairwise(c))


def test_angle_bit_stream_layout():
    q = create("polarquant", head_dim=128, bits=4)
    idx = [mx.zeros((1, n), dtype=mx.uint32) for n in q.counts]
    idx[0][0, 0] = 0b1011  # level-1 code 0 -> low nibble of byte 0
    idx[0][0, 1] = 0b0110  # level-1 code 1 -> high nibble of byte 0
    idx[1][0, 0] = 0b11  # first level-2 code starts at stream bit 256 = byte 32
    stream = q._pack_angles(idx)
    assert stream.shape == (1, 46) and stream.dtype == mx.uint8
    assert stream[0, 0].item() == 0x6B and stream[0, 32].item() == 0b11
    assert stream[0, 1:32].sum().item() == 0 and stream[0, 33:].sum().item() == 0
    rnd = [
        mx.random.randint(0, 1 << b, (3, n), key=mx.random.key(n)).astype(mx.uint32)
        for n, b in zip(q.counts, q.level_bits, strict=True)
    ]
    back = q._unpack_angles(q._pack_angles(rnd))
    assert all(mx.array_equal(a, b).item() for a, b in zip(rnd, back, strict=True))


def test_head_dim_constraints():
    assert create("polarquant", head_dim=80, bits=4).bits_per_element > 3.875  # 230 bits
    with pytest.raises(ConfigError, match=r"polarquant.*head_dim=80"):
        create("polarquant", head_dim=80, bits=3)
    with pytest.raises(ConfigError, match="head_dim=72"):
        create("polarquant", head_dim=72, bits=4)
