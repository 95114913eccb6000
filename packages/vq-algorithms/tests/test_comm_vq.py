"""CommVQ: RoPE-commuting additive codebooks (the math; training is tested in vq-calibrate)."""

import itertools

import mlx.core as mx
import mlx.nn as nn
import pytest

from vq_algorithms._rope import RopeGeometry, probe_rope
from vq_algorithms.comm_vq import CommVQ, CommVQConfig, untrained_tables
from vq_core import CompressedKVCache, ConfigError, ShapeError, attend, create, make_cache


def _tables(heads, bits=2, d=64, table_bits=6, seed=0):
    cfg = CommVQConfig(head_dim=d, bits=bits, table_bits=table_bits, seed=seed)
    return mx.concatenate([untrained_tables(CommVQConfig(**{**cfg.to_dict(), "seed": seed + h}))
                           for h in range(heads)])  # fmt: skip


def _quantizer(geometry=None, heads=2, bits=2, d=64, table_bits=6):
    cfg = CommVQConfig(head_dim=d, bits=bits, table_bits=table_bits)
    return CommVQ(cfg, tables=_tables(heads, bits, d, table_bits), geometry=geometry)


@pytest.mark.parametrize("traditional", [False, True])
def test_codes_of_rotated_keys_are_the_codes_of_the_keys(traditional):
    """Encoding post-RoPE keys at their positions == encoding pre-RoPE keys; decoding puts
    RoPE back: one codebook serves every position because it commutes with RoPE."""
    d, start = 64, 1000
    rope = nn.RoPE(d, traditional=traditional, base=10000)
    geometry = probe_rope(rope, d)
    no_rope = RopeGeometry(geometry.perm, mx.zeros_like(geometry.freqs))  # same pairs
    with_rope, without = _quantizer(geometry), _quantizer(no_rope)
    assert with_rope.position_aware and not without.position_aware
    k = mx.random.normal((1, 2, 40, d), key=mx.random.key(1))
    k_post = rope(k, offset=start)
    a, b = with_rope.encode(k_post, start=start), without.encode(k)
    mismatch = (a["idx"] != b["idx"]).any(axis=-1).mean().item()
    assert mismatch < 0.03  # fp32 rounding of the rotation may flip a near-tie
    assert mx.allclose(a["norm"], b["norm"], rtol=1e-3).item()
    back = with_rope.decode(b, start=start)
    assert mx.allclose(back, rope(without.decode(b), offset=start), atol=2e-3).item()
    q = mx.random.normal((1, 2, 3, d), key=mx.random.key(2))
    s = with_rope.scores(q, b, start=start)
    assert mx.allclose(s, q @ mx.swapaxes(back, -1, -2), atol=1e-3).item()
    wrong = with_rope.decode(b, start=start + 1)
    assert not mx.allclose(wrong, back, atol=1e-2).item()


def test_each_stage_picks_the_nearest_of_all_k_squared_codewords():
    q = _quantizer(heads=1, bits=2, d=16, table_bits=2)  # K = 4: 16 codewords per stage
    x = mx.random.normal((30, 16), key=mx.random.key(3))
    codes = q.encode(x)
    t = q.tables[0, 0]  # stage 0 table [K, P, 2]
    words = [t[a_] + mx.stack([-t[b_][..., 1], t[b_][..., 0]], -1) for a_, b_ in
             itertools.product(range(4), range(4))]  # fmt: skip
    cw = mx.stack(words).reshape(16, 16)
    u = x / mx.linalg.norm(x, axis=-1, keepdims=True)
    best = mx.argmin(((u[:, None] - cw[None]) ** 2).sum(-1), axis=-1)
    first = codes["idx"][:, 0].astype(mx.uint32) & 15  # A_0 | B_0 << 2
    assert mx.array_equal(first, (best // 4) | ((best % 4) << 2)).item()


def test_bits_are_an_exact_upper_bound():
    for d, bits in ((64, 1), (64, 2), (128, 2), (96, 3), (128, 4)):
        q = create("comm_vq", head_dim=d, bits=bits, untrained=True)
        assert q.bits_per_element <= bits
        codes = q.encode(mx.random.normal((5, d)))
        assert codes.nbytes * 8 == q.bits_per_element * 5 * d
    assert CommVQConfig(head_dim=128, bits=2).stages == 20  # paper: 2-bit, 21
    with pytest.raises(ConfigError, match="no room"):
        create("comm_vq", head_dim=8, bits=1)


def test_per_head_tables_need_the_head_axis_and_values_are_refused():
    q = _quantizer(probe_rope(nn.RoPE(64), 64), heads=2)
    with pytest.raises(ShapeError, match="per KV head"):
        q.encode(mx.random.normal((3, 5, 64)))
    with pytest.raises(ConfigError, match="keys only"):
        create("comm_vq", head_dim=64, bits=2, kind="v")
    cache = make_cache("comm_vq", head_dim=64, bits=2, untrained=True)
    assert cache.value_quantizer.method == "turboquant_mse"
    with pytest.raises(ConfigError, match="tables have shape"):
        CommVQ(CommVQConfig(head_dim=64, bits=2), tables=_tables(2, bits=1))


def test_cache_attention_over_commvq_keys_matches_decoded_reference():
    d = 64
    rope = nn.RoPE(d, base=10000)
    kq = _quantizer(probe_rope(rope, d), heads=2)
    vq = create("turboquant_mse", head_dim=d, bits=4)
    cache = CompressedKVCache(kq, vq, sink=2, window=3, center=True, block=1)
    k = rope(mx.random.normal((1, 2, 30, d), key=mx.random.key(4)))
    v = mx.random.normal((1, 2, 30, d), key=mx.random.key(5))
    cache.update_and_fetch(k[:, :, :20], v[:, :, :20])
    cache.update_and_fetch(k[:, :, 20:29], v[:, :, 20:29])
    view = cache.update_and_fetch(k[:, :, 29:], v[:, :, 29:])
    st = cache.state
    kc = kq.decode({n[3:]: a for n, a in st.items() if n.startswith("k__")}, start=2)
    vc = vq.decode({n[3:]: a for n, a in st.items() if n.startswith("v__")}) + st["value_mean"]
    n = cache.compressed_tokens  # the step's token waits in the window; the next step encodes
    rk = mx.concatenate([k[:, :, :2], kc[:, :, :n], k[:, :, 2 + n :]], axis=2)
    rv = mx.concatenate([v[:, :, :2], vc[:, :, :n], v[:, :, 2 + n :]], axis=2)
    q = mx.random.normal((1, 6, 1, d), key=mx.random.key(6))
    ref = mx.fast.scaled_dot_product_attention(q, rk, rv, scale=d**-0.5)
    assert mx.allclose(attend(q, *view, scale=d**-0.5), ref, atol=1e-4).item()
    assert "key_mean" not in st  # post-RoPE means are not subtracted from RoPE-free codes


def test_probe_rope_reads_standard_partial_and_refuses_non_rotations():
    for trad in (False, True):
        got = probe_rope(nn.RoPE(64, traditional=trad, base=500.0), 64)
        assert got.matches(RopeGeometry.standard(64, 500.0, trad))
    partial = probe_rope(nn.RoPE(32, base=10000), 64)  # last 32 coordinates unrotated
    assert (partial.freqs == 0).sum().item() == 16

    def scaled(x, offset=0):
        return 1.5 * nn.RoPE(64)(x, offset=offset)

    with pytest.raises(ConfigError, match="not a plain per-pair rotation"):
        probe_rope(scaled, 64)
