"""CommVQ's EM: the structured M-step is the exact minimizer and each stage lowers the
error (the trained codebooks against their neighbours: tests-integration)."""

import itertools

import numpy as np
import pytest

from vq_calibrate.capture import Capture
from vq_calibrate.commutative_em import codewords_parts, hard_assign, m_step, train_tables
from vq_calibrate.train import train_comm_vq


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


class _Identity:
    """A RoPE pairing with no rotation (what the trainer reads: ``perm``, ``freqs``)."""

    def __init__(self, d):
        self.perm, self.freqs = np.arange(d), np.zeros(d // 2)


def test_trainer_needs_head_samples():
    cap = Capture({"architecture": "x", "layers": 1, "kv_heads": 1, "head_dim": 8}, "0" * 64)
    with pytest.raises(ValueError, match="per-head samples"):
        train_comm_vq(cap, 2, stages=1, ropes=[_Identity(8)])
