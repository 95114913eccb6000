"""Which layers and KV heads of a model this rank holds.

A tensor-parallel shard (mlx-lm's ``model.shard(group)``) keeps every layer and a
contiguous slice of each layer's KV heads: rank ``r`` of ``N`` holds heads
``[r H/N, (r+1) H/N)`` (``shard_linear``'s "all-to-sharded" split of ``k_proj``/``v_proj``
rows). A pipeline stage (mlx-lm's ``model.model.pipeline(group)``) keeps every head of the
layers ``[start_idx, end_idx)``; ``model.layers`` is then that slice. :func:`layout` reads
this off a model (sharded by :func:`vq_mlxlm.distributed.shard`, by mlx-lm's own
``sharded_load``, or not at all), so :func:`vq_mlxlm.patch` gives layer ``i`` of the slice
the settings, seed and artifact of global layer ``first_layer + i``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vq_core import ConfigError
from vq_mlxlm.model_shape import attention_of, first_attention, text_args


@dataclass(frozen=True)
class ShardLayout:
    """This rank's part of the model's KV cache (global indices)."""

    layers: int  # layers of the whole model
    first_layer: int
    local_layers: int
    kv_heads: int  # KV heads per layer of the whole model
    first_kv_head: int
    local_kv_heads: int
    tensor_rank: int = 0
    tensor_size: int = 1
    pipeline_rank: int = 0
    pipeline_size: int = 1

    @property
    def sharded(self) -> bool:
        return self.tensor_size > 1 or self.pipeline_size > 1

    def describe(self) -> str:
        last_layer = self.first_layer + self.local_layers
        last_head = self.first_kv_head + self.local_kv_heads
        return (
            f"layers {self.first_layer}-{last_layer - 1} of {self.layers}, "
            f"KV heads {self.first_kv_head}-{last_head - 1} of {self.kv_heads}"
        )


def global_layers(model) -> int:
    """Layers of the whole model (a pipeline stage's ``model.layers`` is its slice only)."""
    n = getattr(text_args(model), "num_hidden_layers", None)
    if isinstance(n, int):
        return n
    inner = getattr(model, "model", None)
    if getattr(inner, "pipeline_size", 1) > 1:
        raise ConfigError("a pipeline stage whose model.args has no num_hidden_layers")
    return len(model.layers)


def global_kv_heads(model) -> int:
    args = text_args(model)
    n = getattr(args, "num_key_value_heads", None) or getattr(args, "num_attention_heads", None)
    if isinstance(n, int):
        return n
    return int(first_attention(model).n_kv_heads)


def layout(model) -> ShardLayout:
    """This rank's :class:`ShardLayout`; an unsharded model holds everything.

    A model sharded by :func:`vq_mlxlm.distributed.shard` carries its layout; one sharded by
    mlx-lm itself is read off: its pipeline attributes, and for tensor parallelism the
    attention's ``n_kv_heads`` against ``args.num_key_value_heads`` with the rank of the
    world group (``mx.distributed.init()``, the group ``sharded_load`` shards over by default).
    """
    recorded = getattr(model, "_vq_shard", None)
    if recorded is not None:
        return recorded
    inner = getattr(model, "model", None)
    p_rank, p_size = getattr(inner, "pipeline_rank", 0), getattr(inner, "pipeline_size", 1)
    first = getattr(inner, "start_idx", 0) if p_size > 1 else 0
    local = list(model.layers)
    total_heads = global_kv_heads(model)
    attn = next((a for a in map(attention_of, local) if a is not None), None)
    local_heads = getattr(attn, "n_kv_heads", None) or total_heads
    t_rank, t_size = 0, 1
    if local_heads != total_heads:
        import mlx.core as mx

        t_size = total_heads // local_heads
        if t_size * local_heads != total_heads:
            raise ConfigError(
                f"attention holds {local_heads} of {total_heads} KV heads, not an even share"
            )
        world = mx.distributed.init()
        if world.size() != t_size:
            raise ConfigError(
                f"the model is tensor-sharded {t_size} ways but the world group has "
                f"{world.size()} ranks; shard with vq_mlxlm.distributed.shard to record it"
            )
        t_rank = world.rank()
    return ShardLayout(
        layers=global_layers(model),
        first_layer=first,
        local_layers=len(local),
        kv_heads=total_heads,
        first_kv_head=t_rank * local_heads,
        local_kv_heads=local_heads,
        tensor_rank=t_rank,
        tensor_size=t_size,
        pipeline_rank=p_rank,
        pipeline_size=p_size,
    )
