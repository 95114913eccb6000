"""A llama model in mlx-lm's pipelined qwen2 class, so mlx-lm's own pipeline can split it.

mlx-lm (0.32) gives ``pipeline(group)`` (its ``PipelineMixin``: stage ``r`` receives the
hidden state from stage ``r + 1``, runs its layers, sends to ``r - 1``, and every stage
all-gathers the result) to qwen2, deepseek, glm4-moe and others, but not to llama, the
architecture of the embedded default model. A qwen2 block is a llama block with biases on
the query/key/value projections: with those biases zero and the same RoPE, norms, MLP and
head, the qwen2 model computes exactly the llama model's function (adding 0.0 changes no
float). :func:`as_qwen2` builds that model from a loaded llama and moves its weights over
(quantized layers stay quantized with the same group size and bits); its ``model_type``
stays ``"llama"``, so calibration artifacts keep matching its fingerprint.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from vq_core import ConfigError


def _refuse(why: str) -> ConfigError:
    return ConfigError(
        f"pipeline parallelism: mlx-lm's llama has no pipeline(), and this llama model cannot "
        f"run in its pipelined qwen2 class: {why}"
    )


def as_qwen2(model) -> nn.Module:
    """The same function in mlx-lm's qwen2 ``Model`` (which has ``model.pipeline``)."""
    from mlx_lm.models import qwen2

    a = model.args
    if getattr(a, "attention_bias", False) or getattr(a, "mlp_bias", False):
        raise _refuse("it has attention or MLP biases")
    if any(t != "full_attention" for t in (a.layer_types or [])):
        raise _refuse("it has sliding-window layers")
    head_dim = a.head_dim or a.hidden_size // a.num_attention_heads
    if head_dim * a.num_attention_heads != a.hidden_size:
        raise _refuse(f"head_dim {head_dim} x {a.num_attention_heads} heads != hidden_size")
    scaling = a.rope_scaling
    if scaling and scaling.get("type", scaling.get("rope_type")) not in ("linear", "default"):
        raise _refuse(f"qwen2 has no {scaling!r} RoPE scaling")
    args = qwen2.ModelArgs(
        model_type=a.model_type,
        hidden_size=a.hidden_size,
        num_hidden_layers=a.num_hidden_layers,
        intermediate_size=a.intermediate_size,
        num_attention_heads=a.num_attention_heads,
        rms_norm_eps=a.rms_norm_eps,
        vocab_size=a.vocab_size,
        num_key_value_heads=a.num_key_value_heads,
        max_position_embeddings=a.max_position_embeddings or 32768,
        rope_theta=a.rope_theta,
        rope_traditional=a.rope_traditional,
        rope_scaling=scaling,
        tie_word_embeddings=a.tie_word_embeddings,
    )
    new = qwen2.Model(args)
    quantized = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if quantized:
        nn.quantize(new, class_predicate=lambda p, _: quantized.get(p, False))
    weights = dict(tree_flatten(model.parameters()))
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            proj = getattr(attn, name)
            rows = proj.weight.shape[0]
            dtype = proj.scales.dtype if hasattr(proj, "scales") else proj.weight.dtype
            weights[f"model.layers.{i}.self_attn.{name}.bias"] = mx.zeros((rows,), dtype=dtype)
    new.load_weights(list(weights.items()), strict=True)
    new.eval()
    mx.eval(new.parameters())
    return new
