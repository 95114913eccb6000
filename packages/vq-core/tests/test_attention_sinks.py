"""Learned attention sinks (gpt-oss): one more (out = 0, lse = sink logit) segment."""

import mlx.core as mx
import pytest

from vq_core import CompressedKVCache, ShapeError, attend, create
from vq_core import attention as attention_module
from vq_core import compressed_attention as table_module


def _x(shape, seed):
    return mx.random.normal(shape, key=mx.random.key(seed))


def _filled(n, block=1):
    k = create("toy_uniform", head_dim=64, bits=8)
    v = create("toy_uniform", head_dim=64, bits=8, seed=1)
    cache = CompressedKVCache(k, v, sink=1, center=True, block=block)
    if n:
        cache.update_and_fetch(_x((1, 2, n, 64), 5), _x((1, 2, n, 64), 6))
    return cache


def _reconstruction(view):
    kv, vv = view
    s0 = kv.n_sink
    if kv.n_comp == 0:
        return [kv.exact, vv.exact]
    return [
        mx.concatenate([x.exact[:, :, :s0], x.decoded(0, x.n_comp), x.exact[:, :, s0:]], 2)
        for x in (kv, vv)
    ]


@pytest.mark.parametrize("history", [0, 150])  # exact only (SDPA), or compressed history
@pytest.mark.parametrize("lq", [1, 4, 40])  # decode, a small chunk, the prefill path
@pytest.mark.parametrize("prefill_on_sdpa", [False, True])
def test_sinks_equal_sdpa_with_sinks_over_the_reconstruction(
    history, lq, prefill_on_sdpa, monkeypatch
):
    monkeypatch.setattr(attention_module, "_prefill_on_sdpa", lambda: prefill_on_sdpa)
    monkeypatch.setattr(attention_module, "PREFILL_TILE", 64)
    monkeypatch.setattr(table_module, "TILE_TOKENS", 64)
    cache = _filled(history)
    mask = "causal" if lq > 1 else None
    view = cache.update_and_fetch(_x((1, 2, lq, 64), 7), _x((1, 2, lq, 64), 8))
    q = _x((1, 6, lq, 64), 9)
    sinks = _x((6,), 10) * 3.0  # large enough to take a real share of each row
    out = attend(q, *view, scale=0.125, mask=mask, sinks=sinks)
    k, v = _reconstruction(view)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask, sinks=sinks)
    assert mx.allclose(out, ref, atol=1e-4).item()
    plain = attend(q, *view, scale=0.125, mask=mask)
    assert mx.abs(out - plain).max().item() > 1e-2  # the sinks changed the output


def test_sinks_with_an_array_mask_on_the_tiled_path(monkeypatch):
    monkeypatch.setattr(attention_module, "_prefill_on_sdpa", lambda: False)
    monkeypatch.setattr(attention_module, "PREFILL_TILE", 64)
    cache = _filled(150)
    mask = cache.make_mask(3, return_array=True, window_size=100)
    view = cache.update_and_fetch(_x((1, 2, 3, 64), 7), _x((1, 2, 3, 64), 8))
    q, sinks = _x((1, 4, 3, 64), 9), _x((4,), 10)
    out = attend(q, *view, scale=0.125, mask=mask, sinks=sinks)
    k, v = _reconstruction(view)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask, sinks=sinks)
    assert mx.allclose(out, ref, atol=1e-4).item()


@pytest.mark.parametrize("sinks", [mx.zeros((3,)), mx.zeros((6, 1)), [0.0] * 6])
def test_sinks_of_the_wrong_shape_are_refused(sinks):
    view = _filled(40).update_and_fetch(_x((1, 2, 1, 64), 7), _x((1, 2, 1, 64), 8))
    with pytest.raises(ShapeError, match=r"sinks must be an array of shape \(6,\)"):
        attend(_x((1, 6, 1, 64), 9), *view, scale=0.125, sinks=sinks)
