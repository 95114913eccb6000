"""On a GPU (MLX CUDA or Metal), a patched model's decode steps run vq's fused kernel."""

import os

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import build

import vq_kernels
from vq_mlxlm import patch

GPU = vq_kernels.available_backend() != "reference"
pytestmark = pytest.mark.skipif(not GPU, reason="needs MLX CUDA or Metal: CPU build of MLX")

TOKENS = mx.array([[5, 17, 3, 44, 9, 12, 60, 2, 33, 8, 71, 19, 4, 27, 50, 11]])


def _decode_logits(model):
    cache = make_prompt_cache(model)
    model(TOKENS[:, :12], cache=cache)
    return mx.concatenate([model(TOKENS[:, i : i + 1], cache=cache) for i in range(12, 16)], 1)


def test_patched_model_decodes_through_the_fused_kernel_and_matches_reference():
    model = patch(build("llama"), "turboquant_mse", bits=4, block=4)  # 12 tokens: 3 blocks
    before = len(vq_kernels.compile_report())
    fused = _decode_logits(model)
    mx.eval(fused)
    names = [r.kernel for r in vq_kernels.compile_report()]
    assert len(names) > before and any("codebook_attn" in n for n in names), names
    os.environ[vq_kernels.ENV_VAR] = "reference"
    try:
        ref = _decode_logits(model)
    finally:
        del os.environ[vq_kernels.ENV_VAR]
    assert mx.allclose(fused, ref, atol=2e-3, rtol=2e-3).item()
