import mlx.core as mx
import pytest

from vq_core import CompressedKVCache, ConfigError, NonFiniteError, ShapeError, attend, create


def _cache(window=0, step=256, method="toy_uniform", bits=8, block=1):
    """The cache mechanics alone: no sink, no centering (the defaults keep one sink token
    and center; tests of those pass them)."""
    k = create(method, head_dim=64, bits=bits)
    v = create(method, head_dim=64, bits=bits, seed=1)
    return CompressedKVCache(k, v, window=window, step=step, block=block, sink=0, center=False)


def _kv(n, b=1, h=2, d=64, seed=0):
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    return mx.random.normal((b, h, n, d), key=k1), mx.random.normal((b, h, n, d), key=k2)


def _reference(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def _decoded(cache, view):
    """Keys and values of a view rebuilt from the cache's saved state (the reference)."""
    kq, vq = cache.key_quantizer, cache.value_quantizer
    k, v = view
    parts_k, parts_v = [], []
    if k.n_comp:
        st = cache.state
        parts_k.append(
            kq.decode({n[3:]: a for n, a in st.items() if n.startswith("k__")})[:, :, : k.n_comp]
        )
        parts_v.append(
            vq.decode({n[3:]: a for n, a in st.items() if n.startswith("v__")})[:, :, : k.n_comp]
        )
        parts_k[-1] = parts_k[-1] + st.get("key_mean", 0)  # when the cache centers
        parts_v[-1] = parts_v[-1] + st.get("value_mean", 0)
    for side, parts in ((k, parts_k), (v, parts_v)):
        parts.append(side.exact)  # no sink here: the exact tokens follow the compressed ones
    return mx.concatenate(parts_k, axis=2), mx.concatenate(parts_v, axis=2)


@pytest.mark.parametrize("window", [0, 5])
def test_prefill_then_decode_equals_attention_over_reconstruction(window):
    cache = _cache(window=window)
    k, v = _kv(37)
    q = mx.random.normal((1, 6, 37, 64), key=mx.random.key(9))  # GQA: 6 query heads, 2 KV
    out = attend(q, *cache.update_and_fetch(k, v), scale=0.125, mask="causal")
    ref = _reference(q, k, v, 0.125, "causal")  # prefill sees its own tokens exactly
    assert mx.allclose(out, ref, atol=1e-4).item()
    for step in range(3):
        k1, v1 = _kv(1, seed=step + 1)
        view = cache.update_and_fetch(k1, v1)
        q1 = mx.random.normal((1, 6, 1, 64), key=mx.random.key(step))
        out = attend(q1, *view, scale=0.125)
        kk, vv = _decoded(cache, view)
        assert kk.shape[2] == 38 + step
        assert mx.allclose(out, _reference(q1, kk, vv, 0.125, None), atol=1e-4).item()
    assert cache.offset == 40
    # a decode step's filled block (block=1: its own token) is encoded at the next step
    assert cache.compressed_tokens == 40 - window - 1


def test_compression_is_lossy_but_close_and_bytes_are_real():
    cache = _cache(bits=4)
    k, v = _kv(4096, h=3)
    cache.update_and_fetch(k, v)
    mx.eval(cache.state)
    bpe = cache.key_quantizer.bits_per_element + cache.value_quantizer.bits_per_element
    accounted = bpe * 3 * 4096 * 64 / 8
    assert cache.nbytes == pytest.approx(accounted, rel=0.03)
    assert cache.nbytes < 2 * 3 * 4096 * 64 * 2 / 3.5  # >3.5x smaller than fp16
    assert "exact_k" not in cache.state  # no fp16 copy of compressed tokens


def test_grows_in_steps():
    cache = _cache(step=16)
    cache.update_and_fetch(*_kv(3))
    assert cache._keys["q"].shape[2] == 16
    cache.update_and_fetch(*_kv(20))
    assert cache._keys["q"].shape[2] == 32


def test_state_round_trip_continues_identically():
    cache = _cache(window=3)
    cache.update_and_fetch(*_kv(10))
    loaded = CompressedKVCache.from_state(cache.state, cache.meta_state)
    assert loaded.offset == cache.offset == 10
    k1, v1 = _kv(1, seed=5)
    q = mx.random.normal((1, 2, 1, 64))
    a = attend(q, *cache.update_and_fetch(k1, v1), scale=0.1)
    b = attend(q, *loaded.update_and_fetch(k1, v1), scale=0.1)
    assert mx.array_equal(a, b).item()


def test_trim_and_block_quantizer():
    cache = _cache(method="toy_block", window=2)
    cache.update_and_fetch(*_kv(11))  # 8 compressed (two blocks of 4), 3 exact
    assert cache.compressed_tokens == 8 and cache.offset == 11
    assert cache.trim(5) == 5  # 3 exact + 2 compressed: block 2 is decoded back to exact
    assert cache.offset == 6 and cache.compressed_tokens == 4
    assert cache.exact_tokens == 2
    cache.update_and_fetch(*_kv(4, seed=3))
    assert cache.offset == 10
    assert cache.compressed_tokens == 8


def test_make_mask_and_protocol():
    cache = _cache()
    assert cache.empty()
    assert cache.make_mask(1) is None
    assert cache.make_mask(4) == "causal"
    cache.update_and_fetch(*_kv(3))
    m = cache.make_mask(2, return_array=True)
    assert m.shape == (2, 5) and m[0].tolist() == [True] * 4 + [False]
    assert cache.is_trimmable() and not cache.empty()
    assert not hasattr(cache, "bits") and not hasattr(cache, "to_quantized")


def test_bad_input():
    cache = _cache()
    with pytest.raises(ShapeError, match="head_dim=64"):
        cache.update_and_fetch(mx.zeros((1, 2, 3, 32)), mx.zeros((1, 2, 3, 32)))
    with pytest.raises(ShapeError, match="B, H_kv, L, head_dim"):
        cache.update_and_fetch(mx.zeros((2, 3, 64)), mx.zeros((2, 3, 64)))
    with pytest.raises(ConfigError, match="window"):
        CompressedKVCache(cache.key_quantizer, cache.value_quantizer, window=-1)


def test_used_bytes_match_accounting_without_step_padding():
    cache = _cache(bits=4, step=256)
    cache.update_and_fetch(*_kv(100, h=3))
    bpe = cache.key_quantizer.bits_per_element + cache.value_quantizer.bits_per_element
    assert cache.used_nbytes == bpe * 3 * 100 * 64 / 8
    slots = cache.sink + cache.window + cache.block  # exact slots a decode step writes into
    # allocated: one 256-token step of codes, and the exact slots (float32 keys and values)
    assert cache.nbytes == bpe * 3 * 256 * 64 / 8 + 2 * 3 * slots * 64 * 4
    centered = CompressedKVCache(
        cache.key_quantizer, cache.value_quantizer, sink=0, center=True, block=1
    )
    centered.update_and_fetch(*_kv(100, h=3))
    means = 2 * 3 * 64 * 4  # one fp32 mean key and value per head
    assert centered.used_nbytes == cache.used_nbytes + means


def test_sink_tokens_stay_exact_and_attention_matches_reference():
    k = create("toy_uniform", head_dim=64, bits=4)
    v = create("toy_uniform", head_dim=64, bits=4, seed=1)
    cache = CompressedKVCache(k, v, window=2, sink=4, center=True, block=1)
    keys, values = _kv(10)
    cache.update_and_fetch(keys[:, :, :3], values[:, :, :3])  # sink fills across updates
    cache.update_and_fetch(keys[:, :, 3:], values[:, :, 3:])
    assert cache.compressed_tokens == 4 and cache.offset == 10
    st = cache.state
    assert mx.array_equal(st["sink_k"], keys[:, :, :4]).item()
    k1, v1 = _kv(1, seed=7)
    view = cache.update_and_fetch(k1, v1)
    kc = k.decode({n[3:]: a for n, a in st.items() if n.startswith("k__")})[:, :, :4]
    vc = v.decode({n[3:]: a for n, a in st.items() if n.startswith("v__")})[:, :, :4]
    kc, vc = kc + st["key_mean"], vc + st["value_mean"]
    ref_k = mx.concatenate([keys[:, :, :4], kc, keys[:, :, 8:], k1], axis=2)
    ref_v = mx.concatenate([values[:, :, :4], vc, values[:, :, 8:], v1], axis=2)
    q = mx.random.normal((1, 4, 1, 64))
    ref = mx.fast.scaled_dot_product_attention(q, ref_k, ref_v, scale=0.125)
    assert mx.allclose(attend(q, *view, scale=0.125), ref, atol=1e-4).item()
    loaded = CompressedKVCache.from_state(cache.state, cache.meta_state)
    assert loaded.sink == 4 and loaded.offset == 11
    assert cache.trim(9) == 9  # 2 exact, 5 compressed, 2 sink tokens
    assert cache.offset == 2 and cache.compressed_tokens == 0
    assert cache.state["sink_k"].shape[2] == 2


@pytest.mark.parametrize(("window", "sink"), [(0, 0), (3, 2)])
def test_fused_kernel_path_merges_exactly_with_exact_tokens(window, sink):
    from toy_quantizers import ToyFused

    def make(method):
        k = create(method, head_dim=64, bits=4)
        v = create("toy_uniform", head_dim=64, bits=4, seed=1)
        return CompressedKVCache(k, v, window=window, sink=sink, center=True, block=1)

    fused, plain = make("toy_fused"), make("toy_uniform")
    keys, values = _kv(30)
    before = ToyFused.calls
    for lo, hi in ((0, 20), (20, 26), (26, 27), (27, 30)):
        q = mx.random.normal((1, 4, hi - lo, 64), key=mx.random.key(lo))
        mask = "causal" if hi - lo > 1 else None
        outs = []
        for c in (fused, plain):
            view = c.update_and_fetch(keys[:, :, lo:hi], values[:, :, lo:hi])
            outs.append(attend(q, *view, scale=0.125, mask=mask))
        assert mx.allclose(outs[0], outs[1], atol=1e-5).item()
    assert ToyFused.calls > before


def test_centering_removes_a_shared_offset_before_encoding():
    keys, values = _kv(64)
    keys, values = keys + 20.0, values - 20.0  # a large shared per-channel offset
    errs = []
    for center in (False, True):
        k = create("toy_uniform", head_dim=64, bits=4)
        v = create("toy_uniform", head_dim=64, bits=4, seed=1)
        cache = CompressedKVCache(k, v, center=center, block=1)
        cache.update_and_fetch(keys, values)
        view = cache.update_and_fetch(keys[:, :, :1], values[:, :, :1])
        q = mx.random.normal((1, 2, 1, 64), key=mx.random.key(3))
        ref = mx.fast.scaled_dot_product_attention(
            q,
            mx.concatenate([keys, keys[:, :, :1]], 2),
            mx.concatenate([values, values[:, :, :1]], 2),
            scale=0.125,
        )
        errs.append(mx.abs(attend(q, *view, scale=0.125) - ref).max().item())
    assert errs[1] < errs[0] / 3


def test_position_aware_keys_get_their_positions_and_are_not_centered():
    """Compressed token i is at position sink + i in encode, scores and trim's decode."""
    kq = create("toy_positional", head_dim=64, bits=8)
    vq = create("toy_uniform", head_dim=64, bits=8, seed=1)
    cache = CompressedKVCache(kq, vq, window=2, sink=3, center=True, block=1)
    keys, values = _kv(20)
    for lo, hi in ((0, 12), (12, 13), (13, 20)):
        cache.update_and_fetch(keys[:, :, lo:hi], values[:, :, lo:hi])
    st = cache.state
    assert "key_mean" not in st and "value_mean" in st
    q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(2))
    k1, v1 = _kv(1, seed=5)
    view = cache.update_and_fetch(k1, v1)
    ref = mx.fast.scaled_dot_product_attention(
        q, mx.concatenate([keys, k1], 2), mx.concatenate([values, v1], 2), scale=0.125
    )
    # 8-bit codes of x / (1 + position): close to exact only with the right positions
    assert mx.allclose(attend(q, *view, scale=0.125), ref, atol=2e-2).item()
    kq.position_aware = False  # the same codes scored as if every token sat at position 0
    assert not mx.allclose(attend(q, *view, scale=0.125), ref, atol=2e-2).item()
    del kq.position_aware
    codes = {n[3:]: a for n, a in cache.state.items() if n.startswith("k__")}
    # the decode step's token waits in the window until the next step encodes the block
    assert mx.allclose(kq.decode(codes, start=3), keys[:, :, 3:18], atol=0.05).item()
    assert not mx.allclose(kq.decode(codes, start=4), keys[:, :, 3:18], atol=0.05).item()
    assert cache.trim(5) == 5  # 3 exact + 2 compressed; cache stays consistent
    assert cache.compressed_tokens == 13 and cache.offset == 16
    with pytest.raises(ConfigError, match="position-aware"):
        CompressedKVCache(vq, kq)
    with pytest.raises(ConfigError, match="start"):
        kq.encode(keys, start=-1)


