"""CompressedRotatingKVCache on its own (mlx-lm's RotatingKVCache comparison is in
tests-integration/test_rotating_cache.py)."""

import mlx.core as mx
import pytest

from vq_core import CompressedRotatingKVCache, ConfigError, attend, create


def _cache(max_size=12, keep=2, block=4, method="toy_uniform"):
    k = create(method, head_dim=32, bits=8)
    v = create("toy_uniform", head_dim=32, bits=8, seed=1)
    return CompressedRotatingKVCache(k, v, max_size=max_size, keep=keep, block=block)


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="position-aware"):
        _cache(method="toy_positional")
    with pytest.raises(ConfigError, match="keep=12 must be below max_size=12"):
        _cache(keep=12)
    with pytest.raises(ConfigError, match="max_size=0"):
        _cache(max_size=0)


@pytest.mark.parametrize(("size", "keep", "block"), [(12, 2, 4), (6, 1, 4), (5, 1, 4)])
def test_decode_sees_the_first_keep_and_the_newest_tokens(size, keep, block):
    """Each decode step equals softmax attention over tokens [0, keep) and the newest
    max_size - keep (itself included), with no mask and some history compressed; also with
    windows barely a block wide (a block encoded at the start of a step can expire at once)."""
    cache = _cache(max_size=size, keep=keep, block=block)
    ks = mx.random.normal((1, 2, 50, 32), key=mx.random.key(0))
    vs = mx.random.normal((1, 2, 50, 32), key=mx.random.key(1))
    errs = []
    for t in range(50):
        q = mx.random.normal((1, 4, 1, 32), key=mx.random.key(2 + t))
        assert cache.make_mask(1) is None
        view = cache.update_and_fetch(ks[:, :, t : t + 1], vs[:, :, t : t + 1])
        seen = list(range(min(keep, t + 1))) + list(range(max(keep, t + 1 - (size - keep)), t + 1))
        idx = mx.array(seen)
        want = mx.fast.scaled_dot_product_attention(q, ks[:, :, idx], vs[:, :, idx], scale=0.2)
        got = attend(q, *view, scale=0.2)
        errs.append(mx.abs(got - want).max().item())
        assert view[0].shape[2] == len(seen)
    assert max(errs) < 3e-2  # 8-bit codes: measured 0.012; a wrong token costs ~0.3
    assert cache.evicted > 0 and cache.evicted % block == 0
    assert not hasattr(cache, "merge")  # mlx-lm does not batch what cannot be batched
    assert cache.offset - cache.evicted - keep < size - keep + 2 * block


def test_state_round_trip():
    cache = _cache()
    cache.update_and_fetch(mx.random.normal((1, 2, 30, 32)), mx.random.normal((1, 2, 30, 32)))
    loaded = CompressedRotatingKVCache.from_state(cache.state)
    assert (loaded.offset, loaded.evicted, loaded.compressed_tokens) == (
        cache.offset,
        cache.evicted,
        cache.compressed_tokens,
    )
    k, v, q = (mx.random.normal((1, h, 1, 32)) for h in (2, 2, 4))
    a = attend(q, *cache.update_and_fetch(k, v), scale=0.2)
    b = attend(q, *loaded.update_and_fetch(k, v), scale=0.2)
    assert mx.array_equal(a, b).item()
