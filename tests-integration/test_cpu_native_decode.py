"""On the CPU, a patched default model decodes through vq-kernels' native CPU codebook
attention ("cpu" backend) and generates the same greedy tokens as the pure-MLX reference."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

import vq_kernels
from vq_kernels import _cpu, codebook_attention_cpu
from vq_mlxlm import patch, unpatch
from vq_mlxlm.default_model import load_default_model

pytestmark = [
    pytest.mark.skipif(_cpu.compiler() is None, reason="no C++ compiler (c++/g++)"),
    pytest.mark.skipif(
        vq_kernels.available_backend() != "reference", reason="the CPU build of MLX's path"
    ),
]

STEPS = 12


@pytest.fixture(scope="module")
def model_and_prompt():
    model, tokenizer = load_default_model()
    text = "The history of the printing press begins in the fifteenth century, when " * 12
    return model, mx.array([tokenizer.encode(text)])


def _greedy(model, prompt, backend, monkeypatch):
    monkeypatch.setenv(vq_kernels.ENV_VAR, backend)
    cache = make_prompt_cache(model)
    logits = model(prompt, cache=cache)
    tokens = []
    for _ in range(STEPS):
        nxt = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(nxt.item())
        logits = model(nxt[:, None], cache=cache)
    return tokens


@pytest.mark.parametrize(("method", "bits"), [("turboquant_mse", 4), ("rabitq", 4), ("qjl", 1)])
def test_greedy_tokens_match_the_reference(model_and_prompt, method, bits, monkeypatch):
    model, prompt = model_and_prompt
    patch(model, method, bits=bits)
    try:
        calls = []
        real = codebook_attention_cpu.codebook_attention_cpu
        monkeypatch.setattr(
            codebook_attention_cpu,
            "codebook_attention_cpu",
            lambda *a, **k: calls.append(1) or real(*a, **k),
        )
        native = _greedy(model, prompt, "cpu", monkeypatch)
        assert len(calls) >= STEPS * len(model.layers)  # every decode step, every layer
        calls.clear()
        reference = _greedy(model, prompt, "reference", monkeypatch)
        assert not calls
    finally:
        unpatch(model)
    assert native == reference
