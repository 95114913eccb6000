"""``cache.keys``: the array mlx-lm's pipeline-parallel models tie their sends to."""

import mlx.core as mx
import pytest

from vq_core import CacheStateError, CompressedKVCache, ShapeError, create


def _cache(sink, window=0):
    k = create("toy_uniform", head_dim=64, bits=8)
    v = create("toy_uniform", head_dim=64, bits=8, seed=1)
    return CompressedKVCache(k, v, sink=sink, window=window, block=1)


def _kv(n):
    a, b = mx.random.split(mx.random.key(0))
    return mx.random.normal((1, 2, n, 64), key=a), mx.random.normal((1, 2, n, 64), key=b)


@pytest.mark.parametrize(
    ("sink", "window", "state_key"),
    [(1, 0, "sink_k"), (0, 8, "exact_k"), (0, 0, None)],  # None: a key code field
)
def test_keys_is_a_state_array_and_a_tie_reaches_the_state(sink, window, state_key):
    cache = _cache(sink, window)
    assert cache.keys is None  # empty: nothing to tie to
    cache.update_and_fetch(*_kv(4))
    held = cache.keys
    # mlx-lm's pipeline: cache.keys = mx.depends(cache.keys, h); the state must carry it
    cache.keys = mx.depends(held, mx.array([7.0]) * 3)
    tied = cache.keys
    assert tied is not held and mx.array_equal(tied, held).item()
    state = cache.state
    # the state holds a slice of the tied array: the exact keys' buffer (sink first) or the
    # compressed tokens' code buffer
    name = state_key or next(
        k for k in state if k.startswith("k") and isinstance(state[k], mx.array)
    )
    assert mx.array_equal(state[name], tied[:, :, : state[name].shape[2]]).item()
    mx.eval(state)
    assert cache.offset == 4


def test_keys_setter_refuses_another_shape_or_no_array():
    cache = _cache(1)
    with pytest.raises(CacheStateError):
        cache.keys = mx.zeros((1, 2, 1, 64))  # nothing held yet
    cache.update_and_fetch(*_kv(2))
    with pytest.raises(ShapeError):
        cache.keys = mx.zeros((1, 2, 3, 64))
    with pytest.raises(CacheStateError):
        cache.keys = "not an array"


def test_batch_cache_keys_tie_reaches_its_state():
    a, b = _cache(1), _cache(1)
    a.update_and_fetch(*_kv(3))
    b.update_and_fetch(*_kv(5))
    batch = CompressedKVCache.merge([a, b])
    held = batch.keys
    assert held.shape == (2,)
    batch.keys = mx.depends(held, mx.array([7.0]) * 3)
    assert batch.keys is not held and any(x is batch.keys for x in batch.state)
    mx.eval(batch.state)
    with pytest.raises(ShapeError):
        batch.keys = mx.zeros((3,))
