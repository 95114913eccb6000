import os

# Full float32 matmuls: MLX runs them at TF32-class precision by default on CUDA GPUs and on
# Apple M5 (MLX_ENABLE_TF32 defaults to 1; relative error ~3e-4 measured on an H200), and
# these tests compare fp32 paths to each other. MLX's own test harness pins the same flag.
os.environ["MLX_ENABLE_TF32"] = "0"

import importlib.util
from pathlib import Path

import pytest


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