def test_blocked_encoding_encodes_whole_blocks_and_keeps_the_rest_exact():
    cache = _cache(window=3, block=8)
    cache.update_and_fetch(*_kv(20))  # 20 - 3 = 17 over the window: two blocks of 8 go
    assert cache.compressed_tokens == 16 and cache.exact_tokens == 4
    counts = []
    for step in range(10):
        cache.update_and_fetch(*_kv(1, seed=step))
        counts.append(cache.compressed_tokens)
    # the exact part grows to window + block = 11 tokens; the next step first encodes a block
    assert counts == [16] * 7 + [24] * 3
    assert cache.offset == 30 and cache.exact_tokens == 6
    loaded = CompressedKVCache.from_state(cache.state, cache.meta_state)
    assert loaded.block == 8
    with pytest.raises(ConfigError, match="block"):
        _cache(block=0)


def test_encode_lag_delays_decode_encodes_only():
    """A decode step encodes a filled block ``encode_lag`` tokens later (prefill chunks do
    not wait); attention stays exact over what is held; the lag survives a state round trip."""
    k = create("toy_uniform", head_dim=64, bits=8)
    v = create("toy_uniform", head_dim=64, bits=8, seed=1)
    cache = CompressedKVCache(k, v, window=3, block=8, sink=0, center=False, encode_lag=5)
    cache.update_and_fetch(*_kv(20))  # a prefill chunk: two blocks go, as without a lag
    assert cache.compressed_tokens == 16 and cache.exact_tokens == 4
    plain = CompressedKVCache(k, v, window=3, block=8, sink=0, center=False)
    plain.update_and_fetch(*_kv(20))
    assert cache.nbytes == plain.nbytes  # a prefill allocates no room for the lag
    counts = []
    for step in range(16):
        view = cache.update_and_fetch(*_kv(1, seed=step))
        counts.append(cache.compressed_tokens)
        q1 = mx.random.normal((1, 6, 1, 64), key=mx.random.key(step))
        kk, vv = _decoded(cache, view)
        assert kk.shape[2] == 21 + step
        ref = _reference(q1, kk, vv, 0.125, None)
        assert mx.allclose(attend(q1, *view, scale=0.125), ref, atol=1e-4).item()
    # the exact part grows to window + block + lag = 16 tokens before the next step encodes
    assert counts == [16] * 12 + [24] * 4
    loaded = CompressedKVCache.from_state(cache.state, cache.meta_state)
    assert loaded.encode_lag == 5 and loaded.exact_tokens == cache.exact_tokens
    with pytest.raises(ConfigError, match="encode_lag"):
        CompressedKVCache(k, v, block=8, encode_lag=8)
    with pytest.raises(ConfigError, match="encode_lag"):
        CompressedKVCache(k, v, block=8, encode_lag=-1)


