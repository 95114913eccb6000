"""What :func:`vq_mlxlm.patch` builds per layer, and the same checks before a model loads.

:func:`plan` resolves patch()'s arguments against a model fingerprint (``architecture``,
``layers``, ``kv_heads``, ``head_dim``): a calibrated method's artifact is verified and its
saved config merged in; for any other method an artifacts directory is a RateQuant
allocation that sets each layer's bits. :meth:`CachePlan.layer_cache` builds layer ``i``'s
cache. :func:`check_config` runs both for a model known only by its KV shape (read without
loading weights, :func:`vq_mlxlm.model_shape.kv_shape`), so a command line refuses a bad
flag in a second instead of after loading the model (the architecture and each layer's
RoPE are checked by patch() itself, once the model is loaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import vq_algorithms  # noqa: F401  (registers the methods even without installed entry points)
from vq_core import CompressedKVCache, ConfigError, check_value_method, get, make_cache
from vq_core.cache import DEFAULT_BLOCK, DEFAULT_CENTER, DEFAULT_SINK


@dataclass(frozen=True)
class CachePlan:
    """Resolved per-layer settings; ``artifacts`` is set only for a calibrated method."""

    method: str
    bits: list[int]
    value_bits: list[int | None]
    value_method: str | None
    window: int
    sink: int
    center: bool
    seed: int
    artifacts: str | None
    options: dict[str, Any] = field(default_factory=dict)
    block: int = DEFAULT_BLOCK

    def layer_cache(
        self, i: int, head_dim: int, heads: tuple[int, int, int] | None = None
    ) -> CompressedKVCache:
        """Layer ``i``'s cache (seeds ``seed + 1000 i`` for keys, ``+ 1`` for values).

        ``heads = (first, count, total)``: the cache holds KV heads ``[first, first +
        count)`` of ``total`` (a tensor-parallel shard); quantizers with per-head codebooks
        keep those heads' codebooks only.
        """
        cache = make_cache(
            self.method,
            head_dim=head_dim,
            bits=self.bits[i],
            value_method=self.value_method,
            value_bits=self.value_bits[i],
            window=self.window,
            sink=self.sink,
            center=self.center,
            block=self.block,
            seed=self.seed + 1000 * i,
            artifact=self.artifacts,
            layer=i,
            encode_lag=self.encode_lag(i),
            **self.options,
        )
        if heads is None:
            return cache
        keys = _head_slice(cache.key_quantizer, heads)
        values = _head_slice(cache.value_quantizer, heads)
        if keys is cache.key_quantizer and values is cache.value_quantizer:
            return cache
        return CompressedKVCache(
            keys, values, window=self.window, sink=self.sink, center=self.center,
            block=self.block, encode_lag=cache.encode_lag,
        )  # fmt: skip

    def encode_lag(self, i: int) -> int:
        """Layer ``i``'s decode-time encode lag: the layers' lags spread evenly over a block,
        so that a decode step encodes the filled blocks of about ``layers / block`` layers
        rather than of all of them (see :class:`~vq_core.CompressedKVCache`)."""
        return (i * self.block // len(self.bits)) % self.block


def _head_slice(quantizer, heads: tuple[int, int, int]):
    """``quantizer`` restricted to KV heads ``[first, first + count)`` of ``total`` where its
    codebooks are per head (comm_vq's ``tables [H, ...]``); shared ones are returned as is."""
    first, count, total = heads
    per_head = getattr(quantizer, "heads", 1)
    if per_head == 1:
        return quantizer
    if per_head != total:
        raise ConfigError(
            f"{quantizer.method}: artifact codebooks for {per_head} KV heads, model has {total}"
        )
    if count == total:
        return quantizer
    tables = quantizer.tables[first : first + count]
    return type(quantizer)(quantizer.config, tables=tables, geometry=quantizer.geometry)


def plan(
    fingerprint: dict[str, Any],
    method: str,
    bits: int | Sequence[int],
    *,
    value_method: str | None = None,
    value_bits: int | Sequence[int] | None = None,
    window: int = 0,
    sink: int = DEFAULT_SINK,
    center: bool = DEFAULT_CENTER,
    block: int = DEFAULT_BLOCK,
    seed: int = 0,
    artifacts: str | None = None,
    options: dict[str, Any] | None = None,
) -> CachePlan:
    """Resolve patch()'s arguments for a model with this ``fingerprint`` (ConfigError or
    ArtifactError naming the problem)."""
    options = dict(options or {})
    calibrated = get(method).needs_calibration
    if value_method is not None:
        check_value_method(value_method)
    if artifacts is None and calibrated and not options.get("untrained"):
        raise ConfigError(
            f"{method} is calibrated and needs its artifact: patch(..., artifacts=<dir from "
            f"`vq calibrate --method {method}`>), or untrained=True (tests and demos only)"
        )
    layers = fingerprint["layers"]
    per_layer_bits = _per_layer("bits", bits, layers)
    per_layer_vbits = _per_layer("value_bits", value_bits, layers)
    if artifacts is not None and calibrated:
        meta = check_artifact(fingerprint, method, artifacts)
        options = {**meta.get("config", {}), **options}  # e.g. comm_vq's table_bits
        if value_method is None:
            value_method = get(method).default_value_method or method
    elif artifacts is not None:  # a RateQuant allocation: per-layer bits for this method
        per_layer_bits = ratequant_bits(fingerprint, method, artifacts)
    return CachePlan(
        method,
        per_layer_bits,
        per_layer_vbits,
        value_method,
        window,
        sink,
        center,
        seed,
        artifacts if calibrated else None,
        options,
        block,
    )


def check_config(shape, method: str, bits: int | Sequence[int], **kwargs: Any) -> CachePlan:
    """:func:`plan` for a model of ``shape`` (a :class:`~vq_mlxlm.model_shape.KVShape`),
    then build one layer's cache per distinct width, as patch() would. ``sliding`` is
    accepted and not checked here: which layers slide is known once the model is loaded."""
    kwargs.pop("sliding", None)
    fingerprint = {"layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim}
    resolved = plan(fingerprint, method, bits, **kwargs)
    seen = set()
    for i, widths in enumerate(zip(resolved.bits, resolved.value_bits, strict=True)):
        if widths not in seen:
            seen.add(widths)
            resolved.layer_cache(i, shape.head_dim)
    return resolved


def _per_layer(name: str, value, n: int) -> list:
    if value is None or isinstance(value, int):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ConfigError(f"{name} has {len(values)} entries but the model has {n} layers")
    return values


def check_artifact(fingerprint: dict[str, Any], method: str, artifacts: str) -> dict:
    """The metadata of ``method``'s artifact in ``artifacts``; ArtifactError unless it was
    calibrated for a model with this fingerprint."""
    from vq_core.artifacts import artifact_path, read_artifact

    art = read_artifact(artifact_path(artifacts, method))
    return art.check(method=method, fingerprint=fingerprint).meta


def ratequant_bits(fingerprint: dict[str, Any], method: str, artifacts: str) -> list[int]:
    """Per-layer bits from ``vq calibrate --method ratequant`` (for ``method``)."""
    from vq_core.artifacts import artifact_path, check_meta, read

    path = artifact_path(artifacts, "ratequant")
    if not path.exists():
        raise ConfigError(
            f"{method} needs no calibration; artifacts={artifacts!r} must then hold a RateQuant "
            f"allocation (vq calibrate --method ratequant), but {path} does not exist"
        )
    arrays, meta = read(path)
    check_meta(meta, path, method="ratequant", fingerprint=fingerprint)
    if meta.get("base_method") != method:
        raise ConfigError(
            f"RateQuant allocation {path} was probed for {meta.get('base_method')!r}, "
            f"not {method!r}"
        )
    return [int(b) for b in arrays["allocation"].tolist()]
