import mlx.core as mx
import pytest

from vq_core import ConfigError, RandomizedHadamard, RandomOrthogonal, ShapeError
from vq_core.preconditioner import make_preconditioner

DIMS = [64, 80, 96, 112, 128, 256]


@pytest.mark.parametrize("cls", [RandomizedHadamard, RandomOrthogonal])
@pytest.mark.parametrize("dim", DIMS)
def test_orthogonal_and_inverse(cls, dim):
    p = cls(dim, seed=3)
    m = p.matrix
    assert mx.allclose(m @ m.T, mx.eye(dim), atol=1e-5).item()
    x = mx.random.normal((4, 5, dim), key=mx.random.key(0))
    y = p.apply(x)
    assert mx.allclose(y, x @ m, atol=1e-4).item()
    assert mx.allclose(p.inverse(y), x, atol=1e-4).item()
    # norms and inner products survive
    assert mx.allclose(mx.linalg.norm(y, axis=-1), mx.linalg.norm(x, axis=-1), rtol=1e-4).item()


@pytest.mark.parametrize("cls", [RandomizedHadamard, RandomOrthogonal])
def test_deterministic_from_seed(cls):
    assert mx.array_equal(cls(128, 7).matrix, cls(128, 7).matrix).item()
    assert not mx.allclose(cls(128, 7).matrix, cls(128, 8).matrix).item()


def test_hadamard_spreads_a_spike():
    y = RandomizedHadamard(128, 0).apply(mx.eye(128)[:1])
    assert mx.allclose(mx.abs(y), mx.full(y.shape, 128**-0.5), atol=1e-6).item()


def test_errors():
    with pytest.raises(ConfigError, match="head_dim=100"):
        RandomizedHadamard(100)
    with pytest.raises(ConfigError, match="rotation='dct'"):
        make_preconditioner("dct", 64)
    with pytest.raises(ShapeError, match="last dimension 64"):
        RandomOrthogonal(64).apply(mx.zeros((2, 32)))
