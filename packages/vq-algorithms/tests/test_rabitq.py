"""RaBitQ: unbiased over rotations, the papers' correction factors, exact popcount arithmetic."""

import math

import mlx.core as mx
import pytest

from vq_algorithms.rabitq import QUERY_BITS, binary_dot, grid_magnitudes, popcount
from vq_core import ConfigError, attend, create, make_cache, pack, unpack

D = 128


def _pair():
    """A fixed (q, k) with <q, k> ≈ 38 and ||k|| = 8 exactly (no float16 rounding bias)."""
    k = mx.random.normal((D,), key=mx.random.key(101))
    k = k * (8.0 / mx.linalg.norm(k))
    q = 0.6 * k + 0.8 * mx.random.normal((D,), key=mx.random.key(102))
    return q, k


def _estimates(q, k, seeds, **config):
    """``scores`` of one (q, k) pair under ``seeds`` independent rotations (and roundings)."""
    out = []
    for seed in range(seeds):
        quant = create("rabitq", head_dim=D, seed=seed, **config)
        codes = quant.encode(k.reshape(1, 1, 1, D))
        out.append(quant.scores(q.reshape(1, 1, 1, D), codes).item())
    return mx.array(out)


def _mean_se(a):
    n = a.size
    mean = a.mean().item()
    return mean, math.sqrt((((a - mean) ** 2).sum() / (n - 1)).item() / n)


@pytest.mark.parametrize(
    "config",
    [{"bits": 1}, {"bits": 2}, {"bits": 3}, {"bits": 4}, {"bits": 1, "binary_query": True}],
    ids=["B1", "B2", "B3", "B4", "B1-binary-query"],
)
def test_estimator_is_unbiased_over_rotations(config):
    q, k = _pair()
    true = (q @ k).item()
    mean, se = _mean_se(_estimates(q, k, 800, **config))
    assert abs(mean - true) < 4 * se
    assert 4 * se < 0.04 * true  # power: a 4% bias would fail


def test_dropping_the_ip_correction_is_visibly_biased():
    """Without the 1/<ō,o> factor the 1-bit estimate shrinks by E<ō,o> ≈ sqrt(2/π)."""
    q, k = _pair()
    true = (q @ k).item()
    naive = []
    for seed in range(200):
        quant = create("rabitq", head_dim=D, bits=1, seed=seed)
        codes = quant.encode(k.reshape(1, 1, 1, D))
        naive.append(quant.scores(q.reshape(1, 1, 1, D), codes).item() * codes["ip"].item())
    mean, se = _mean_se(mx.array(naive))
    assert abs(mean - true) > 10 * se
    assert mean / true == pytest.approx(math.sqrt(2 / math.pi), rel=0.03)


def test_variance_shrinks_with_bits():
    q, k = _pair()
    var = [mx.var(_estimates(q, k, 200, bits=b)).item() for b in (1, 2, 3, 4)]
    for more, fewer in zip(var[1:], var[:-1], strict=True):
        assert more < fewer / 2.5


