"""CompressedRotatingKVCache against mlx-lm's RotatingKVCache: the same attention, bounded
memory, save/load and trim round trips, and patched sliding-window models.

Exactness uses 8-bit affine codes on inputs they store losslessly (integers 0..255 with
each token's group spanning 0 and 255: scale 1, offset 0), so any difference from mlx-lm
comes from which tokens attention sees, never from quantization.
"""

import copy
import json

import mlx.core as mx
import pytest
from mlx_lm.models.cache import (
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from tiny_models import build

from vq_core import CacheStateError, CompressedRotatingKVCache, ConfigError, attend, make_cache
from vq_core.cache_integrity import state_checksum
from vq_mlxlm import load_prompt_cache as vq_load
from vq_mlxlm import patch
from vq_mlxlm import save_prompt_cache as vq_save

DECODE = [1] * 40
PATTERNS = {  # chunk sizes fed one after another
    "prefill then decode": [20, *DECODE],
    "decode only": [1] * 60,
    "chunks longer than the window": [5, 40, 1, 1, 1, 33, *DECODE[:20]],
    "mixed": [5, 1, 1, 7, 1, 1, 1, 9, 1, 1, 16, 1, 1, 1, 1, 2, 1, 30, 1, 1],
}


def _grid(shape, seed):
    x = mx.random.randint(0, 256, shape, key=mx.random.key(seed)).astype(mx.float32)
    x[..., 0] = 0
    x[..., 1] = 255
    return x


def _pair(max_size, keep, block, method="affine", bits=8, center=False):
    base = make_cache(method, head_dim=64, bits=bits, block=block, center=center, sink=0)
    return (
        CompressedRotatingKVCache.like(base, max_size=max_size, keep=keep),
        RotatingKVCache(max_size=max_size, keep=keep),
    )


def _step(ours, ref, n, seed, scale=0.002):
    k, v = _grid((1, 2, n, 64), 3 * seed), _grid((1, 2, n, 64), 3 * seed + 1)
    q = mx.random.normal((1, 4, n, 64), key=mx.random.key(3 * seed + 2))
    w = ref.max_size
    ref_mask, our_mask = ref.make_mask(n, window_size=w), ours.make_mask(n, window_size=w)
    want = mx.fast.scaled_dot_product_attention(
        q, *ref.update_and_fetch(k, v), scale=scale, mask=ref_mask
    )
    got = attend(q, *ours.update_and_fetch(k, v), scale=scale, mask=our_mask)
    return mx.abs(got - want).max().item()


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize(("max_size", "keep", "block"), [(16, 0, 4), (16, 4, 4), (24, 2, 8)])
def test_attention_equals_mlx_lm_rotating_cache(pattern, max_size, keep, block):
    ours, ref = _pair(max_size, keep, block)
    errs = [_step(ours, ref, n, i) for i, n in enumerate(PATTERNS[pattern])]
    assert max(errs) < 1e-3  # outputs are ~0..255: lossless codes, the same tokens seen
    assert ours.offset == ref.offset and ours.size() == ref.size()
    assert ours.evicted > 0 and ours.compressed_tokens > 0
    # held: the `keep` first, at most max_size - 1 - keep newer, plus less than one block
    held = ours.offset - ours.evicted
    assert held <= max_size - 1 + block - 1 + max(PATTERNS[pattern][-1] - 1, 0)


def test_decode_steps_take_the_compressed_path_without_a_mask():
    ours, ref = _pair(16, 0, 4)
    for i in range(30):
        _step(ours, ref, 1, i)
        assert ours.make_mask(1, window_size=16) is None
    kv, _ = ours.update_and_fetch(_grid((1, 2, 1, 64), 99), _grid((1, 2, 1, 64), 98))
    assert kv.n_comp > 0 and kv.shape[2] == 16  # exactly the window, no expired token


def test_memory_is_bounded_by_the_window():
    ours, _ = _pair(32, 0, 8, method="turboquant_mse", bits=4, center=True)
    sizes = []
    for _ in range(300):
        ours.update_and_fetch(mx.random.normal((1, 2, 1, 64)), mx.random.normal((1, 2, 1, 64)))
        sizes.append(ours.nbytes)
    assert ours.offset == 300 and ours.evicted >= 300 - 32 - 8
    assert max(sizes[100:]) == max(sizes[40:100])  # capacity stops growing
    fp16_window = 2 * 2 * 32 * 64 * 2
    assert max(sizes) < fp16_window  # codes for the window, not for every token seen


def test_state_round_trip_and_refusals():
    ours, ref = _pair(16, 2, 4)
    for i, n in enumerate([10, 1, 1, 9, 1, 1, 1]):
        _step(ours, ref, n, i)
    state = ours.state
    loaded = CompressedRotatingKVCache.from_state(state)
    assert (loaded.evicted, loaded.offset, loaded.keep, loaded.max_size) == (
        ours.evicted,
        ours.offset,
        2,
        16,
    )
    twin = copy.deepcopy(ours)
    for i in range(8):
        k, v = _grid((1, 2, 1, 64), 50 + i), _grid((1, 2, 1, 64), 60 + i)
        q = mx.random.normal((1, 4, 1, 64))
        a = attend(q, *twin.update_and_fetch(k, v), scale=0.002)
        b = attend(q, *loaded.update_and_fetch(k, v), scale=0.002)
        assert mx.array_equal(a, b).item()
    meta = json.loads(state["meta"])
    arrays = {k: v for k, v in state.items() if k not in ("meta", "checksum")}
    for edit, match in (({"evicted": 3}, "whole blocks"), ({"offset": 99}, "offset")):
        edited = json.dumps({**meta, **edit})  # re-signed: the meta itself is refused
        bad = {**arrays, "meta": edited, "checksum": state_checksum(edited, arrays)}
        with pytest.raises(CacheStateError, match=match):
            CompressedRotatingKVCache.from_state(bad)
    with pytest.raises(CacheStateError, match="checksum"):
        CompressedRotatingKVCache.from_state({**state, "meta": json.dumps({**meta, "keep": 3})})


def test_trim_like_mlx_lm():
    ours, ref = _pair(16, 0, 4)
    for i, n in enumerate([6, 1, 1, 1]):
        _step(ours, ref, n, i)
    assert ours.is_trimmable() == ref.is_trimmable() is True
    assert ours.trim(3) == ref.trim(3) == 3
    assert _step(ours, ref, 2, 10) < 1e-3
    for i in range(20):
        _step(ours, ref, 1, 20 + i)
    assert ours.is_trimmable() == ref.is_trimmable() is False
    assert ours.trim(2) == 0


def _run(model, cache, tokens, chunk):
    return mx.concatenate(
        [model(tokens[:, i : i + chunk], cache=cache) for i in range(0, tokens.shape[1], chunk)],
        axis=1,
    )


TOKENS = (mx.arange(60)[None] * 37) % 97


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss"])
def test_patched_sliding_layers_save_load_and_trim(arch, tmp_path):
    model = patch(build(arch, init="fan_in"), "turboquant_mse", bits=4, block=4)
    cache = make_prompt_cache(model)
    assert any(isinstance(c, CompressedRotatingKVCache) for c in cache)
    _run(model, cache, TOKENS[:, :40], 8)
    assert max(c.evicted for c in cache if isinstance(c, CompressedRotatingKVCache)) > 0
    save_prompt_cache(str(tmp_path / "m.safetensors"), cache)
    vq_save(tmp_path / "v.safetensors", cache, model=model)
    for loaded in (
        load_prompt_cache(str(tmp_path / "m.safetensors")),
        vq_load(tmp_path / "v.safetensors", model=model),
    ):
        a = _run(model, copy.deepcopy(cache), TOKENS[:, 40:], 1)
        b = _run(model, loaded, TOKENS[:, 40:], 1)
        assert mx.array_equal(a, b).item()
    # past the window mlx-lm cannot trim a rotating cache, and neither does vq
    assert trim_prompt_cache(cache, 3) == 0
    # within the window it trims like mlx-lm: 14 tokens less 1 == 13 tokens (the same first
    # chunk fixes the same centering means; the trimmed token was still exact)
    short, long = make_prompt_cache(model), make_prompt_cache(model)
    for cache, n in ((short, 5), (long, 6)):
        _run(model, cache, TOKENS[:, :8], 8)
        _run(model, cache, TOKENS[:, 8 : 8 + n], n)
    assert trim_prompt_cache(long, 1) == 1
    a, b = _run(model, short, TOKENS[:, 13:20], 1), _run(model, long, TOKENS[:, 13:20], 1)
    assert mx.allclose(a, b, atol=1e-5).item()


def test_sliding_exact_keeps_mlx_lm_caches():
    model = patch(build("gemma3_text"), "turboquant_mse", bits=4, sliding="exact")
    assert [type(c).__name__ for c in make_prompt_cache(model)] == [
        "RotatingKVCache",
        "CompressedKVCache",
    ]
    with pytest.raises(ConfigError, match="sliding='yes' is not allowed"):
        patch(build("gemma3_text"), "turboquant_mse", bits=4, sliding="yes")
