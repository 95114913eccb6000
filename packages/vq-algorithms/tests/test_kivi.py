"""KIVI: per-channel key groups, per-token fallback, and the cache's residual group."""

import mlx.core as mx
import pytest

from vq_core import ConfigError, create, make_cache


def _x(shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


def test_accounting_is_bits_plus_two_fp16_per_group():
    q = create("kivi", head_dim=128, bits=2)
    assert q.token_block == 32
    assert q.bits_per_element == 2 + 32 / 32
    assert create("kivi", head_dim=128, bits=4, group_size=64).bits_per_element == 4.5
    assert create("kivi", head_dim=128, bits=4, axis="token").token_block == 1


def test_scales_are_per_channel_over_the_block():
    x = _x((1, 1, 32, 128), 1)
    codes = create("kivi", head_dim=128, bits=4).encode(x)
    assert codes["scale"].shape == (1, 1, 32, 4)
    # A block's 128 channel scales, row-major over its 32 token rows.
    scale = codes["scale"].reshape(128).astype(mx.float32)
    zero = codes["zero"].reshape(128).astype(mx.float32)
    lo, hi = x[0, 0].min(axis=0), x[0, 0].max(axis=0)
    assert mx.allclose(zero, lo, rtol=1e-3).item()
    assert mx.allclose(scale, (hi - lo) / 15, rtol=1e-3).item()


def test_an_outlier_channel_does_not_hurt_the_others():
    x = _x((1, 1, 64, 128), 2)
    boost = mx.where(mx.arange(128) == 5, 100.0, 1.0)
    xo = x * boost
    others = mx.array([c for c in range(128) if c != 5])
    chan = create("kivi", head_dim=128, bits=2)
    # Per channel: the other channels decode bit for bit as without the outlier.
    a, b = chan.decode(chan.encode(x)), chan.decode(chan.encode(xo))
    assert mx.array_equal(a[..., others], b[..., others]).item()
    # Per token (groups along head_dim): the outlier's group of 32 channels is ruined.
    tok = create("kivi", head_dim=128, bits=2, axis="token")

    def err(q, v):
        d = (q.decode(q.encode(v)) - v)[..., others[:31]]  # channel 5's group, minus 5
        return (d**2).sum().item()

    assert err(tok, xo) > 30 * err(tok, x)


def test_partial_trailing_block_is_grouped_per_token():
    q = create("kivi", head_dim=128, bits=4)
    x = _x((2, 40, 128), 3)
    codes = q.encode(x)
    assert codes.nbytes * 8 == q.bits_per_element * x.size
    head = q.decode(q.encode(x[:, :32]))
    tail = q.decode(create("kivi", head_dim=128, bits=4, axis="token").encode(x[:, 32:]))
    assert mx.array_equal(q.decode(codes), mx.concatenate([head, tail], axis=1)).item()


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_compressed_domain_matches_decode(axis):
    q = create("kivi", head_dim=128, bits=3, axis=axis)
    codes = q.encode(_x((1, 2, 70, 128), 4))  # two channel blocks + a 6-token tail
    xh = q.decode(codes)
    qs = _x((1, 2, 3, 128), 5)
    assert mx.allclose(q.scores(qs, codes), qs @ mx.swapaxes(xh, -1, -2), atol=1e-4).item()
    p = mx.softmax(_x((1, 2, 3, 70), 6), axis=-1)
    assert mx.allclose(q.weighted_sum(p, codes), p @ xh, atol=1e-5).item()


def test_cache_flushes_whole_groups_and_keeps_the_residual_exact():
    cache = make_cache("kivi", head_dim=128, bits=2, sink=0, block=1)  # one group a block
    assert cache.value_quantizer.method == "affine"
    k, v = _x((1, 2, 70, 128), 7).astype(mx.float16), _x((1, 2, 70, 128), 8).astype(mx.float16)
    cache.update_and_fetch(k, v)
    assert cache.compressed_tokens == 64
    state = cache.state
    assert mx.array_equal(state["exact_k"], k[:, :, 64:]).item()
    assert mx.array_equal(state["exact_v"], v[:, :, 64:]).item()
    assert state["k__idx"].shape[2] == 64
    for i in range(25):  # 6 + 25 = 31 residual tokens: still below one group
        cache.update_and_fetch(_x((1, 2, 1, 128), 10 + i).astype(mx.float16), k[:, :, :1])
    assert cache.compressed_tokens == 64 and cache.offset == 95
    cache.update_and_fetch(k[:, :, :1], v[:, :, :1])  # the 32nd residual token fills a group
    assert cache.compressed_tokens == 64 and cache.exact_tokens == 32
    cache.update_and_fetch(k[:, :, 1:2], v[:, :, 1:2])  # the next step flushes it first
    assert cache.compressed_tokens == 96 and cache.exact_tokens == 1


def test_head_dim_must_hold_whole_groups():
    with pytest.raises(ConfigError, match=r"kivi.*head_dim=80"):
        create("kivi", head_dim=80)
    assert create("kivi", head_dim=80, group_size=16).bits_per_element == 4 + 2
    with pytest.raises(ConfigError, match="axis"):
        create("kivi", head_dim=128, axis="row")
