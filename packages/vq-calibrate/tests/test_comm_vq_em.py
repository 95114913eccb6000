"""CommVQ's EM: the structured M-step is the exact minimizer, and trained RoPE-commuting
codebooks beat the untrained ones (and a calibration-free neighbour) on structured keys."""

import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vq_algorithms._rope import RopeGeometry, probe_rope
from vq_calibrate import SafetensorsStore
from vq_calibrate.capture import Capture
from vq_calibrate.commutative_em import codewords_parts, hard_assign, m_step, train_tables
from vq_calibrate.train import train_comm_vq
from vq_core import ArtifactError, ConfigError, create


def _objective(u, w, theta):
    a, b = codewords_parts(theta)
    cw = a[:, None, :] + b[None, :, :]  # [K, K, 2P]
    return float((w * ((u[:, None, None, :] - cw[None]) ** 2).sum(-1)).sum())


def test_m_step_is_the_exact_weighted_least_squares_minimizer():
    rng = np.random.default_rng(0)
    n, k, p = 300, 4, 3
    u = rng.standard_normal((n, 2 * p)).astype(np.float32)
    w = rng.random((n, k, k)).astype(np.float32) ** 4
    w /= w.sum((1, 2), keepdims=True)
    theta = m_step(u, w, ridge=0.0)
    best = _objective(u, w, theta)
    for _ in range(20):
        bumped = theta + 1e-2 * rng.standard_normal(theta.shape).astype(np.float32)
        assert _objective(u, w, bumped) > best


def test_m_step_recovers_a_structured_codebook_from_its_codewords():
    rng = np.random.default_rng(1)
    k, p = 8, 4
    truth = rng.standard_normal((k, p, 2)).astype(np.float32)
    ia, ib = rng.integers(k, size=500), rng.integers(k, size=500)
    a, b = codewords_parts(truth)
    u = a[ia] + b[ib]
    w = np.zeros((500, k, k), np.float32)
    w[np.arange(500), ia, ib] = 1.0
    assert np.allclose(m_step(u, w, ridge=0.0), truth, atol=1e-4)
    got_a, got_b, err = hard_assign(u, truth)
    assert err < 1e-5 and (got_a == ia).all() and (got_b == ib).all()


def test_each_stage_lowers_the_error():
    x = np.random.default_rng(2).standard_normal((1024, 16)).astype(np.float32)
    _, errors = train_tables(x, 4, 3)
    assert all(e2 < e1 for e1, e2 in itertools.pairwise(errors))
    assert errors[0] < 1.0


def _keys(n, d, seed, rope):
    """Pre-RoPE keys with the structure real ones have (a mean, a decaying spectrum, an
    outlier pair), seen post-RoPE at random positions."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((d, d)))
    pre = (rng.standard_normal((n, d)) * 3.0 * 0.85 ** np.arange(d)) @ basis.T + 1.0
    pre[:, [1, d // 2 + 1]] *= 6.0
    return pre.astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2])
def test_trained_beats_untrained_and_turboquant_rvq_on_rope_keys(tmp_path, bits):
    d, heads = 32, 2
    rope = nn.RoPE(d, base=10000)
    geometry = probe_rope(rope, d)
    fp = {"architecture": "synthetic", "layers": 1, "kv_heads": heads, "head_dim": d}
    cap = Capture(fp, "0" * 64)
    train = np.stack([_keys(2048, d, 0, rope), _keys(2048, d, 1, rope)], axis=1)  # [n, H, D]
    cap.record_tokens(0, "k", train.transpose(1, 0, 2)[None], cap=2048, seed=0)
    arrays, extra = train_comm_vq(cap, bits, table_bits=4, ropes=[geometry])
    meta = {"method": "comm_vq", "version": 1, "fingerprint": fp, "text_sha256": "0" * 64}
    SafetensorsStore(tmp_path).save("comm_vq", arrays, meta | extra)
    art = str(tmp_path)
    trained = create("comm_vq", head_dim=d, bits=bits, table_bits=4, artifact=art, kind="k")
    assert trained.position_aware and trained.geometry.matches(geometry)
    untrained = create("comm_vq", head_dim=d, bits=bits, table_bits=4, untrained=True)
    # calibration-free neighbours, at more bits per element (their fp16 norms)
    neighbours = [create("turboquant_mse", head_dim=d, bits=bits)]
    if bits >= 2:
        neighbours.append(create("turboquant_rvq", head_dim=d, bits=bits))  # 1+1 passes
    held_out = np.stack([_keys(512, d, 10, rope), _keys(512, d, 11, rope)])[None]
    pre = mx.array(held_out)  # [1, H, L, D]
    start = 300
    post = rope(pre, offset=start)  # what the cache receives

    def err(q, x, **kw):
        xh = q.decode(q.encode(x, **kw), **kw)
        return (((xh - x) ** 2).sum() / (x**2).sum()).item()

    e_trained = err(trained, post, start=start)
    assert e_trained < 0.5 * err(untrained, post)
    for other in neighbours:
        assert trained.bits_per_element <= bits < other.bits_per_element
        assert e_trained < err(other, post)
    assert e_trained == pytest.approx(err(trained, post[..., :256, :], start=start), rel=0.3)
    with pytest.raises(ConfigError, match="tables have shape"):
        create("comm_vq", head_dim=d, bits=bits, table_bits=3, artifact=art, kind="k")
    with pytest.raises(ArtifactError, match="head_dim"):
        create("comm_vq", head_dim=64, bits=bits, artifact=art, kind="k")
    assert "layers.0.v.tables" not in arrays  # values go to turboquant_mse


def test_trainer_needs_head_samples():
    cap = Capture({"architecture": "x", "layers": 1, "kv_heads": 1, "head_dim": 8}, "0" * 64)
    with pytest.raises(ValueError, match="per-head samples"):
        train_comm_vq(cap, 2, ropes=[RopeGeometry.identity(8)])
