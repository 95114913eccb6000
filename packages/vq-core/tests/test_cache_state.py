"""Copying a CompressedKVCache, and refusing a corrupt or inconsistent saved state."""

import copy
import json

import mlx.core as mx
import pytest

from vq_core import CacheStateError, CompressedKVCache, attend, create


def _cache(method="toy_uniform", bits=8, window=3, sink=1, center=True):
    k = create(method, head_dim=64, bits=bits)
    v = create(method, head_dim=64, bits=bits, seed=1)
    return CompressedKVCache(k, v, window=window, sink=sink, step=16, center=center, block=1)


def _kv(n, seed=0, dtype=mx.float16):
    k1, k2 = mx.random.split(mx.random.key(seed))
    shape = (1, 2, n, 64)
    return (
        mx.random.normal(shape, key=k1).astype(dtype),
        mx.random.normal(shape, key=k2).astype(dtype),
    )


def _step(cache, seed):
    view = cache.update_and_fetch(*_kv(1, seed=seed))
    q = mx.random.normal((1, 2, 1, 64), key=mx.random.key(100 + seed))
    return attend(q, *view, scale=0.125)


def _arrays(cache):
    return {k: mx.array(v) for k, v in cache.state.items() if isinstance(v, mx.array)}


@pytest.mark.parametrize("method", ["toy_uniform", "toy_block"])
def test_deepcopy_is_independent_and_continues_like_the_original(method):
    cache = _cache(method=method)
    cache.update_and_fetch(*_kv(21))  # fp16 input: the cache remembers the input dtype
    before = _arrays(cache)
    twin = copy.deepcopy(cache)
    assert twin.key_quantizer is cache.key_quantizer  # stateless, shared
    assert twin.offset == cache.offset
    outs = [_step(twin, s) for s in range(6)]  # grows the copy's buffers past a step
    assert twin.offset == cache.offset + 6
    after = _arrays(cache)
    assert before.keys() == after.keys()
    for name in before:  # the original did not move
        assert mx.array_equal(before[name], after[name]).item(), name
    trimmed = copy.deepcopy(twin)
    trimmed.trim(3)  # trimming a copy leaves its source alone
    assert twin.offset == cache.offset + 6
    fresh = _cache(method=method)
    fresh.update_and_fetch(*_kv(21))
    for s, out in enumerate(outs):  # the copy computes what a fresh cache computes
        assert mx.array_equal(_step(fresh, s), out).item()


def test_deepcopy_of_an_empty_cache():
    twin = copy.deepcopy(_cache())
    assert twin.empty()
    _step(twin, 0)
    assert twin.offset == 1


def test_state_round_trip_keeps_the_checksum_valid():
    cache = _cache()
    cache.update_and_fetch(*_kv(21))
    state = cache.state
    assert state["checksum"].dtype == mx.uint32
    loaded = CompressedKVCache.from_state(state)
    assert loaded.offset == 21
    assert mx.array_equal(loaded.state["checksum"], state["checksum"]).item()
    assert mx.array_equal(_step(loaded, 1), _step(cache, 1)).item()


def _flip(a: mx.array, index: int, bit: int) -> mx.array:
    """``a`` with one bit flipped (element ``index`` of its unsigned-integer view)."""
    width = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}[a.dtype.size]
    u = mx.array(a).view(width).reshape(-1)
    u[index] = u[index] ^ mx.array(1 << bit, dtype=width)
    return u.reshape(a.shape).view(a.dtype)


