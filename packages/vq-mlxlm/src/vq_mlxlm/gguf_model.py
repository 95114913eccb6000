"""Load a llama-architecture GGUF file into mlx-lm's llama model.

``mx.load(path, return_metadata=True)`` reads GGUF directly: Q4_0 / Q4_1 / Q8_0 tensors come
back as MLX affine-quantized triples (``name.weight`` packed uint32 of shape
``[out, in * bits / 32]``, ``name.scales`` and ``name.biases`` of shape ``[out, in / group]``,
so ``w = scale * q + bias`` per group along the input dimension); other types come back as
float arrays. The metadata holds the hyperparameters (``llama.*``) and the tokenizer.

Three things differ from a Hugging Face / mlx-lm checkpoint:

1. Tensor names: llama.cpp's ``blk.{i}.attn_q`` is mlx-lm's ``model.layers.{i}.self_attn.q_proj``
   and so on (``_NAMES`` below); a missing ``output.*`` means tied embeddings.
2. Q/K row order: llama.cpp's converter permutes the rows of each query and key head from
   Hugging Face's rotate-half layout (pairs ``(j, j + d/2)``) to interleaved pairs
   ``(2j, 2j + 1)``, because its RoPE rotates adjacent pairs. ``_unpermute_heads`` restores the
   Hugging Face order (it moves whole rows, so it applies unchanged to packed weights, scales
   and biases).
3. RoPE: with the Hugging Face row order the model uses ``rope_traditional=False``, exactly as
   mlx-lm's conversion of the original checkpoint. (Keeping the GGUF order instead needs
   ``rope_traditional=True``; both give the same logits, but only the restored order stores
   keys in the KV cache in the same per-head coordinate order as the Hugging Face model, so
   calibration artifacts fitted on either source apply to both.)

On the CPU backend the default is to dequantize to float32: MLX's CPU ``quantized_matmul`` is
single-threaded and CPU float16 is emulated, while float32 matmuls go to BLAS.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.tokenizer_utils import TokenizerWrapper

from vq_core import ConfigError, MissingFileError
from vq_mlxlm.gguf_tokenizer import load_gguf_tokenizer

_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"(\w+)\.(weight|scales|biases|bias)$")


def _uint(metadata: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if value is None:
        raise ConfigError(f"GGUF metadata lacks {key!r}")
    return value.item() if hasattr(value, "item") else value


def gguf_model_args(metadata: Mapping[str, Any], weights: Mapping[str, mx.array]) -> ModelArgs:
    """mlx-lm ``ModelArgs`` from the GGUF's ``llama.*`` metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    scaling = metadata.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise NotImplementedError(f"GGUF RoPE scaling {scaling!r} is not supported")
    n_heads = int(_uint(metadata, "llama.attention.head_count"))
    hidden = int(_uint(metadata, "llama.embedding_length"))
    return ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=int(_uint(metadata, "llama.block_count")),
        intermediate_size=int(_uint(metadata, "llama.feed_forward_length")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_uint(metadata, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(_uint(metadata, "llama.rope.dimension_count", hidden // n_heads)),
        rms_norm_eps=float(_uint(metadata, "llama.attention.layer_norm_rms_epsilon")),
        vocab_size=int(_uint(metadata, "llama.vocab_size", len(metadata["tokenizer.ggml.tokens"]))),
        max_position_embeddings=int(_uint(metadata, "llama.context_length", 2048)),
        rope_theta=float(_uint(metadata, "llama.rope.freq_base", 10000.0)),
        rope_traditional=False,
        tie_word_embeddings="output.weight" not in weights,
    )


def _mlx_name(name: str) -> str:
    if m := _BLOCK.match(name):
        layer, part, kind = m.groups()
        if part not in _NAMES:
            raise ConfigError(f"unexpected GGUF tensor {name!r}")
        return f"model.layers.{layer}.{_NAMES[part]}.{kind}"
    if (m := _TOP.match(name)) and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ConfigError(f"unexpected GGUF tensor {name!r}")


def _unpermute_heads(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation: rows ``[h, j, 2]`` -> ``[h, 2, j]`` per head.

    ``x`` has shape ``[n_heads * head_dim, ...]`` (a weight, packed weight, scales or biases).
    """
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def gpu_backend() -> bool:
    """Whether MLX's default device is a GPU (Metal or CUDA)."""
    return mx.default_device().type == mx.DeviceType.gpu


def load_gguf(
    path: str | Path,
    *,
    dtype: mx.Dtype | None = None,
    dequantize: bool | None = None,
) -> tuple[Model, TokenizerWrapper]:
    """Load a llama GGUF file as an mlx-lm ``Model`` and its ``TokenizerWrapper``.

    Args:
        path: the ``.gguf`` file.
        dtype: the dtype of float weights (and of dequantized ones). Default: ``float32`` on the
            CPU backend, ``float16`` on a GPU.
        dequantize: expand quantized tensors to ``dtype`` instead of keeping MLX 4/8-bit
            weights. Default: ``True`` on the CPU backend, ``False`` on a GPU.

    Returns:
        ``(model, tokenizer)``, usable with ``mlx_lm.generate`` / ``stream_generate``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"GGUF file not found: {path}")
    on_gpu = gpu_backend()
    dtype = dtype if dtype is not None else (mx.float16 if on_gpu else mx.float32)
    dequantize = (not on_gpu) if dequantize is None else dequantize

    raw, metadata = mx.load(str(path), return_metadata=True)
    args = gguf_model_args(metadata, raw)
    weights = {_mlx_name(k): v for k, v in raw.items()}
    for proj, heads in (("q_proj", args.num_attention_heads), ("k_proj", args.num_key_value_heads)):
        for k in weights:
            if f".self_attn.{proj}." in k:
                weights[k] = _unpermute_heads(weights[k], heads)

    model = Model(args)
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    quantized: dict[str, dict[str, int]] = {}
    for k in [k for k in weights if k.endswith(".scales")]:
        base = k.removesuffix(".scales")
        packed, scales = weights[f"{base}.weight"], weights[k]
        in_features = shapes[f"{base}.weight"][-1]
        bits = packed.shape[-1] * 32 // in_features
        group_size = in_features // scales.shape[-1]
        if dequantize:
            weights[f"{base}.weight"] = mx.dequantize(
                packed,
                scales.astype(dtype),
                weights.pop(f"{base}.biases").astype(dtype),
                group_size=group_size,
                bits=bits,
            )
            del weights[k]
        else:
            quantized[base] = {"group_size": group_size, "bits": bits}
            weights[k] = scales.astype(dtype)
            weights[f"{base}.biases"] = weights[f"{base}.biases"].astype(dtype)
    weights = {k: v if v.dtype == mx.uint32 else v.astype(dtype) for k, v in weights.items()}

    if quantized:
        nn.quantize(model, class_predicate=lambda p, _: quantized.get(p, False))
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model, load_gguf_tokenizer(metadata)
