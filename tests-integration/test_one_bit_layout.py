"""vq-core's packer (the library's) and vq-kernels' reference packer (the vendorable
kernels' oracle; vq-kernels may not import vq-core, and vq-core depends on MLX alone) write
one layout: bit for bit the same words, and the same supported widths."""

import mlx.core as mx
import pytest

from vq_core import pack, unpack
from vq_core.packing import SUPPORTED_BITS as CORE_BITS
from vq_kernels.packing import SUPPORTED_BITS as KERNEL_BITS
from vq_kernels.packing import pack_bits_reference, unpack_bits_reference


def test_the_same_widths():
    assert CORE_BITS == KERNEL_BITS


@pytest.mark.parametrize("bits", CORE_BITS)
@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_the_same_words(bits, n):
    codes = mx.random.randint(0, 1 << bits, (3, 2, n), key=mx.random.key(bits * 1000 + n))
    words = pack(codes, bits)
    assert mx.array_equal(words, pack_bits_reference(codes, bits)).item()
    assert mx.array_equal(unpack(words, bits, n), unpack_bits_reference(words, bits, n)).item()