def test_decode_buffers_have_one_shape_whatever_the_lag():
    """Caches with different lags > 0 (a patched model's layers) decode with exact buffers
    of one shape from the first decode step on: a new shape would cost the compiled decode
    step a new trace at some step of each layer."""
    k = create("toy_uniform", head_dim=64, bits=8)
    v = create("toy_uniform", head_dim=64, bits=8, seed=1)
    caches = [
        CompressedKVCache(k, v, window=3, block=8, sink=1, center=False, encode_lag=lag)
        for lag in range(1, 8)
    ]
    shapes = []
    for c in caches:
        c.update_and_fetch(*_kv(21))
    for step in range(20):
        for c in caches:
            c.update_and_fetch(*_kv(1, seed=step))
        shapes.append({c._xk.shape for c in caches} | {c._xv.shape for c in caches})
    assert all(s == shapes[0] and len(s) == 1 for s in shapes), shapes
    held = [c.compressed_tokens for c in caches]  # longer lags encode later
    assert held == sorted(held, reverse=True) and held[0] > held[-1], held


def test_block_rounds_up_to_the_quantizers_token_block():
    assert _cache(method="toy_block", block=6).block == 8
    assert _cache(method="toy_block", block=1).block == 4


def test_non_finite_values_are_caught_without_a_per_step_sync():
    cache = _cache(block=4)
    k, v = _kv(8)
    k = k.at[0, 1, 2, 5].add(mx.nan)
    view = cache.update_and_fetch(k, v)  # encoded lazily: nothing is read here
    out = attend(mx.ones((1, 2, 8, 64)), *view, scale=0.1, mask="causal")
    view = cache.update_and_fetch(*_kv(1, seed=3))
    out = attend(mx.ones((1, 2, 1, 64)), *view, scale=0.1)
    assert mx.isnan(out).all().item()  # attention over a poisoned cache is NaN
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        cache.state  # noqa: B018  (where a prompt cache is evaluated anyway)
    with pytest.raises(NonFiniteError):
        cache.update_and_fetch(*_kv(4, seed=4))  # the next prefill chunk


def test_a_decode_step_traces_without_a_host_sync():
    """``mx.compile`` refuses any evaluation while tracing (``.item()``, ``.tolist()``,
    ``int(array)``): update_and_fetch + attend of a decode step must trace."""
    cache = _cache(window=0, block=16, method="toy_uniform")
    cache.update_and_fetch(*_kv(40))
    k1, v1 = _kv(1, seed=8)
    q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(2))
    eager = CompressedKVCache.from_state(cache.state, cache.meta_state)
    want = attend(q, *eager.update_and_fetch(k1, v1), scale=0.125)

    def step(q, k, v):
        return attend(q, *cache.update_and_fetch(k, v), scale=0.125)

    got = mx.compile(step)(q, k1, v1)
    assert mx.allclose(got, want, atol=1e-6).item()
