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
LONG = mx.concatenate([TOKENS, (TOKENS * 3 + 1) % 97, (TOKENS * 7 + 2) % 89], axis=1)


def _decode_logits(model, tokens=TOKENS):
    """Prefill all but the last 4 tokens, then decode those 4 one at a time."""
    n = tokens.shape[1]
    cache = make_prompt_cache(model)
    model(tokens[:, : n - 4], cache=cache)
    return mx.concatenate([model(tokens[:, i : i + 1], cache=cache) for i in range(n - 4, n)], 1)


@pytest.mark.parametrize(
    ("method", "bits", "kernel"),
    [("turboquant_mse", 4, "codebook_attn"), ("turboquant_prod", 3, "codebook_attn"),
     ("turboquant_rvq", 4, "codebook_attn"), ("affine", 4, "affine_attn"),
     ("kivi", 4, "affine_attn")],
)  # fmt: skip
def test_patched_model_decodes_through_the_fused_kernel_and_matches_reference(method, bits, kernel):
    if method == "kivi":  # per-channel groups of 16 tokens, encoded in blocks of 16
        model = patch(build("llama"), method, bits=bits, block=16, group_size=16)
        tokens = LONG  # 44 prefilled: two blocks compressed
    else:
        model = patch(build("llama"), method, bits=bits, block=4)  # 12 tokens: 3 blocks
        tokens = TOKENS
    before = len(vq_kernels.compile_report())
    fused = _decode_logits(model, tokens)
    mx.eval(fused)
    names = [r.kernel for r in vq_kernels.compile_report()]
    assert len(names) > before and any(kernel in n for n in names), names
    os.environ[vq_kernels.ENV_VAR] = "reference"
    try:
        ref = _decode_logits(model, tokens)
    finally:
        del os.environ[vq_kernels.ENV_VAR]
    assert mx.allclose(fused, ref, atol=2e-3, rtol=2e-3).item()


def test_toggling_the_tensor_core_loop_retraces_the_compiled_decode_step(monkeypatch):
    """``USE_MMA`` keys the compiled decode step: after a toggle the next decode steps
    launch the other loop's specialization (a stale trace would replay the old one without
    calling the wrapper) and agree with the first within the tensor-core loop's tolerance."""
    from vq_algorithms import _fused
    from vq_kernels import _attention

    launched = []
    real = _attention.launch

    def spy(name, backend, inputs, *, template, **kw):
        launched.append((name, dict(template).get("MMA")))
        return real(name, backend, inputs, template=template, **kw)

    monkeypatch.setattr(_attention, "launch", spy)
    monkeypatch.setattr(_fused, "_WARM", set())
    _fused._compiled.cache_clear()  # traces of earlier tests would replay unseen
    model = patch(build("llama"), "turboquant_mse", bits=4, block=4)
    results = []
    for i, mma in enumerate((True, False, True)):
        monkeypatch.setattr(_attention, "USE_MMA", mma)
        launched.clear()
        results.append(_decode_logits(model))
        mx.eval(results[-1])
        flags = {m for n, m in launched if n == "codebook_attn"}
        if i < 2:  # the third replays the first's trace
            assert flags, "no decode step reached the codebook kernel's wrapper"
        if vq_kernels.available_backend() == "cuda":
            assert flags <= {int(mma)}, (mma, flags)
    assert mx.allclose(results[0], results[1], atol=2e-2, rtol=2e-2).item()
    assert mx.allclose(results[0], results[2], atol=1e-5, rtol=1e-5).item()
