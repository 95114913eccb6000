"""Tiny random-weight mlx-lm models of each routed architecture (built in the test)."""

from __future__ import annotations

import importlib

import mlx.core as mx

# Layer 0 gated delta (linear attention, ArraysCache), layer 1 gated full attention.
_GATED_DELTA = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_value_heads=2,
    linear_num_key_heads=2,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    max_position_embeddings=4096,
    full_attention_interval=2,
)
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
            sliding_window=16,
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
            sliding_window=16,
        ),
    ),
    "qwen3_next": (  # hybrid: layer 0 gated delta (ArraysCache), layer 1 gated attention
        "qwen3_next",
        dict(
            _GATED_DELTA,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            shared_expert_intermediate_size=64,
            mlp_only_layers=[],
            moe_intermediate_size=64,
            partial_rotary_factor=0.5,
        ),
    ),
    "qwen3_5": (  # the same hybrid under a multimodal wrapper: Model.args holds text_config
        "qwen3_5",
        dict(
            _GATED_DELTA,
            rope_parameters={
                "type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        ),
    ),
}
# Refused families (patch raises UnsupportedModelError): built to check the message.
REFUSED = {
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            hidden_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_rope_head_dim=16,
            v_head_dim=32,
            qk_nope_head_dim=32,
            n_routed_experts=None,
            max_position_embeddings=4096,
        ),
    ),
    "gemma2": (
        "gemma2",
        dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64),
    ),
}
COMMON = dict(
    num_hidden_layers=2, intermediate_size=256, vocab_size=97, rms_norm_eps=1e-5, rope_theta=10000.0
)


def build(arch: str, seed: int = 0, init: str = "flat", **overrides):
    """A random ``arch`` model. ``init="flat"``: every parameter N(0, 0.05²) (norm weights
    too, so logits are near uniform); ``"fan_in"``: matrices N(0, 1/fan_in), norms as
    mlx-lm initializes them, learned sink logits N(0, 1): peaked next-token distributions
    and attention that is neither uniform nor one-hot, for greedy-token and KL tests.
    ``overrides``: ModelArgs fields on top of the architecture's (e.g. ``head_dim``)."""
    from mlx.utils import tree_flatten, tree_unflatten

    module_name, fields = {**ARCHS, **REFUSED}[arch]
    module = importlib.import_module(f"mlx_lm.models.{module_name}")
    params = {**COMMON, **fields, **overrides, "model_type": arch}
    mx.random.seed(seed)  # before the model: its own init (biases, norms) is kept by fan_in
    model = module.Model(module.ModelArgs.from_dict(params))
    fresh = []
    for k, v in tree_flatten(model.parameters()):
        if init == "flat":
            fresh.append((k, mx.random.normal(v.shape) * 0.05))
        elif k.endswith("sinks"):
            fresh.append((k, mx.random.normal(v.shape)))
        elif "norm" in k or v.ndim < 2:
            fresh.append((k, v))
        else:
            fresh.append((k, mx.random.normal(v.shape) * v.shape[-1] ** -0.5))
    model.update(tree_unflatten(fresh))
    mx.eval(model.parameters())
    return model
