"""TurboQuant family: the paper's distortion, prod's unbiasedness, RVQ against one pass."""

import math

import mlx.core as mx
import pytest

from vq_core import create

# arXiv 2504.19874, Theorem 1 (rounded figures it lists for b = 1..4).
PAPER_DMSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}


def _unit(n, d, seed=0):
    x = mx.random.normal((n, d), key=mx.random.key(seed))
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_reproduces_theorem_1(bits):
    x = _unit(20000, 128)
    q = create("turboquant_mse", head_dim=128, bits=bits)
    d_mse = ((q.decode(q.encode(x)) - x) ** 2).sum(axis=-1).mean().item()
    assert d_mse == pytest.approx(PAPER_DMSE[bits], rel=0.15)
    assert d_mse <= math.sqrt(3) * math.pi / 2 * 4.0**-bits  # the theorem's upper bound


@pytest.mark.parametrize("bits", [2, 3])
def test_prod_inner_products_are_unbiased(bits):
    """Mean over independent seeds of <q, x̂> converges to <q, x>; MSE alone is biased."""
    x, q = _unit(1, 128, 1), _unit(1, 128, 2)
    truth = (q @ x.T).item()
    prod, mse = [], []
    for seed in range(400):
        qp = create("turboquant_prod", head_dim=128, bits=bits, seed=seed)
        prod.append(qp.scores(q[None, None], qp.encode(x[None, None])).item())
        qm = create("turboquant_mse", head_dim=128, bits=bits - 1, seed=seed)
        mse.append(qm.scores(q[None, None], qm.encode(x[None, None])).item())
    mean = sum(prod) / len(prod)
    sd = math.sqrt(sum((v - mean) ** 2 for v in prod) / (len(prod) - 1))
    assert abs(mean - truth) < 4 * sd / math.sqrt(len(prod))
    # The MSE quantizer shrinks inner products (E<q,x̂> = c·<q,x> with c < 1, Sec. 3.2).
    mse_mean = sum(mse) / len(mse)
    assert abs(mse_mean) < abs(truth)


def test_rvq_split_and_accounting():
    q = create("turboquant_rvq", head_dim=128, bits=5)
    assert q.config.split() == (3, 2)
    assert q.bits_per_element == pytest.approx(5 + 2 * 16 / 128)


@pytest.mark.parametrize(("total", "single"), [(2, 2), (4, 4)])
def test_rvq_is_worse_than_one_pass_at_equal_bits(total, single):
    """Reported honestly: a single pass of the same total bits has lower distortion."""
    x = mx.random.normal((4096, 128), key=mx.random.key(3))

    def err(q):
        return (((q.decode(q.encode(x)) - x) ** 2).sum() / (x**2).sum()).item()

    rvq = err(create("turboquant_rvq", head_dim=128, bits=total))
    one = err(create("turboquant_mse", head_dim=128, bits=single))
    assert one < rvq < 1.6 * one


def test_rvq_beyond_four_bits_keeps_improving():
    x = mx.random.normal((2048, 128), key=mx.random.key(4))
    errs = []
    for bits in (4, 5, 6, 8):
        q = create("turboquant_rvq", head_dim=128, bits=bits)
        errs.append((((q.decode(q.encode(x)) - x) ** 2).sum() / (x**2).sum()).item())
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4
