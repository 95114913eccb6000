"""Affine: bit for bit mlx-lm's quantized KV format, attention via quantized_matmul."""

import mlx.core as mx
import pytest

from vq_core import ConfigError, create


def _x(shape, seed=0, dtype=mx.float32):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_codes_are_mx_quantize_bit_for_bit(bits, group_size):
    x = _x((2, 3, 9, 128), bits, mx.float16)
    codes = create("affine", head_dim=128, bits=bits, group_size=group_size).encode(x)
    w, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    assert codes["w"].dtype == mx.uint32 and codes["scales"].dtype == mx.float16
    assert mx.array_equal(codes["w"], w).item()
    assert mx.array_equal(codes["scales"], scales).item()
    assert mx.array_equal(codes["biases"], biases).item()


@pytest.mark.parametrize(
    ("bits", "group_size", "bpe"), [(4, 64, 4.5), (2, 32, 3.0), (8, 128, 8.25)]
)
def test_accounting(bits, group_size, bpe):
    q = create("affine", head_dim=128, bits=bits, group_size=group_size)
    assert q.bits_per_element == bpe
    x = _x((7, 128))
    assert q.encode(x).nbytes * 8 == bpe * x.size


def test_decode_is_mx_dequantize():
    x = _x((4, 128), 1, mx.float16)
    q = create("affine", head_dim=128, bits=3)
    w, scales, biases = mx.quantize(x, group_size=64, bits=3)
    f32 = mx.float32
    exact = mx.dequantize(w, scales.astype(f32), biases.astype(f32), group_size=64, bits=3)
    assert mx.array_equal(q.decode(q.encode(x)), exact).item()
    # mlx-lm dequantizes in float16: the same values up to float16 rounding.
    half = mx.dequantize(w, scales, biases, group_size=64, bits=3).astype(f32)
    assert mx.allclose(q.decode(q.encode(x)), half, rtol=0, atol=4e-3).item()


def test_attention_reads_the_codes_like_mlx_lm():
    q = create("affine", head_dim=128, bits=4)
    codes = q.encode(_x((1, 2, 40, 128), 2))
    xh = q.decode(codes)
    qs = _x((1, 2, 3, 128), 3)
    assert mx.allclose(q.scores(qs, codes), qs @ mx.swapaxes(xh, -1, -2), atol=1e-4).item()
    p = mx.softmax(_x((1, 2, 3, 40), 4), axis=-1)
    assert mx.allclose(q.weighted_sum(p, codes), p @ xh, atol=1e-5).item()


def test_head_dim_must_hold_whole_groups():
    with pytest.raises(ConfigError, match=r"affine.*head_dim=96"):
        create("affine", head_dim=96)
    assert create("affine", head_dim=96, group_size=32).bits_per_element == 5.0
    with pytest.raises(ConfigError, match="group_size"):
        create("affine", head_dim=128, group_size=16)
