import math

import mlx.core as mx
import pytest

from vq_core import ConfigError, ScalarCodebook, ShapeError, VectorCodebook, lloyd_max

# Max (1960), Table I: MSE of the optimal N(0,1) quantizer with 2, 4, 8, 16 levels.
MAX_1960_GAUSSIAN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
# TurboQuant (arXiv 2504.19874), Theorem 1: D_mse ~ 0.36, 0.117, 0.03, 0.009 for unit vectors.
TURBOQUANT_DMSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_matches_max_1960(bits):
    assert lloyd_max("gaussian", bits).mse == pytest.approx(MAX_1960_GAUSSIAN_MSE[bits], rel=2e-3)


def _beta_optimum_scipy(bits: int, dim: int) -> float:
    """Independent Lloyd-Max on the scaled Beta with scipy quadrature (not our grid code)."""
    stats = pytest.importorskip("scipy.stats")
    integrate = pytest.importorskip("scipy.integrate")
    law = stats.beta((dim - 1) / 2, (dim - 1) / 2, loc=-1, scale=2)
    k = 1 << bits
    c = [law.ppf((i + 0.5) / k) for i in range(k)]
    for _ in range(300):
        t = [-1.0] + [(c[i] + c[i + 1]) / 2 for i in range(k - 1)] + [1.0]
        c = [
            integrate.quad(lambda x: x * law.pdf(x), t[i], t[i + 1])[0]
            / (law.cdf(t[i + 1]) - law.cdf(t[i]))
            for i in range(k)
        ]
    t = [-1.0] + [(c[i] + c[i + 1]) / 2 for i in range(k - 1)] + [1.0]
    return sum(
        integrate.quad(lambda x, ci=ci: (x - ci) ** 2 * law.pdf(x), t[i], t[i + 1])[0]
        for i, ci in enumerate(c)
    )


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_sphere_d128_matches_independent_optimum(bits):
    ours = lloyd_max("sphere", bits, 128).mse
    assert ours == pytest.approx(_beta_optimum_scipy(bits, 128), rel=5e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_sphere_d128_unit_vector_mse_matches_paper(bits):
    total = 128 * lloyd_max("sphere", bits, 128).mse
    assert total == pytest.approx(TURBOQUANT_DMSE[bits], rel=0.15)
    # and it sits below the paper's upper bound sqrt(3)*pi/2 * 4**-b
    assert total <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def test_sphere_codebook_monte_carlo():
    """Quantizing random unit vectors coordinatewise gives the analytic MSE."""
    cb = ScalarCodebook.lloyd_max("sphere", 2, 128)
    x = mx.random.normal((4000, 128), key=mx.random.key(1))
    x = x / mx.linalg.norm(x, axis=-1, keepdims=True)
    err = ((cb.dequantize(cb.quantize(x)) - x) ** 2).sum(axis=-1).mean().item()
    assert err == pytest.approx(128 * lloyd_max("sphere", 2, 128).mse, rel=0.03)


def test_codebook_is_symmetric_and_sorted():
    c = lloyd_max("sphere", 3, 64).centroids
    assert list(c) == sorted(c)
    assert all(abs(a + b) < 1e-9 for a, b in zip(c, reversed(c), strict=False))


def test_eight_bits_and_cache():
    assert len(lloyd_max("gaussian", 8).centroids) == 256
    assert lloyd_max("sphere", 4, 96) is lloyd_max("sphere", 4, 96)


def test_bad_codebook_args():
    with pytest.raises(ConfigError, match="bits=7"):
        lloyd_max("gaussian", 7)
    with pytest.raises(ConfigError, match="distribution"):
        lloyd_max("laplace", 2)
    with pytest.raises(ConfigError, match="dim"):
        lloyd_max("sphere", 2, 1)


def test_vector_codebook_assigns_nearest():
    cents = mx.array([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    cb = VectorCodebook(cents)
    x = mx.array([[0.9, 0.2], [0.1, 3.0], [-1.0, -1.0]])
    assert cb.assign(x).tolist() == [1, 2, 0]
    assert cb.lookup(mx.array([2])).tolist() == [[0.0, 5.0]]
    with pytest.raises(ShapeError):
        cb.assign(mx.zeros((3, 3)))


def test_product_codebooks_assign_per_subspace():
    books = mx.array([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 5.0], [2.0, 2.0]]])  # [S=2, K=2, 2]
    cb = VectorCodebook(books)
    x = mx.array([[[0.9, 0.1], [0.0, 4.0]], [[0.1, 0.0], [2.0, 1.0]]])  # [2 vectors, S, 2]
    assert cb.assign(x).tolist() == [[1, 0], [0, 1]]
    assert cb.size == 2 and cb.sub_dim == 2
    with pytest.raises(ShapeError):
        cb.assign(mx.zeros((4, 3, 2)))  # three subspaces for two codebooks
