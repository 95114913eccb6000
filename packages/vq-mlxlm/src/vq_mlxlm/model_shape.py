"""The KV-cache shape of a model (layers, KV heads, head_dim) without loading its weights;
for a loaded one also its fingerprint (what artifacts and prompt caches are checked
against), its RoPE geometry and the caches mlx-lm itself builds for it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vq_core import ConfigError, MissingFileError


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int

    def fp16_bytes(self, tokens: int) -> int:
        """Keys and values in fp16 for ``tokens`` tokens (batch 1)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2 * tokens


def kv_shape(model: str) -> KVShape:
    """Read the shape from ``"default"``/a GGUF's metadata or a model dir's config.json."""
    from vq_mlxlm.default_model import DEFAULT, default_model_path

    path = default_model_path() if model == DEFAULT else Path(model).expanduser()
    if not path.exists():
        raise MissingFileError(f"--model: {path} does not exist")
    if path.is_file():
        import mlx.core as mx

        _, meta = mx.load(str(path), return_metadata=True)
        arch = str(meta["general.architecture"])

        def get(key):
            return int(meta[f"{arch}.{key}"].item())

        heads = get("attention.head_count")
        kv = get("attention.head_count_kv")
        return KVShape(get("block_count"), kv, get("embedding_length") // heads)
    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return KVShape(cfg["num_hidden_layers"], cfg.get("num_key_value_heads", heads), head_dim)


def layer_windows(model: str) -> list[int | None]:
    """Per layer of ``model`` (as :func:`kv_shape` takes it): ``None`` where mlx-lm builds a
    full-attention ``KVCache`` (the layers :func:`vq_mlxlm.patch` compresses), else the
    tokens the layer's own bounded cache keeps exact (a sliding window's ``max_size``; 0
    for a cache that holds no keys and values).

    GGUF files are llama models (every layer full attention); a model directory's
    architecture is built from its ``config.json`` with lazy, never evaluated weights, and
    its ``make_cache`` is asked.
    """
    from vq_mlxlm.default_model import DEFAULT, default_model_path

    path = default_model_path() if model == DEFAULT else Path(model).expanduser()
    if path.is_file():
        return [None] * kv_shape(model).layers
    from mlx_lm.models.cache import KVCache
    from mlx_lm.utils import load_model

    try:
        net, _ = load_model(path, lazy=True, strict=False)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--model: cannot build {path}/config.json's architecture ({e})") from e
    maker = getattr(net, "make_cache", None)
    caches = maker() if maker is not None else [KVCache() for _ in net.layers]
    return [
        None if type(c).__name__ == "KVCache" else int(getattr(c, "max_size", 0) or 0)
        for c in caches
    ]


def text_args(model):
    """The architecture's arguments: ``model.args``, or a multimodal wrapper's language
    model's (qwen3_5's ``Model.args`` only holds ``text_config``)."""
    inner = getattr(model, "language_model", None)
    args = getattr(inner, "args", None)
    return args if args is not None else model.args


def attention_of(layer):
    """A decoder layer's attention module (``self_attn`` or ``attention``), else None (a
    hybrid's linear-attention or recurrent layer)."""
    return getattr(layer, "self_attn", None) or getattr(layer, "attention", None)


def first_attention(model):
    """The attention module of the first layer that has one (a hybrid's layer 0 may be a
    linear-attention layer)."""
    for layer in model.layers:
        attn = attention_of(layer)
        if attn is not None:
            return attn
    from vq_core import ConfigError

    raise ConfigError("no layer of this model has an attention module (self_attn/attention)")


def layer_head_dim(model, layer) -> int:
    """``head_dim`` of one layer of a loaded mlx-lm model (its attention's, else the
    model args', else ``hidden_size / num_attention_heads``)."""
    args = text_args(model)
    for obj in (attention_of(layer), args):
        value = getattr(obj, "head_dim", None)
        if isinstance(value, int):
            return value
    return args.hidden_size // args.num_attention_heads


def model_kv_shape(model) -> KVShape:
    """The same for a loaded mlx-lm model (read off its first attention layer)."""
    attn = first_attention(model)
    layer = next(x for x in model.layers if attention_of(x) is attn)
    kv = getattr(attn, "n_kv_heads", None) or text_args(model).num_key_value_heads
    return KVShape(len(model.layers), kv, layer_head_dim(model, layer))


def model_fingerprint(model) -> dict:
    """``{"architecture", "layers", "kv_heads", "head_dim"}`` of a loaded mlx-lm model: what
    an artifact (:mod:`vq_core.artifacts`) or a saved prompt cache must match."""
    shape = model_kv_shape(model)
    return {
        "architecture": str(getattr(model, "model_type", None) or text_args(model).model_type),
        "layers": shape.layers,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
    }


def original_caches(model) -> list:
    """mlx-lm's own caches for ``model``: its ``make_cache`` from before
    :func:`vq_mlxlm.patch` replaced it, else one ``KVCache`` per layer."""
    from mlx_lm.models.cache import KVCache

    maker = model.__dict__.get("_vq_original_make_cache", getattr(model, "make_cache", None))
    return maker() if maker is not None else [KVCache() for _ in model.layers]


def model_ropes(model, head_dim: int) -> list:
    """Each layer's RoPE geometry (:func:`vq_algorithms._rope.probe_rope` of its ``rope``)."""
    from vq_algorithms._rope import probe_rope
    from vq_core import ConfigError

    out = []
    for i, layer in enumerate(model.layers):
        rope = getattr(attention_of(layer), "rope", None)
        if rope is None:
            raise ConfigError(f"layer {i} has no attention 'rope' module to read RoPE from")
        out.append(probe_rope(rope, head_dim))
    return out
