"""QJL: unbiased inner products over independent sketches, variance ~ 1/m, exact layout."""

import math

import mlx.core as mx
import pytest

from vq_algorithms.qjl import gaussian_sketch
from vq_core import ConfigError, create, make_cache, stream_key, unpack

D = 128


def _pair():
    """A fixed (q, k) with <q, k> ≈ 38 and ||k|| = 8 exactly (no float16 rounding bias)."""
    k = mx.random.normal((D,), key=mx.random.key(101))
    k = k * (8.0 / mx.linalg.norm(k))
    q = 0.6 * k + 0.8 * mx.random.normal((D,), key=mx.random.key(102))
    return q, k


def _estimates(q, k, seeds, **config):
    out = []
    for seed in range(seeds):
        quant = create("qjl", head_dim=D, seed=seed, **config)
        codes = quant.encode(k.reshape(1, 1, 1, D))
        out.append(quant.scores(q.reshape(1, 1, 1, D), codes).item())
    a = mx.array(out)
    mean = a.mean().item()
    var = (((a - mean) ** 2).sum() / (seeds - 1)).item()
    return mean, var


@pytest.mark.parametrize("orthogonal", [True, False])
def test_estimator_is_unbiased_over_sketches(orthogonal):
    q, k = _pair()
    true = (q @ k).item()
    n = 1000
    mean, var = _estimates(q, k, n, orthogonal=orthogonal)
    se = math.sqrt(var / n)
    assert abs(mean - true) < 4 * se
    # The test has power: 4 standard errors are below a 4% bias.
    assert 4 * se < 0.04 * true


def test_variance_shrinks_like_one_over_m():
    q, k = _pair()
    variances = [_estimates(q, k, 300, sketch_dim=m)[1] for m in (32, 128, 512)]
    # Var ≈ (π/2·||q||²||k||² - <q,k>²)/m for Gaussian rows; orthogonal rows do better still.
    for wide, narrow in zip(variances[1:], variances[:-1], strict=True):
        assert wide < narrow / 3


def test_gaussian_rows_are_worse_than_orthogonal_rows():
    q, k = _pair()
    var_orth = _estimates(q, k, 300, orthogonal=True)[1]
    var_gauss = _estimates(q, k, 300, orthogonal=False)[1]
    assert var_orth < 0.6 * var_gauss


def test_round_trip_error_matches_theory():
    """E||k̂ - k||²/||k||² = (π/2 - 1)·d/m for orthogonal blocks of d rows (m a multiple of
    d; rows of different blocks are independent), (π/2·d - 1)/m for Gaussian rows."""
    x = mx.random.normal((4096, D), key=mx.random.key(7))

    def err(**config):
        quant = create("qjl", head_dim=D, seed=3, **config)
        xh = quant.decode(quant.encode(x))
        return (((xh - x) ** 2).sum() / (x**2).sum()).item()

    assert err() == pytest.approx(math.pi / 2 - 1, rel=0.04)
    assert err(sketch_dim=256) == pytest.approx((math.pi / 2 - 1) / 2, rel=0.04)
    assert err(orthogonal=False) == pytest.approx((math.pi / 2 * D - 1) / D, rel=0.04)


def test_sign_bit_layout_and_norm():
    quant = create("qjl", head_dim=D, sketch_dim=100, seed=2)
    x = mx.random.normal((5, D), key=mx.random.key(1))
    codes = quant.encode(x)
    assert codes["signs"].shape == (5, 4) and codes["signs"].dtype == mx.uint32
    expect = (x @ quant.sketch.T >= 0).astype(mx.uint32)
    assert mx.array_equal(unpack(codes["signs"], 1, 100), expect).item()
    word0 = sum(int(b) << i for i, b in enumerate(expect[0, :32].tolist()))
    assert codes["signs"][0, 0].item() == word0  # bit i of word 0 is sketch row i
    assert mx.array_equal(codes["signs"][:, 3] >> 4, mx.zeros((5,), mx.uint32)).item()
    assert mx.allclose(codes["norm"].astype(mx.float32), mx.linalg.norm(x, axis=-1), rtol=1e-3)
    assert quant.bits_per_element == (4 * 32 + 16) / D


def test_decode_is_the_estimator_vector():
    quant = create("qjl", head_dim=D, seed=4)
    k = mx.random.normal((3, D), key=mx.random.key(2))
    codes = quant.encode(k)
    signs = mx.where(k @ quant.sketch.T >= 0, 1.0, -1.0)
    norm = codes["norm"].astype(mx.float32)[:, None]
    expect = math.sqrt(math.pi / 2) / D * norm * (signs @ quant.sketch)
    assert mx.allclose(quant.decode(codes), expect, rtol=1e-5, atol=1e-6).item()


@pytest.mark.parametrize(("m", "d"), [(128, 128), (96, 128), (300, 128), (80, 80)])
def test_orthogonal_sketch_rows(m, d):
    s = gaussian_sketch(m, d, stream_key(1, "sketch"), orthogonal=True)
    assert s.shape == (m, d)
    for start in range(0, m, d):
        blk = s[start : start + d]
        gram = blk @ blk.T
        off = gram - mx.diag(mx.diagonal(gram))
        assert mx.abs(off).max().item() < 1e-3 * mx.diagonal(gram).max().item()
    # Row lengths are Gaussian (chi_d) lengths, not a constant: E||s||² = d.
    sq = (s**2).sum(-1)
    assert sq.mean().item() == pytest.approx(d, rel=0.25)
    assert (sq.max() - sq.min()).item() > 1.0


def test_default_sketch_dim_is_head_dim_and_describes_itself():
    quant = create("qjl", head_dim=96)
    assert quant.config.sketch_dim == 96 and quant.config.bits == 1
    assert quant.describe()["config"]["sketch_dim"] == 96
    assert quant.bits_per_element == (96 + 16) / 96


def test_values_default_to_turboquant_mse():
    cache = make_cache("qjl", head_dim=D, bits=1, value_bits=3)
    assert cache.key_quantizer.method == "qjl"
    assert cache.value_quantizer.method == "turboquant_mse"
    assert cache.value_quantizer.config.bits == 3


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"bits": 2}, "bits"),
        ({"sketch_dim": 0}, "qjl: sketch_dim"),
        ({"sketch_dim": 12.5}, "qjl: sketch_dim"),
        ({"orthogonal": "yes"}, "qjl: orthogonal"),
        ({"head_dim": 1}, "head_dim"),
    ],
)
def test_bad_config(config, words):
    with pytest.raises(ConfigError, match=words):
        create("qjl", **{"head_dim": D, **config})
