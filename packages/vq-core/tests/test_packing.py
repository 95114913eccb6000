import mlx.core as mx
import pytest

from vq_core import ConfigError, DTypeError, ShapeError, pack, packed_words, unpack, unpack_fields


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 64, 80, 96, 100, 128, 256])
def test_round_trip(bits, n):
    codes = mx.random.randint(0, 2**bits, (2, 3, n), key=mx.random.key(n * 10 + bits))
    words = pack(codes, bits)
    assert words.dtype == mx.uint32
    assert words.shape == (2, 3, -(-n * bits // 32))
    assert mx.array_equal(unpack(words, bits, n), codes.astype(mx.uint32)).item()


def test_three_bit_codes_cost_three_bits():
    assert packed_words(128, 3) == 12  # 384 bits for 128 codes
    assert packed_words(64, 3) == 6


def test_documented_layout_straddles_words():
    # Eleven 3-bit codes of value 7 fill word 0 and spill one bit into word 1.
    assert pack(mx.array([7] * 11), 3).tolist() == [0xFFFFFFFF, 0x1]
    # Code i starts at stream bit 3i: code 1 (value 5) sits at bits 3..5 of word 0.
    assert pack(mx.array([0, 5] + [0] * 9), 3).tolist() == [5 << 3, 0]
    # Code 10 straddles: low 2 bits at word 0 bits 30..31, high bit at word 1 bit 0.
    assert pack(mx.array([0] * 10 + [6]), 3).tolist() == [2 << 30, 1]
    # 4-bit codes: nibble i of word 0 holds code i.
    assert pack(mx.array([1, 2, 3, 4, 5, 6, 7, 8]), 4).tolist() == [0x87654321]


def test_bad_input():
    with pytest.raises(ConfigError, match="bits=7"):
        pack(mx.array([1]), 7)
    with pytest.raises(DTypeError, match="integer"):
        pack(mx.array([1.0]), 4)
    with pytest.raises(ShapeError, match="take 4 words"):
        unpack(mx.zeros((3,), dtype=mx.uint32), 4, 32)


@pytest.mark.parametrize(("bits", "group"), [(3, 4), (5, 2), (6, 2), (4, 4), (2, 8)])
def test_fields_hold_groups_of_codes_low_first(bits, group):
    n = 64
    codes = mx.random.randint(0, 2**bits, (3, n), key=mx.random.key(bits))
    fields = unpack_fields(pack(codes, bits), bits * group, n // group)
    weights = mx.array([1 << (bits * i) for i in range(group)], dtype=mx.uint32)
    expect = (codes.astype(mx.uint32).reshape(3, n // group, group) * weights).sum(-1)
    assert mx.array_equal(fields, expect).item()


def test_mixed_width_stream_layout_and_round_trip():
    from vq_core import pack_stream, unpack_stream

    words = pack_stream([(mx.array([[1, 2, 3]]), 2), (mx.array([[5]]), 3)])
    # 1, 2, 3 in 2 bits then 5 in 3 bits, each LSB first: bits 1,0, 0,1, 1,1, 1,0,1
    assert words.tolist() == [[1 + 8 + 16 + 32 + 64 + 256]]
    layout = [(7, 3), (40, 1), (5, 16)]
    parts = [mx.random.randint(0, 1 << b, (2, 3, n)).astype(mx.uint32) for n, b in layout]
    packed = pack_stream([(p, b) for p, (_, b) in zip(parts, layout, strict=True)])
    assert packed.shape == (2, 3, -(-(21 + 40 + 80) // 32))
    back = unpack_stream(packed, layout)
    assert all(mx.array_equal(a, b).item() for a, b in zip(parts, back, strict=True))
