import os

# Full float32 matmuls: MLX runs them at TF32-class precision by default on CUDA GPUs and on
# Apple M5 (MLX_ENABLE_TF32 defaults to 1; relative error ~3e-4 measured on an H200), and
# these tests compare fp32 paths to each other. MLX's own test harness pins the same flag.
os.environ["MLX_ENABLE_TF32"] = "0"

import importlib.util
from pathlib import Path

import mlx.core as mx
import pytest

import vq_kernels as vk


def _emulator():
    spec = importlib.util.spec_from_file_location(
        "vq_kernels_test_emulator", Path(__file__).with_name("kernel_emulator.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every vq_kernels op launches its kernel body on the CPU emulator, as if on CUDA; the
    fixture's value lists the kernels launched so far."""
    return _emulator().emulate(monkeypatch)


@pytest.fixture
def channel_quantize():
    """``fn(x, g, bits) -> (codes, dequantized)``: KIVI's per-channel affine keys."""
    return _channel_quantize


def _channel_quantize(x: mx.array, g: int, bits: int):
    """KIVI's per-channel affine codes of x [B, H, L, D] (L a multiple of g), laid out as
    :func:`vk.affine_decode_attention` reads them, and the dequantized keys."""
    b, h, n, d = x.shape
    blocks = x.astype(mx.float32).reshape(b, h, n // g, g, d)
    lo = blocks.min(axis=-2, keepdims=True).astype(mx.float16).astype(mx.float32)
    sc = ((blocks.max(axis=-2, keepdims=True) - lo) / ((1 << bits) - 1)).astype(mx.float16)
    sc = sc.astype(mx.float32)
    codes = mx.clip(mx.round((blocks - lo) / mx.maximum(sc, 1e-8)), 0, (1 << bits) - 1)
    deq = (codes * sc + lo).reshape(b, h, n, d)
    w = vk.pack_bits(codes.reshape(b, h, n, d).astype(mx.uint32), bits, backend="reference")
    field = (b, h, n, d // g)  # block n's [D] scales over its g rows, row-major
    return (w, sc.astype(mx.float16).reshape(field), lo.astype(mx.float16).reshape(field)), deq
