"""Patched tiny models of every routed architecture run on compressed caches."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import (
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from tiny_models import ARCHS, build

import vq_kernels
from vq_core import CompressedKVCache, CompressedRotatingKVCache
from vq_mlxlm import UnsupportedModelError, patch, unpatch

TOKENS = mx.array([[5, 17, 3, 44, 9, 12, 60, 2, 33, 8, 71, 19, 4, 27, 50, 11, 6, 90, 1, 14]])


def _run(model, cache, tokens, chunk=8):
    """Prefill in chunks then decode token by token; returns all logits [1, L, V]."""
    outs = []
    for i in range(0, tokens.shape[1], chunk):
        outs.append(model(tokens[:, i : i + chunk], cache=cache))
    return mx.concatenate(outs, axis=1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_near_lossless_method_matches_fp16_cache(arch):
    model = build(arch)
    ref = _run(model, make_prompt_cache(model), TOKENS)
    patch(model, "turboquant_rvq", bits=8, block=1)
    cache = make_prompt_cache(model)
    assert any(isinstance(c, CompressedKVCache) for c in cache)
    out = _run(model, cache, TOKENS, chunk=5)
    assert mx.abs(out - ref).max().item() < 2e-2 * mx.abs(ref).max().item()
    unpatch(model)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_four_bit_cache_holds_packed_codes(arch):
    model = patch(build(arch), "turboquant_mse", bits=4, block=1)
    cache = make_prompt_cache(model)
    ref = _run(model, make_prompt_cache(unpatch(build(arch))), TOKENS)
    out = _run(model, cache, TOKENS, chunk=4)
    compressed = [c for c in cache if isinstance(c, CompressedKVCache)]
    assert compressed and all(c.offset == TOKENS.shape[1] for c in compressed)
    for c in compressed:
        if isinstance(c, CompressedRotatingKVCache):  # no sink; what the next query can see
            assert c.compressed_tokens == c.max_size - 1
            assert c.evicted == TOKENS.shape[1] - c.compressed_tokens
        else:
            assert c.compressed_tokens == TOKENS.shape[1] - 1  # 1 sink token
    cos = (out * ref).sum(-1) / (mx.linalg.norm(out, axis=-1) * mx.linalg.norm(ref, axis=-1))
    assert cos.min().item() > 0.9


def test_save_load_continues_identically(tmp_path):
    model = patch(build("llama"), "turboquant_mse", bits=3, window=4, block=2)
    cache = make_prompt_cache(model)
    _run(model, cache, TOKENS[:, :15])
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    a = _run(model, cache, TOKENS[:, 15:], chunk=1)
    b = _run(model, loaded, TOKENS[:, 15:], chunk=1)
    assert mx.array_equal(a, b).item()


def test_trim_then_refeed_equals_shorter_prefix():
    model = patch(build("qwen2"), "turboquant_mse", bits=4, block=2)
    short, long = make_prompt_cache(model), make_prompt_cache(model)
    for cache in (short, long):  # the same first chunk fixes the same centering means
        _run(model, cache, TOKENS[:, :10], chunk=10)
    _run(model, short, TOKENS[:, 10:15], chunk=5)
    a = _run(model, short, TOKENS[:, 15:], chunk=5)
    _run(model, long, TOKENS[:, 10:], chunk=10)
    assert trim_prompt_cache(long, 5) == 5
    b = _run(model, long, TOKENS[:, 15:], chunk=5)
    assert mx.allclose(a, b, atol=1e-5).item()


def test_generate_step_on_patched_model():
    from mlx_lm.generate import generate_step

    model = patch(build("llama"), "turboquant_mse", bits=4)
    steps = list(zip(range(6), generate_step(TOKENS[0], model, max_tokens=6), strict=False))
    assert len(steps) == 6


def test_per_layer_bits_and_errors():
    model = patch(build("llama"), "turboquant_mse", bits=[2, 4])
    caches = make_prompt_cache(model)
    assert [c.key_quantizer.config.bits for c in caches] == [2, 4]
    # decode-time encodes spread over the block: about one layer's block per step
    assert [c.encode_lag for c in caches] == [0, caches[0].block // 2]
    with pytest.raises(ValueError, match="2 layers"):
        patch(build("llama"), "turboquant_mse", bits=[2, 3, 4])
    with pytest.raises(ValueError, match="bits=9"):
        patch(build("llama"), "turboquant_mse", bits=9)


def test_unrouted_architecture_is_a_clear_error():
    import importlib

    gemma2 = importlib.import_module("mlx_lm.models.gemma2")
    args = gemma2.ModelArgs(
        model_type="gemma2",
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        vocab_size=10,
        num_key_value_heads=1,
    )
    with pytest.raises(UnsupportedModelError, match="gemma2"):
        patch(gemma2.Model(args), "turboquant_mse", bits=4)


@pytest.mark.parametrize("method", ["turboquant_mse", "kivi"])
def test_a_patched_decode_step_runs_under_mx_compile(method, monkeypatch):
    """``mx.compile`` refuses any evaluation while it traces, so a host sync anywhere in a
    patched model's single-token forward (cache update, attention, encoding of a full
    block) fails here. The compiled step must also give the eager step's logits. The MLX
    graph path is the one traced (GPU kernels are graph nodes too); vq-kernels' native CPU
    op reads its inputs' values and says so under a trace (vq-kernels test_cpu_native.py)."""
    if vq_kernels.available_backend() == "reference":
        monkeypatch.setenv(vq_kernels.ENV_VAR, "reference")
    model = patch(build("llama"), method, bits=4)
    caches = [make_prompt_cache(model) for _ in range(2)]
    for cache in caches:  # 1 sink + 63 exact tokens: one short of a block, so the traced
        _run(model, cache, mx.concatenate([TOKENS] * 4, axis=1)[:, :64], chunk=64)
        mx.eval([c.state for c in cache])  # step also encodes a block
    tok = mx.array([[7]])
    eager = model(tok, cache=caches[0])
    compiled = mx.compile(lambda t: model(t, cache=caches[1]))(tok)
    assert caches[1][0].compressed_tokens == caches[0][0].compressed_tokens > 0
    assert mx.allclose(compiled, eager, atol=1e-4).item()