def test_every_single_bit_flip_in_a_state_array_is_refused():
    cache = _cache()
    cache.update_and_fetch(*_kv(21))
    state = cache.state
    names = [n for n, a in state.items() if isinstance(a, mx.array) and n != "checksum"]
    assert {"k__q", "k__scale", "exact_k", "sink_v", "key_mean"} <= set(names)
    for name in names:
        a = state[name]
        n_bits = a.dtype.size * 8
        for index in {0, a.size // 2, a.size - 1}:
            for bit in range(n_bits):
                bad = dict(state, **{name: _flip(a, index, bit)})
                with pytest.raises(CacheStateError, match=repr(name)):
                    CompressedKVCache.from_state(bad)


def test_swapped_renamed_removed_or_reshaped_arrays_are_refused():
    cache = _cache(window=0)
    cache.update_and_fetch(*_kv(21))
    state = cache.state
    swapped = dict(state, k__q=state["v__q"], v__q=state["k__q"])  # equal shapes
    with pytest.raises(CacheStateError, match="checksum"):
        CompressedKVCache.from_state(swapped)
    removed = {k: v for k, v in state.items() if k != "k__scale"}
    with pytest.raises(CacheStateError, match="removed"):
        CompressedKVCache.from_state(removed)
    reshaped = dict(state, key_mean=state["key_mean"].reshape(1, 2, 64, 1))
    with pytest.raises(CacheStateError, match="list of arrays"):
        CompressedKVCache.from_state(reshaped)
    with pytest.raises(CacheStateError, match="no 'checksum'"):
        CompressedKVCache.from_state({k: v for k, v in state.items() if k != "checksum"})
    with pytest.raises(CacheStateError, match="no 'meta'"):
        CompressedKVCache.from_state({k: v for k, v in state.items() if k != "meta"})


def _resealed(state, meta=None, **arrays):
    """A state edited and given a fresh checksum: only the structural checks can catch it."""
    from vq_core.cache_integrity import state_checksum

    meta = state["meta"] if meta is None else meta
    body = {k: v for k, v in state.items() if k not in ("meta", "checksum")}
    body.update(arrays)
    body = {k: v for k, v in body.items() if v is not None}
    return {"meta": meta, **body, "checksum": state_checksum(meta, body)}


def test_edited_meta_is_refused_by_the_checksum_and_bad_fields_by_name():
    cache = _cache()
    cache.update_and_fetch(*_kv(21))
    state = cache.state
    meta = json.loads(state["meta"])
    meta["key"]["config"]["seed"] = 7
    with pytest.raises(CacheStateError, match="meta"):
        CompressedKVCache.from_state(dict(state, meta=json.dumps(meta)))
    with pytest.raises(CacheStateError, match="not JSON"):
        CompressedKVCache.from_state(_resealed(state, meta="{"))
    for field, value in (("window", "3"), ("center", 1), ("offset", None), ("key", [])):
        edited = dict(json.loads(state["meta"]), **{field: value})
        with pytest.raises(CacheStateError, match=repr(field)):
            CompressedKVCache.from_state(_resealed(state, meta=json.dumps(edited)))
    edited = json.loads(state["meta"])
    edited["key"]["method"] = "no_such_method"
    with pytest.raises(CacheStateError, match="no_such_method"):
        CompressedKVCache.from_state(_resealed(state, meta=json.dumps(edited)))


def test_resealed_states_with_wrong_shapes_dtypes_or_offset_are_refused():
    cache = _cache(window=2)
    cache.update_and_fetch(*_kv(21))
    state = cache.state
    k_q, scale = state["k__q"], state["k__scale"]
    cases = {
        "k__q": dict(k__q=k_q[..., :-1]),  # one word short per token
        "uint32": dict(k__q=k_q.astype(mx.uint8)),
        "fields": dict(k__scale=None),
        "disagree on token count": dict(k__scale=scale[:, :, :-1]),
        "compressed keys": dict(k__q=k_q[:, :, :-1], k__scale=scale[:, :, :-1]),
        "float": dict(exact_k=state["exact_k"][..., :8]),
        "only one of": dict(exact_v=None),
        "batch, kv heads": dict(key_mean=mx.concatenate([state["key_mean"]] * 2, axis=1)),
        "unknown array": dict(extra=mx.zeros((1,))),
    }
    for message, edit in cases.items():
        with pytest.raises(CacheStateError, match=message):
            CompressedKVCache.from_state(_resealed(state, **edit))
    meta = dict(json.loads(state["meta"]), offset=20)
    with pytest.raises(CacheStateError, match="offset 20"):
        CompressedKVCache.from_state(_resealed(state, meta=json.dumps(meta)))
