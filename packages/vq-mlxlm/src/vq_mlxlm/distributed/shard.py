"""Shard a loaded mlx-lm model over ``mx.distributed`` with mlx-lm's own sharding.

``shard(model, group, "tensor")`` calls the model's ``model.shard(group)`` (mlx-lm's
tensor parallelism: each rank keeps ``1/N`` of every layer's query and KV heads and of its
MLP, and ``all_sum``s the output projections); ``"pipeline"`` calls mlx-lm's
``model.model.pipeline(group)`` (each rank keeps a contiguous run of layers; see
:mod:`vq_mlxlm.distributed.llama_pipeline` for llama, which mlx-lm does not pipeline);
``"tensor+pipeline"`` splits the group into pipeline stages of ``tensor_size`` ranks each
(``group.split``, which MLX's ring backend does not offer). Shard before
:func:`vq_mlxlm.patch`: the caches are then built for this rank's heads and layers
(:mod:`vq_mlxlm.distributed.layout`). Nothing here communicates.
"""

from __future__ import annotations

from dataclasses import replace

from vq_core import ConfigError
from vq_mlxlm.distributed.layout import ShardLayout, global_kv_heads, layout
from vq_mlxlm.model_shape import attention_of

PARALLEL = ("tensor", "pipeline", "tensor+pipeline")


def shard(model, group=None, parallel: str = "tensor", *, tensor_size: int = 2):
    """Shard ``model`` over ``group`` (default: the world group); returns the sharded model.

    The result is ``model`` itself, except for a llama model pipelined through mlx-lm's
    qwen2 class (a new model object holding the same weights). ConfigError when the
    model's class has no such sharding or its heads do not divide among the ranks.
    """
    import mlx.core as mx

    if parallel not in PARALLEL:
        raise ConfigError(f"parallel={parallel!r} is not allowed; expected one of {PARALLEL}")
    group = group or mx.distributed.init()
    if getattr(model, "_vq_shard", None) is not None:
        raise ConfigError("this model is sharded already")
    if getattr(model, "_vq_config", None) is not None:
        raise ConfigError("shard the model before vq_mlxlm.patch, so caches fit the shard")
    if parallel != "tensor":
        model = _pipelinable(model)
    if parallel == "tensor":
        return _tensor(model, group)
    if parallel == "pipeline":
        return _pipeline(model, group)
    n = group.size()
    if type(tensor_size) is not int or tensor_size < 1 or n % tensor_size:
        raise ConfigError(f"tensor_size={tensor_size!r} must be a whole divisor of {n} ranks")
    rank = group.rank()
    try:  # stage = consecutive ranks; the same tensor rank across stages forms a pipeline
        tensor_group = group.split(rank // tensor_size, rank % tensor_size)
        pipeline_group = group.split(rank % tensor_size, rank // tensor_size)
    except RuntimeError as e:
        raise ConfigError(
            f"tensor+pipeline parallelism needs group.split, which this backend refuses ({e}); "
            "MLX's ring backend has none: use --parallel tensor or pipeline there"
        ) from None
    model = _tensor(model, tensor_group)
    tensor_layout = model._vq_shard
    del model._vq_shard
    model = _pipeline(model, pipeline_group)
    model._vq_shard = replace(
        model._vq_shard,
        kv_heads=tensor_layout.kv_heads,
        first_kv_head=tensor_layout.first_kv_head,
        local_kv_heads=tensor_layout.local_kv_heads,
        tensor_rank=tensor_layout.tensor_rank,
        tensor_size=tensor_layout.tensor_size,
    )
    return model


def _tensor(model, group):
    if not hasattr(model, "shard"):
        raise ConfigError(
            f"{type(model).__module__}: mlx-lm's class for this model has no shard() "
            "(tensor parallelism); use parallel='pipeline' if it has a pipeline"
        )
    n = group.size()
    before = layout(model)
    for i, layer in enumerate(model.layers):
        attn = attention_of(layer)
        for what in ("n_heads", "n_kv_heads"):
            count = getattr(attn, what, None)
            if isinstance(count, int) and count % n:
                raise ConfigError(
                    f"tensor parallelism over {n} ranks: layer {i} has {count} "
                    f"{'query' if what == 'n_heads' else 'KV'} heads, not divisible by {n} "
                    "(mlx-lm would silently drop the remainder); use another rank count "
                    "or parallel='pipeline'"
                )
    try:
        model.shard(group)
    except ValueError as e:
        raise ConfigError(f"mlx-lm's model.shard over {n} ranks failed: {e}") from None
    local = before.kv_heads // n
    model._vq_shard = replace(
        before,
        first_kv_head=group.rank() * local,
        local_kv_heads=local,
        tensor_rank=group.rank(),
        tensor_size=n,
    )
    return model


def _pipelinable(model):
    """``model``, or for a llama model the same weights in mlx-lm's pipelined qwen2 class."""
    if hasattr(getattr(model, "model", None), "pipeline"):
        return model
    if getattr(model, "model_type", None) != "llama":
        raise ConfigError(
            f"{type(model).__module__}: mlx-lm's class for this model has no pipeline(); "
            "use parallel='tensor' if it has shard()"
        )
    from vq_mlxlm.distributed.llama_pipeline import as_qwen2

    return as_qwen2(model)


def _pipeline(model, group):
    inner = model.model
    n = group.size()
    total = len(inner.layers)
    if total < n:
        raise ConfigError(f"pipeline parallelism: {total} layers cannot feed {n} stages")
    inner.pipeline(group)
    heads = global_kv_heads(model)
    model._vq_shard = ShardLayout(
        layers=total,
        first_layer=inner.start_idx,
        local_layers=inner.end_idx - inner.start_idx,
        kv_heads=heads,
        first_kv_head=0,
        local_kv_heads=heads,
        pipeline_rank=group.rank(),
        pipeline_size=n,
    )
    return model
