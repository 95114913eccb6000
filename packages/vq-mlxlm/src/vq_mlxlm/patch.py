"""Turn a loaded mlx-lm model into one that builds vq caches.

``patch(model, method="turboquant_mse", bits=4)`` routes attention (see
:mod:`vq_mlxlm.routing`) and replaces ``model.make_cache`` so ``mlx_lm.generate``,
``stream_generate``, ``make_prompt_cache`` and mlx-lm's server all get compressed caches.
Every full-attention layer (mlx-lm's ``KVCache``) gets a :class:`~vq_core.CompressedKVCache`;
sliding-window layers keep mlx-lm's bounded ``RotatingKVCache``. ``bits`` may be one value
or one per layer (per-layer bit allocation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import vq_algorithms  # noqa: F401  (registers the methods even without installed entry points)
from vq_core import CompressedKVCache, ConfigError, check_value_method, create, get, make_cache
from vq_mlxlm.routing import check_routable, route


def _head_dim(model, layer) -> int:
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
    for obj in (attn, getattr(model, "args", None)):
        value = getattr(obj, "head_dim", None)
        if isinstance(value, int):
            return value
    args = model.args
    return args.hidden_size // args.num_attention_heads


def _original_caches(model) -> list:
    from mlx_lm.models.cache import KVCache

    maker = getattr(model, "_vq_original_make_cache", None)
    if maker is not None:
        return maker()
    return [KVCache() for _ in model.layers]


def patch(
    model,
    method: str = "turboquant_mse",
    bits: int | Sequence[int] = 4,
    *,
    value_method: str | None = None,
    value_bits: int | Sequence[int] | None = None,
    window: int = 0,
    sink: int = 1,
    center: bool = True,
    seed: int = 0,
    artifacts: str | None = None,
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
        artifacts: directory from ``vq calibrate``, checked against this model's fingerprint.
            For a calibrated method each layer loads its own keys/values artifact; for any
            other method the directory's RateQuant allocation sets the bits of every layer
            (``bits`` is then ignored).
        options: extra config for the key method (e.g. ``rotation="orthogonal"``).
    """
    check_routable(model)
    if value_method is not None:
        check_value_method(value_method)
    if artifacts is None and get(method).needs_calibration and not options.get("untrained"):
        raise ConfigError(
            f"{method} is calibrated and needs its artifact: patch(..., artifacts=<dir from "
            f"`vq calibrate --method {method}`>), or untrained=True (tests and demos only)"
        )
    layers = list(model.layers)
    per_layer_bits = _per_layer("bits", bits, len(layers))
    per_layer_vbits = _per_layer("value_bits", value_bits, len(layers))
    if "_vq_original_make_cache" not in model.__dict__:
        original = getattr(model, "make_cache", None)
        model._vq_original_make_cache = original
    route()
    _register_cache_class()
    head_dims = [_head_dim(model, layer) for layer in layers]

    if artifacts is not None and get(method).needs_calibration:
        meta = _check_artifacts(model, method, artifacts, head_dims[0])
        options = {**meta.get("config", {}), **options}  # e.g. comm_vq's table_bits
        if value_method is None:
            value_method = get(method).default_value_method or method
    elif artifacts is not None:  # a RateQuant allocation: per-layer bits for this method
        per_layer_bits = _ratequant_bits(model, method, artifacts, head_dims[0])

    def layer_cache(i: int) -> CompressedKVCache:
        if artifacts is not None and get(method).needs_calibration:
            common = dict(head_dim=head_dims[i], artifact=artifacts, layer=i)
            keys = create(
                method, bits=per_layer_bits[i], seed=seed + 1000 * i, kind="k", **common, **options
            )
            vbits = per_layer_vbits[i] or per_layer_bits[i]
            vseed = seed + 1000 * i + 1
            if not get(value_method).needs_calibration:
                values = create(value_method, head_dim=head_dims[i], bits=vbits, seed=vseed)
            else:
                v_options = options if value_method == method else {}
                values = create(
                    value_method, bits=vbits, seed=vseed, kind="v", **common, **v_options
                )
            return CompressedKVCache(keys, values, window=window, sink=sink, center=center)
        return make_cache(
            method,
            head_dim=head_dims[i],
            bits=per_layer_bits[i],
            value_method=value_method,
            value_bits=per_layer_vbits[i],
            window=window,
            sink=sink,
            center=center,
            seed=seed + 1000 * i,
            **options,
        )

    first = layer_cache(0)  # bad configs fail at patch time, not mid-generation
    if first.key_quantizer.position_aware:
        _check_ropes(model, [layer_cache(i) for i in range(len(layers))], head_dims[0])

    def make_vq_cache() -> list:
        caches = _original_caches(model)
        out = [layer_cache(i) if type(c).__name__ == "KVCache" else c for i, c in enumerate(caches)]
        if not any(isinstance(c, CompressedKVCache) for c in out):
            raise ConfigError("no layer of this model uses a full-attention KVCache to replace")
        return out

    model.make_cache = make_vq_cache
    model._vq_config = {
        "method": method,
        "bits": bits,
        "value_method": value_method,
        "value_bits": value_bits,
        "window": window,
        "sink": sink,
        "center": center,
        "seed": seed,
        "artifacts": artifacts,
        **options,
    }
    return model


def unpatch(model):
    """Restore the model's own ``make_cache``."""
    if "_vq_original_make_cache" in model.__dict__:
        original = model.__dict__.pop("_vq_original_make_cache")
        if original is None:
            del model.make_cache
        else:
            model.make_cache = original
    return model


def _per_layer(name: str, value, n: int) -> list:
    if value is None or isinstance(value, int):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ConfigError(f"{name} has {len(values)} entries but the model has {n} layers")
    return values


def _fingerprint(model, head_dim: int) -> dict:
    from vq_mlxlm.model_shape import model_kv_shape

    shape = model_kv_shape(model)
    return {
        "architecture": str(getattr(model, "model_type", None) or model.args.model_type),
        "layers": shape.layers,
        "kv_heads": shape.kv_heads,
        "head_dim": head_dim,
    }


def _check_artifacts(model, method: str, artifacts: str, head_dim: int) -> dict:
    """ArtifactError unless ``artifacts`` holds ``method`` calibrated for this model."""
    from vq_algorithms._artifact import artifact_path, check_meta, verify

    path = artifact_path(artifacts, method)
    meta = verify(path)
    check_meta(meta, path, method=method, fingerprint=_fingerprint(model, head_dim))
    return meta


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


def _ratequant_bits(model, method: str, artifacts: str, head_dim: int) -> list[int]:
    """Per-layer bits from ``vq calibrate --method ratequant`` (for ``method``)."""
    from vq_algorithms._artifact import artifact_path, check_meta, read

    path = artifact_path(artifacts, "ratequant")
    if not path.exists():
        raise ConfigError(
            f"{method} needs no calibration; artifacts={artifacts!r} must then hold a RateQuant "
            f"allocation (vq calibrate --method ratequant), but {path} does not exist"
        )
    arrays, meta = read(path)
    check_meta(meta, path, method="ratequant", fingerprint=_fingerprint(model, head_dim))
    if meta.get("base_method") != method:
        raise ConfigError(
            f"RateQuant allocation {path} was probed for {meta.get('base_method')!r}, "
            f"not {method!r}"
        )
    return [int(b) for b in arrays["allocation"].tolist()]


def _register_cache_class() -> None:
    """mlx-lm's ``load_prompt_cache`` looks cache classes up by name in its cache module."""
    from mlx_lm.models import cache as mlx_cache

    mlx_cache.CompressedKVCache = CompressedKVCache
