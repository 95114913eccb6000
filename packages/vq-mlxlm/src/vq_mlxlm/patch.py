"""Turn a loaded mlx-lm model into one that builds vq caches.

``patch(model, method="turboquant_mse", bits=4)`` routes attention (see
:mod:`vq_mlxlm.routing`) and replaces ``model.make_cache`` so ``mlx_lm.generate``,
``stream_generate``, ``make_prompt_cache`` and mlx-lm's server all get compressed caches.
Every full-attention layer (mlx-lm's ``KVCache``) gets a :class:`~vq_core.CompressedKVCache`;
sliding-window layers (``RotatingKVCache``) a :class:`~vq_core.CompressedRotatingKVCache`
with the same window (``sliding="exact"`` keeps mlx-lm's). ``bits`` may be one value or one
per layer (per-layer bit allocation). On a model sharded over ``mx.distributed``
(:func:`vq_mlxlm.distributed.shard`, or mlx-lm's ``sharded_load``) each rank's caches hold
its own KV heads and layers, with the settings, seeds and artifacts of those global layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vq_core import CompressedKVCache, CompressedRotatingKVCache, ConfigError, check_bool
from vq_core.cache import DEFAULT_BLOCK, DEFAULT_CENTER, DEFAULT_SINK
from vq_mlxlm.architectures import check_architecture
from vq_mlxlm.compiled_decode import install, uninstall
from vq_mlxlm.layer_caches import plan
from vq_mlxlm.model_shape import layer_head_dim, model_fingerprint, original_caches
from vq_mlxlm.routing import route

# Kept importable for one release (now vq_mlxlm.model_shape.layer_head_dim).
_head_dim = layer_head_dim


def patch(
    model,
    method: str = "turboquant_mse",
    bits: int | Sequence[int] = 4,
    *,
    value_method: str | None = None,
    value_bits: int | Sequence[int] | None = None,
    window: int = 0,
    sink: int = DEFAULT_SINK,
    center: bool = DEFAULT_CENTER,
    block: int = DEFAULT_BLOCK,
    seed: int = 0,
    artifacts: str | None = None,
    sliding: str = "compressed",
    compiled_decode: bool = True,
    **options: Any,
):
    """Make ``model.make_cache()`` return vq caches; returns the model (patched in place).

    Args:
        method: key method (registry name); values use ``value_method`` or the method's
            default value partner.
        bits, value_bits: one int, or one per layer.
        window: recent tokens kept exact per layer.
        sink: first tokens kept exact per layer (attention sinks; default 1).
        center: subtract the per-head mean key/value of the first compressed tokens.
        block: new tokens stay exact until this many are held, then are encoded together.
        artifacts: directory from ``vq calibrate``, checked against this model's fingerprint.
            For a calibrated method each layer loads its own keys/values artifact; for any
            other method the directory's RateQuant allocation sets the bits of every layer
            (``bits`` is then ignored).
        sliding: ``"compressed"`` (default): sliding-window layers (mlx-lm's
            ``RotatingKVCache(max_size, keep)``) get a
            :class:`~vq_core.CompressedRotatingKVCache` with the same window; ``"exact"``:
            they keep mlx-lm's exact cache.
        compiled_decode: run one-token forwards over vq caches as one compiled graph on a
            GPU (:mod:`vq_mlxlm.compiled_decode`; not on the CPU by default, nor on a
            sharded model, whose collectives stay uncompiled); False keeps mlx-lm's
            forward for every step.
        options: extra config for the key method (e.g. ``rotation="orthogonal"``).
    """
    from vq_mlxlm.distributed.layout import layout

    check_architecture(model)
    check_bool("compiled_decode", compiled_decode)
    if sliding not in ("compressed", "exact"):
        raise ConfigError(f"sliding={sliding!r} is not allowed; expected 'compressed' or 'exact'")
    spread = layout(model)  # a sharded model: this rank's layers and KV heads
    layers = list(model.layers)
    head_dims = [layer_head_dim(model, layer) for layer in layers]
    resolved = plan(
        _fingerprint(model, spread),
        method,
        bits,
        value_method=value_method,
        value_bits=value_bits,
        window=window,
        sink=sink,
        center=center,
        block=block,
        seed=seed,
        artifacts=artifacts,
        options=options,
    )
    value_method = resolved.value_method
    if "_vq_original_make_cache" not in model.__dict__:
        original = getattr(model, "make_cache", None)
        model._vq_original_make_cache = original
    route()
    _register_cache_class()

    def layer_cache(i: int) -> CompressedKVCache:  # i: local layer; settings of the global one
        heads = (spread.first_kv_head, spread.local_kv_heads, spread.kv_heads)
        return resolved.layer_cache(spread.first_layer + i, head_dims[i], heads=heads)

    first = layer_cache(0)  # bad configs fail at patch time, not mid-generation
    if first.key_quantizer.position_aware:
        _check_ropes(model, [layer_cache(i) for i in range(len(layers))], head_dims[0])

    def vq_layer(i: int, c):
        kind = type(c).__name__
        if kind == "KVCache":
            return layer_cache(i)
        if kind == "RotatingKVCache" and sliding == "compressed":
            return CompressedRotatingKVCache.like(layer_cache(i), max_size=c.max_size, keep=c.keep)
        return c

    rotating = any(type(c).__name__ == "RotatingKVCache" for c in original_caches(model))
    if sliding == "compressed" and first.key_quantizer.position_aware and rotating:
        raise ConfigError(
            f"{method} keys are position-aware and this model has sliding-window layers, "
            "which a compressed rotating cache cannot give positions: pass "
            "sliding='exact' to keep them exact"
        )

    def make_vq_cache() -> list:
        caches = original_caches(model)
        out = [vq_layer(i, c) for i, c in enumerate(caches)]
        if not any(isinstance(c, CompressedKVCache) for c in out):
            raise ConfigError("no layer of this model uses a full-attention KVCache to replace")
        return out

    model.make_cache = make_vq_cache
    if compiled_decode and not spread.sharded:
        install(model)
    else:
        uninstall(model)
    model._vq_config = {
        "method": method,
        "bits": bits,
        "value_method": value_method,
        "value_bits": value_bits,
        "window": window,
        "sink": sink,
        "center": center,
        "block": block,
        "seed": seed,
        "artifacts": artifacts,
        "sliding": sliding,
        **resolved.options,
    }
    return model


def unpatch(model):
    """Restore the model's own ``make_cache`` and forward."""
    uninstall(model)
    if "_vq_original_make_cache" in model.__dict__:
        original = model.__dict__.pop("_vq_original_make_cache")
        if original is None:
            del model.make_cache
        else:
            model.make_cache = original
    return model


def _fingerprint(model, spread) -> dict:
    """The whole model's fingerprint (a shard's artifacts are the whole model's)."""
    return model_fingerprint(model) | {"layers": spread.layers, "kv_heads": spread.kv_heads}


def _check_ropes(model, caches: list, head_dim: int) -> None:
    """ArtifactError unless each layer's RoPE is the one its codebooks were trained with."""
    from vq_core import ArtifactError
    from vq_mlxlm.model_shape import model_ropes

    for i, (rope, cache) in enumerate(zip(model_ropes(model, head_dim), caches, strict=True)):
        if not cache.key_quantizer.geometry.matches(rope, tol=1e-5):
            raise ArtifactError(
                f"{cache.key_quantizer.method} artifact: layer {i} was calibrated with another "
                "RoPE (pairing or frequencies differ from this model's)"
            )


def _register_cache_class() -> None:
    """mlx-lm's ``load_prompt_cache`` looks cache classes up by name in its cache module."""
    from mlx_lm.models import cache as mlx_cache

    mlx_cache.CompressedKVCache = CompressedKVCache
    mlx_cache.CompressedRotatingKVCache = CompressedRotatingKVCache
