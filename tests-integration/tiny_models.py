"""Tiny random-weight mlx-lm models of each routed architecture (built in the test)."""

from __future__ import annotations

import importlib

import mlx.core as mx

# (module, ModelArgs overrides): GQA ratios 1-8 and head_dim 64/96/128/256 are covered.
ARCHS = {
    "llama": ("llama", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": (
        "llama",
        dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=1, head_dim=128),
    ),
    "qwen2": ("qwen2", dict(hidden_size=384, num_attention_heads=4, num_key_value_heads=1)),
    "qwen3": (
        "qwen3",
        dict(
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=128,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3_text": (
        "gemma3_text",
        dict(
            hidden_size=256,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=8,
            sliding_window_pattern=2,
        ),
    ),
    "phi3": ("phi3", dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=3)),
    "gpt_oss": (  # learned attention sinks; sliding and full layers alternate
        "gpt_oss",
        dict(
            hidden_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
        ),
    ),
}
COMMON = dict(
    num_hidden_layers=2, intermediate_size=256, vocab_size=97, rms_norm_eps=1e-5, rope_theta=10000.0
)


def build(arch: str, seed: int = 0):
    module_name, overrides = ARCHS[arch]
    module = importlib.import_module(f"mlx_lm.models.{module_name}")
    fields = module.ModelArgs.__dataclass_fields__
    kwargs = {k: v for k, v in {**COMMON, **overrides}.items() if k in fields}
    kwargs["model_type"] = arch
    model = module.Model(module.ModelArgs(**kwargs))
    mx.random.seed(seed)
    params = model.parameters()
    from mlx.utils import tree_flatten, tree_unflatten

    fresh = [(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(params)]
    model.update(tree_unflatten(fresh))
    mx.eval(model.parameters())
    return model