def test_one_bit_codes_and_correction_factors():
    """RaBitQ Sec. 3.1–3.2: x_b = [y >= 0], norm = ||k||, <ō, o> = ||y||_1 / (sqrt(d) ||y||)."""
    quant = create("rabitq", head_dim=D, bits=1, seed=3)
    k = mx.random.normal((6, D), key=mx.random.key(4)) * 3
    codes = quant.encode(k)
    y = quant.rotation.apply(k)
    assert mx.array_equal(unpack(codes["idx"], 1, D), (y >= 0).astype(mx.uint32)).item()
    ip = mx.abs(y).sum(-1) / (math.sqrt(D) * mx.linalg.norm(y, axis=-1))
    assert mx.allclose(codes["ip"].astype(mx.float32), ip, rtol=1e-3).item()
    norm = mx.linalg.norm(k, axis=-1)
    assert mx.allclose(codes["norm"].astype(mx.float32), norm, rtol=1e-3).item()
    assert codes["ip"].dtype == codes["norm"].dtype == mx.float16
    assert quant.bits_per_element == 1 + 32 / D
    # Estimator: ||k|| <x̄, q'> / <ō, o> with x̄ = (2 x_b - 1)/sqrt(d).
    q = mx.random.normal((1, 1, 2, D), key=mx.random.key(5))
    xbar = (2 * unpack(codes["idx"], 1, D).astype(mx.float32) - 1) / math.sqrt(D)
    scale = codes["norm"].astype(mx.float32) / codes["ip"].astype(mx.float32)
    expect = (quant.rotation.apply(q) @ xbar.T) * scale
    got = quant.scores(q, codes.map(lambda _, a: a[None, None]))
    assert mx.allclose(got, expect, rtol=1e-5, atol=1e-4).item()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_extended_code_is_the_best_rescaled_grid_point(bits):
    """Extended RaBitQ Sec. 3.2: no rescaling t of |o| rounds to a grid point with a larger
    cosine than the code found, and ``ip`` is that cosine; the top code bit is the sign."""
    quant = create("rabitq", head_dim=D, bits=bits, seed=1)
    k = mx.random.normal((16, D), key=mx.random.key(6))
    codes = quant.encode(k)
    y = quant.rotation.apply(k)
    o = y / mx.linalg.norm(y, axis=-1, keepdims=True)
    u = unpack(codes["idx"], bits, D)
    assert mx.array_equal(u >> (bits - 1), (o >= 0).astype(mx.uint32)).item()
    v = u.astype(mx.float32) - ((1 << bits) - 1) / 2
    cos = (v * o).sum(-1) / mx.linalg.norm(v, axis=-1)
    assert mx.allclose(codes["ip"].astype(mx.float32), cos, rtol=1e-3).item()
    top = (1 << (bits - 1)) - 1
    a = mx.abs(o)
    t = mx.linspace(0.0, 40.0 * top, 40001)[:, None, None]
    grid = mx.minimum(mx.floor(t * a), top) + 0.5  # [T, 16, D]
    sweep = ((grid * a).sum(-1) / mx.linalg.norm(grid, axis=-1)).max(0)
    assert (cos >= sweep - 1e-6).all().item()


def test_grid_search_handles_zero_coordinates_and_vectors():
    a = mx.array([[0.0] * 8, [1.0] + [0.0] * 7])
    k = grid_magnitudes(a, 3)
    assert k.tolist() == [[0] * 8, [3] + [0] * 7]
    quant = create("rabitq", head_dim=D, bits=2)
    codes = quant.encode(mx.zeros((2, D)))
    assert mx.array_equal(quant.decode(codes), mx.zeros((2, D))).item()


def test_popcount_matches_python():
    words = [0, 1, 0xFFFFFFFF, 0x80000000, 0x55555555, 0xDEADBEEF, 123456789, 0x0F0F0F0F]
    got = popcount(mx.array(words, dtype=mx.uint32)).tolist()
    assert got == [bin(w).count("1") for w in words]


def test_popcount_dot_equals_integer_dot():
    """Bit-plane AND + popcount gives <x_b, q_u> exactly, and the ±1 form follows."""
    bits = mx.random.bernoulli(0.5, (1, 2, 37, D), key=mx.random.key(1)).astype(mx.uint32)
    qu = mx.random.randint(0, 16, (1, 2, 3, D), key=mx.random.key(2)).astype(mx.uint32)
    planes = mx.stack([pack((qu >> j) & 1, 1) for j in range(QUERY_BITS)], axis=-2)
    dot = binary_dot(planes, pack(bits, 1))
    assert dot.dtype == mx.int32
    qi, bi = qu.astype(mx.int32)[..., :, None, :], bits.astype(mx.int32)[..., None, :, :]
    direct = (qi * bi).sum(-1)  # [1, 2, 3, 37], integer arithmetic throughout
    assert mx.array_equal(dot, direct).item()
    pm = (qi * (2 * bi - 1)).sum(-1)  # against the ±1 code
    assert mx.array_equal(2 * dot - qu.astype(mx.int32).sum(-1, keepdims=True), pm).item()


