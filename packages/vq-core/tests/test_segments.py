"""The attention seam: segments, their merge, the compressed-attention table."""

import itertools

import mlx.core as mx
import pytest

from vq_core import (
    CompressedKVCache,
    ConfigError,
    attend,
    create,
    register_compressed_attention,
    registered_compressed_attention,
)
from vq_core import attention as attention_module
from vq_core import compressed_attention as table_module
from vq_core import segments as segments_module
from vq_core.segments import combine, exact_segment, merge


def _x(shape, seed):
    return mx.random.normal(shape, key=mx.random.key(seed))


def _softmax_attention(q, k, v, scale, visible=None):
    s = (q @ mx.swapaxes(k, -1, -2)) * scale
    if visible is not None:
        s = mx.where(visible, s, -mx.inf)
    return mx.softmax(s, axis=-1, precise=True) @ v


@pytest.mark.parametrize("sizes", [(5, 1, 9), (16, 3, 2, 7)])
def test_segments_merged_in_any_order_equal_one_softmax(sizes):
    q = _x((2, 3, 4, 16), 0)
    ks = [_x((2, 3, n, 16), 1 + i) for i, n in enumerate(sizes)]
    vs = [_x((2, 3, n, 16), 10 + i) for i, n in enumerate(sizes)]
    ref = _softmax_attention(q, mx.concatenate(ks, 2), mx.concatenate(vs, 2), 0.3)
    segs = [exact_segment(q, k, v, scale=0.3) for k, v in zip(ks, vs, strict=True)]
    for order in itertools.permutations(range(len(segs))):
        out = merge([segs[i] for i in order])
        assert mx.allclose(out, ref, atol=1e-5).item(), order
    if len(segs) == 3:  # the two-segment merge a GPU compiles, run eagerly here
        two = exact_segment(q, mx.concatenate(ks[:2], 2), mx.concatenate(vs[:2], 2), scale=0.3)
        out = segments_module._merge_pair(*two, *segs[2])
        assert mx.allclose(out, ref, atol=1e-5).item()
    # and the merged log-sum-exp is the log-sum-exp of all scores
    all_s = (q @ mx.swapaxes(mx.concatenate(ks, 2), -1, -2)) * 0.3
    assert mx.allclose(combine(segs)[1], mx.logsumexp(all_s, axis=-1), atol=1e-5).item()


def test_a_segment_with_no_visible_token_contributes_nothing():
    q, k, v = _x((1, 1, 3, 8), 0), _x((1, 1, 5, 8), 1), _x((1, 1, 5, 8), 2)
    hidden = mx.zeros((1, 1, 3, 5), dtype=mx.bool_)
    empty = exact_segment(q, k, v, scale=1.0, mask=hidden)
    assert mx.all(empty[1] == -mx.inf).item() and mx.all(empty[0] == 0).item()
    k2, v2 = _x((1, 1, 4, 8), 3), _x((1, 1, 4, 8), 4)
    out = merge([empty, exact_segment(q, k2, v2, scale=1.0)])
    assert mx.allclose(out, _softmax_attention(q, k2, v2, 1.0), atol=1e-6).item()


def _filled(method="toy_uniform", n=300, block=1, **kw):
    k = create(method, head_dim=64, bits=8)
    v = create("toy_uniform", head_dim=64, bits=8, seed=1)
    cache = CompressedKVCache(k, v, sink=1, center=True, block=block, **kw)
    keys, values = _x((1, 2, n, 64), 5), _x((1, 2, n, 64), 6)
    cache.update_and_fetch(keys, values)
    return cache, keys, values


def _reference(cache, view, q, mask, scale=0.125):
    """Attention over the decoded reconstruction, in token order."""
    kv, vv = view
    s0 = kv.n_sink
    ks, vs = (
        mx.concatenate([x.exact[:, :, :s0], x.decoded(0, x.n_comp), x.exact[:, :, s0:]], 2)
        for x in (kv, vv)
    )
    return mx.fast.scaled_dot_product_attention(q, ks, vs, scale=scale, mask=mask)


@pytest.mark.parametrize("lq", [1, 4, 40])
@pytest.mark.parametrize("mask_kind", ["causal", "array"])
@pytest.mark.parametrize("prefill_on_sdpa", [False, True])  # the tiles, or the GPU's choice
def test_prefill_tiles_and_decode_equal_attention_over_the_reconstruction(
    lq, mask_kind, prefill_on_sdpa, monkeypatch
):
    monkeypatch.setattr(attention_module, "_prefill_on_sdpa", lambda: prefill_on_sdpa)
    monkeypatch.setattr(attention_module, "PREFILL_TILE", 64)  # several tiles of history
    monkeypatch.setattr(table_module, "TILE_TOKENS", 64)
    cache, _, _ = _filled()
    if mask_kind == "causal":
        mask = "causal" if lq > 1 else None
    else:  # a sliding-window boolean mask over all tokens, as mlx-lm builds one
        mask = cache.make_mask(lq, return_array=True, window_size=200)
    view = cache.update_and_fetch(_x((1, 2, lq, 64), 7), _x((1, 2, lq, 64), 8))
    q = _x((1, 6, lq, 64), 9)
    out = attend(q, *view, scale=0.125, mask=mask)
    assert mx.allclose(out, _reference(cache, view, q, mask), atol=1e-4).item()


def test_table_picks_the_pair_then_the_key_format_then_the_reference(monkeypatch):
    monkeypatch.setattr(table_module, "_TABLE", dict(registered_compressed_attention()))
    calls = []

    def wildcard(q, keys, values, *, scale):
        calls.append("wildcard")
        return None  # does not apply: the reference runs

    def pair(q, keys, values, *, scale):
        calls.append("pair")
        return table_module.reference_segment(q, keys, values, scale=scale)

    register_compressed_attention("toy_block", "*", wildcard)
    cache, _, _ = _filled("toy_block", n=41, block=4)
    view = cache.update_and_fetch(_x((1, 2, 1, 64), 7), _x((1, 2, 1, 64), 8))
    q = _x((1, 2, 1, 64), 9)
    out = attend(q, *view, scale=0.125)
    assert calls == ["wildcard"]
    assert mx.allclose(out, _reference(cache, view, q, None), atol=1e-4).item()
    register_compressed_attention("toy_block", "toy_uniform", pair)
    attend(q, *view, scale=0.125)
    assert calls == ["wildcard", "pair"]
    with pytest.raises(ConfigError, match="already registered"):
        register_compressed_attention("toy_block", "toy_uniform", pair)
    with pytest.raises(ConfigError, match="key_method"):
        register_compressed_attention("*", "toy_uniform", pair)


def test_ragged_lengths_hide_each_rows_tail():
    k = create("toy_uniform", head_dim=64, bits=8)
    keys, values = _x((2, 2, 50, 64), 1), _x((2, 2, 50, 64), 2)
    kc, vc = k.encode(keys), k.encode(values)
    lengths = mx.array([50, 20], dtype=mx.int32)
    side_k = table_module.CompressedSide(k, kc, 50, lengths=lengths)
    side_v = table_module.CompressedSide(k, vc, 50, lengths=lengths)
    q = _x((2, 2, 3, 64), 3)
    out, _ = table_module.reference_segment(q, side_k, side_v, scale=0.125)
    for b, n in enumerate((50, 20)):
        ref = _softmax_attention(
            q[b : b + 1], k.decode(kc)[b : b + 1, :, :n], k.decode(vc)[b : b + 1, :, :n], 0.125
        )
        assert mx.allclose(out[b : b + 1], ref, atol=1e-5).item()
