import mlx.core as mx
import pytest

from vq_core import (
    ConfigError,
    DTypeError,
    NonFiniteError,
    ShapeError,
    UnknownMethodError,
    create,
    from_description,
)


def test_create_and_describe_round_trip():
    q = create("toy_uniform", head_dim=64, bits=4, seed=2)
    again = from_description(q.describe())
    assert again.config == q.config
    assert q.bits_per_element == pytest.approx((64 * 4 + 16) / 64)


def test_codes_nbytes_match_accounting():
    q = create("toy_uniform", head_dim=64, bits=3)
    codes = q.encode(mx.random.normal((5, 7, 64)))
    assert codes.nbytes * 8 == q.bits_per_element * 5 * 7 * 64


def test_config_is_frozen_and_validated():
    q = create("toy_uniform", head_dim=64, bits=4)
    with pytest.raises(AttributeError):
        q.config.bits = 2
    with pytest.raises(ConfigError, match=r"bits=7 .*one of \(2, 3, 4, 5, 6, 8\)"):
        create("toy_uniform", head_dim=64, bits=7)
    with pytest.raises(ConfigError, match="unknown config option"):
        create("toy_uniform", head_dim=64, colour="red")


def test_unknown_method_lists_known():
    with pytest.raises(UnknownMethodError, match="toy_uniform"):
        create("nope")


def test_bad_inputs_name_the_problem():
    q = create("toy_uniform", head_dim=64, bits=4)
    with pytest.raises(ShapeError, match="head_dim=64"):
        q.encode(mx.zeros((3, 65)))
    with pytest.raises(DTypeError, match="int32"):
        q.encode(mx.zeros((3, 64), dtype=mx.int32))
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        q.encode(mx.full((3, 64), float("nan")))