def test_binary_query_scores_equal_float_scores_on_the_binarized_query():
    quant = create("rabitq", head_dim=D, bits=1, seed=9, binary_query=True)
    codes = quant.encode(mx.random.normal((1, 2, 50, D), key=mx.random.key(1)))
    q = mx.random.normal((1, 2, 4, D), key=mx.random.key(2))
    q_rot = quant.rotation.apply(q)
    qu, lo, delta = quant.quantize_query(q_rot)
    assert qu.max().item() <= 15 and qu.min().item() >= 0
    qbar = delta[..., None] * qu.astype(mx.float32) + lo[..., None]
    assert (mx.abs(qbar - q_rot) < delta[..., None] * 1.0001).all().item()  # within one step
    unit, scale = quant._rotated(codes)
    float_path = (qbar @ mx.swapaxes(unit, -1, -2)) * scale[..., None, :]
    assert mx.allclose(quant.scores(q, codes), float_path, rtol=1e-4, atol=1e-3).item()
    # Reproducible for a seed; a different seed draws another rounding.
    again = create("rabitq", head_dim=D, bits=1, seed=9, binary_query=True)
    assert mx.array_equal(again.quantize_query(q_rot)[0], qu).item()


def test_values_default_to_turboquant_mse_but_rabitq_can_hold_them():
    cache = make_cache("rabitq", head_dim=D, bits=1)
    assert cache.value_quantizer.method == "turboquant_mse"
    cache = make_cache("rabitq", head_dim=D, bits=3, value_method="rabitq")
    assert cache.value_quantizer.method == "rabitq"
    view = cache.update_and_fetch(mx.ones((1, 1, 4, D)), mx.ones((1, 1, 4, D)))
    out = attend(mx.ones((1, 1, 1, D)), *view, scale=0.1)
    assert mx.allclose(out, mx.ones((1, 1, 1, D)), atol=0.1).item()


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"bits": 5}, "bits"),
        ({"rotation": "random"}, "rotation"),
        ({"bits": 2, "binary_query": True}, "rabitq: binary_query=True needs bits=1"),
        ({"binary_query": 1}, "rabitq: binary_query"),
        ({"head_dim": 100, "rotation": "hadamard"}, "rabitq: head_dim=100"),
    ],
)
def test_bad_config(config, words):
    with pytest.raises(ConfigError, match=words):
        create("rabitq", **{"head_dim": D, **config})


def test_code_search_in_slices_equals_one_pass(monkeypatch):
    import vq_algorithms.rabitq as rabitq

    quant = create("rabitq", head_dim=D, bits=3, seed=2)
    x = mx.random.normal((2, 50, D), key=mx.random.key(8))
    whole = quant.encode(x)
    monkeypatch.setattr(rabitq, "SEARCH_CHUNK", 7)
    sliced = quant.encode(x)
    assert all(mx.array_equal(whole[f], sliced[f]).item() for f in whole)
    assert quant.decode(quant.encode(mx.zeros((0, D)))).shape == (0, D)


def test_query_rounding_noise_is_independent_of_the_rotation():
    """RaBitQ's estimator is unbiased over the rounding noise *given* the rotation: the two
    must come from independent streams. With one key for both (the bug this catches), the
    noise u_j < 1/2 exactly where the Hadamard sign s_j is +1 (bernoulli(1/2) = uniform < 1/2)."""
    agree = []
    for seed in range(16):
        q = create("rabitq", head_dim=128, bits=1, seed=seed, binary_query=True,
                   rotation="hadamard")  # fmt: skip
        u = mx.random.uniform(shape=(128,), key=q.query_key)
        agree.append(((u < 0.5) == (q.rotation.signs > 0)).astype(mx.float32).mean().item())
    mean = sum(agree) / len(agree)
    assert 0.45 < mean < 0.55  # independent: 1/2 ± 0.011 (std over 2048 coin flips)
    assert max(agree) < 0.7
