"""One suite over every registered method (vq_algorithms.METHODS).

Each method states its round-trip bound per bit width in its ``round_trip_bound`` class
attribute: the largest allowed relative error E||x - x̂||² / E||x||² on Gaussian vectors at
head_dim 128. Calibrated methods run as their untrained neighbour, asked for by name
(``untrained=True``); their trained artifacts are tested in vq-calibrate.
"""

import mlx.core as mx
import pytest

from vq_algorithms import METHODS
from vq_core import (
    CompressedKVCache,
    ConfigError,
    DTypeError,
    NonFiniteError,
    ShapeError,
    attend,
    create,
    get,
    make_cache,
)

HEAD_DIMS = [64, 80, 96, 128, 256]


def _cases():
    for m in METHODS:
        for b in get(m).config_class.allowed_bits:
            yield pytest.param(m, b, id=f"{m}-{b}")


def _create(method, **config):
    """``create`` with the explicit untrained opt-in for calibrated methods."""
    return create(method, **config, **_untrained(method))


def _untrained(method):
    return {"untrained": True} if get(method).needs_calibration else {}


def _x(shape, seed=0, dtype=mx.float32):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _rel_err(q, x):
    xh = q.decode(q.encode(x))
    return (((xh - x) ** 2).sum() / (x**2).sum()).item()


@pytest.mark.parametrize("method", METHODS)
def test_module_name_is_registry_key(method):
    assert get(method).method == method
    assert set(get(method).round_trip_bound) == set(get(method).config_class.allowed_bits)


@pytest.mark.parametrize(("method", "bits"), list(_cases()))
def test_round_trip_within_stated_bound(method, bits):
    q = _create(method, head_dim=128, bits=bits)
    assert _rel_err(q, _x((2, 2, 512, 128))) <= get(method).round_trip_bound[bits]


@pytest.mark.parametrize(("method", "bits"), list(_cases()))
def test_nbytes_equals_accounting(method, bits):
    q = _create(method, head_dim=128, bits=bits)
    x = _x((3, 5, 128))
    assert q.encode(x).nbytes * 8 == pytest.approx(q.bits_per_element * x.size, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_for_a_seed(method):
    x = _x((4, 128))
    a = _create(method, head_dim=128, seed=5).encode(x)
    b = _create(method, head_dim=128, seed=5).encode(x)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(2, 3, 17, 128), (9, 128), (2, 2, 2, 2, 128)])
def test_shapes(method, shape):
    q = _create(method, head_dim=128)
    assert q.decode(q.encode(_x(shape))).shape == shape


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dtypes(method, dtype):
    q = _create(method, head_dim=128)
    x = _x((64, 128), dtype=dtype)
    ref = _rel_err(q, x.astype(mx.float32))
    assert _rel_err(q, x) == pytest.approx(ref, rel=0.05, abs=1e-3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(method, head_dim):
    try:
        q = _create(method, head_dim=head_dim)
    except ConfigError as e:  # allowed only with a message naming the constraint
        assert method in str(e) and "head_dim" in str(e)
        return
    x = _x((2, 64, head_dim))
    assert q.decode(q.encode(x)).shape == x.shape
    assert _rel_err(q, x) < 1.0


@pytest.mark.parametrize("method", METHODS)
def test_state_round_trip_inside_cache(method):
    bits = get(method).config_class.allowed_bits[-1]
    cache = make_cache(method, head_dim=128, bits=bits, **_untrained(method))
    cache.update_and_fetch(_x((1, 2, 40, 128), 1), _x((1, 2, 40, 128), 2))
    loaded = CompressedKVCache.from_state(cache.state, cache.meta_state)
    q = _x((1, 4, 1, 128), 3)
    outs = [
        attend(q, *c.update_and_fetch(_x((1, 2, 1, 128), 4), _x((1, 2, 1, 128), 5)), scale=0.1)
        for c in (cache, loaded)
    ]
    assert mx.array_equal(*outs).item()


@pytest.mark.parametrize(("method", "bits"), list(_cases()))
def test_attention_through_the_seam_equals_the_decoded_reference(method, bits):
    """Decode (the kernel table's choice) and prefill over compressed history both equal
    softmax attention over the keys and values the cache decodes to."""
    cache = make_cache(method, head_dim=128, bits=bits, block=32, **_untrained(method))
    cache.update_and_fetch(_x((1, 2, 100, 128), 1), _x((1, 2, 100, 128), 2))
    assert cache.compressed_tokens == 96
    for lq, mask in ((1, None), (5, "causal"), (20, "causal")):  # decode, decode, prefill
        kv, vv = view = cache.update_and_fetch(_x((1, 2, lq, 128), 4), _x((1, 2, lq, 128), 5))
        q = _x((1, 4, lq, 128), 3)
        s0 = kv.n_sink
        rk, rv = (
            mx.concatenate([x.exact[:, :, :s0], x.decoded(0, x.n_comp), x.exact[:, :, s0:]], 2)
            for x in (kv, vv)
        )
        ref = mx.fast.scaled_dot_product_attention(q, rk, rv, scale=0.1, mask=mask)
        out = attend(q, *view, scale=0.1, mask=mask)
        assert mx.allclose(out, ref, rtol=1e-3, atol=1e-4).item(), lq


@pytest.mark.parametrize(("method", "bits"), list(_cases()))
def test_compressed_domain_equals_decode_then_matmul(method, bits):
    quant = _create(method, head_dim=128, bits=bits)
    codes = quant.encode(_x((1, 2, 33, 128), 1))
    xh = quant.decode(codes)
    q = _x((1, 2, 3, 128), 2)
    s = quant.scores(q, codes)
    assert mx.allclose(s, q @ mx.swapaxes(xh, -1, -2), rtol=1e-3, atol=1e-3).item()
    p = mx.softmax(_x((1, 2, 3, 33), 3), axis=-1)
    assert mx.allclose(quant.weighted_sum(p, codes), p @ xh, rtol=1e-3, atol=1e-4).item()


@pytest.mark.parametrize("method", METHODS)
def test_bad_input(method):
    q = _create(method, head_dim=128)
    with pytest.raises(ShapeError, match="head_dim=128"):
        q.encode(_x((3, 127)))
    with pytest.raises(NonFiniteError):
        q.encode(mx.full((2, 128), float("inf")))
    with pytest.raises(DTypeError):
        q.encode(mx.zeros((2, 128), dtype=mx.int32))
    with pytest.raises(ConfigError, match="bits"):
        _create(method, head_dim=128, bits=9)


@pytest.mark.parametrize("method", [m for m in METHODS if get(m).needs_calibration])
def test_calibrated_method_without_its_artifact_is_refused(method):
    with pytest.raises(ConfigError, match=f"{method} is calibrated and needs its artifact"):
        create(method, head_dim=128, bits=2)
    with pytest.raises(ConfigError, match=f"{method} is calibrated"):
        make_cache(method, head_dim=128, bits=2)
    with pytest.raises(ConfigError, match="exclude each other"):
        create(method, head_dim=128, bits=2, artifact="somewhere", untrained=True)


@pytest.mark.parametrize("method", [m for m in METHODS if get(m).keys_only])
def test_keys_only_method_is_refused_for_values(method):
    with pytest.raises(ConfigError, match=f"value_method='{method}' compresses keys only"):
        make_cache("turboquant_mse", head_dim=128, bits=2, value_method=method)
