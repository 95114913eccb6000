"""Measured sensitivity: what compressing one layer's keys (or values) costs the output.

The probe is the one RateQuant's allocation uses (:mod:`vq_mlxlm.calibration.probe`),
sensitivity by perturbation, measured instead of estimated from a Hessian: for layer ``i``
and a width ``b``, only layer ``i``'s cache is compressed, every other layer stays exact,
and the cost is the
mean KL(p_exact || p_probe) over ``scored`` next-token predictions after an exact
``prefix`` that the probed layer holds compressed. Keys and values are probed apart: a key
probe pairs the key width with near-exact values (affine 8-bit, KL ~4e-4 for the whole
model in ``vq eval``), a value probe the other way round, so a layer's cost of keys at
``kb`` and values at ``vb`` is taken as ``S_key[i, kb] + S_value[i, vb]`` (additive across
layers and sides, as RateQuant's allocation assumes).

Speed: layers before ``i`` see exactly the exact run's inputs, so their outputs for the
scored chunk are recorded once and replayed (the probe runs layers ``i..L-1``). Tensor
shapes: the prefix's keys/values ``[1, H_kv, prefix, D]`` per layer, the chunk's logits
``[scored, vocab]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from vq_core import CompressedKVCache, ConfigError, create
from vq_core.cache import DEFAULT_BLOCK
from vq_mlxlm.evaluation.prefix import exact_kv, fill

NEAR_EXACT = ("affine", 8)  # the partner side of a probe


class _Stand:
    """Stands in for a layer: the backbone may read the layer's attributes (e.g.
    ``use_sliding``), which come from the layer itself."""

    def __init__(self, layer):
        self.layer = layer

    def __getattr__(self, name):
        return getattr(self.layer, name)


class _Record(_Stand):
    """Calls a layer and keeps its output (the exact run)."""

    def __init__(self, layer, outputs: list, index: int):
        super().__init__(layer)
        self.outputs, self.index = outputs, index

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        self.outputs[self.index] = out
        return out


class _Replay(_Stand):
    """Stands in for a layer before the probed one: returns its recorded output."""

    def __init__(self, layer, output: mx.array):
        super().__init__(layer)
        self.output = output

    def __call__(self, *args, **kwargs):
        return self.output


def _layer_list(model) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, list):
        raise TypeError("the probe replays model.model.layers, which this model does not have")
    return layers


def _logprobs(logits: mx.array) -> mx.array:
    logits = logits[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass
class Probe:
    """One prefix and scored chunk of a text, with the exact run's outputs kept."""

    model: object
    tokens: list[int]
    prefix: int
    scored: int
    seed: int = 0

    def __post_init__(self):
        from mlx_lm.models.cache import make_prompt_cache

        from vq_mlxlm.model_shape import layer_head_dim
        from vq_mlxlm.patch import unpatch
        from vq_mlxlm.routing import route

        if self.prefix < 2 * DEFAULT_BLOCK or self.scored < 1:
            raise ConfigError(
                f"probe needs prefix >= {2 * DEFAULT_BLOCK} and scored >= 1 tokens, got "
                f"prefix={self.prefix}, scored={self.scored}"
            )
        if len(self.tokens) < self.prefix + self.scored + 1:
            raise ConfigError(
                f"probe text has {len(self.tokens)} tokens; needs {self.prefix + self.scored + 1}"
            )
        unpatch(self.model)
        route()  # compressed caches need the routed attention (patch() would call it)
        self.layers = _layer_list(self.model)
        self.head_dims = [layer_head_dim(self.model, layer) for layer in self.layers]
        self.kv = exact_kv(self.model, mx.array(self.tokens[: self.prefix])[None])
        self.chunk = mx.array(self.tokens[self.prefix : self.prefix + self.scored])[None]
        self.exact = fill(make_prompt_cache(self.model), self.kv)
        self.dtype = self.kv[0][0].dtype
        outputs: list = [None] * len(self.layers)
        originals = list(self.layers)
        try:
            for j, layer in enumerate(originals):
                self.layers[j] = _Record(layer, outputs, j)
            self.reference = _logprobs(self.model(self.chunk, cache=self.exact))
        finally:
            self.layers[:] = originals
        mx.eval(self.reference, outputs)
        self.outputs = outputs
        self._rewind()

    def _rewind(self) -> None:
        for cache in self.exact:
            cache.trim(cache.offset - self.prefix)

    def kl(self, caches: list) -> float:
        """Mean KL of the chunk's predictions through ``caches`` (all layers, fresh)."""
        fill(caches, self.kv)
        return self._kl(_logprobs(self.model(self.chunk, cache=caches)))

    def _kl(self, logp: mx.array) -> float:
        ref = self.reference
        return (mx.exp(ref) * (ref - logp)).sum(axis=-1).mean().item()

    def layer_kl(self, i: int, cache: CompressedKVCache) -> float:
        """Mean KL with only layer ``i`` through ``cache`` (fresh), the rest exact."""
        originals = list(self.layers)
        caches = list(self.exact)
        caches[i] = fill([cache], [self.kv[i]])[0]
        try:
            for j in range(i):
                self.layers[j] = _Replay(originals[j], self.outputs[j])
            logp = _logprobs(self.model(self.chunk, cache=caches))
            mx.eval(logp)
        finally:
            self.layers[:] = originals
            self._rewind()
        return self._kl(logp)

    def side_cache(self, i: int, side: str, method: str, bits: int) -> CompressedKVCache:
        """Layer ``i``'s cache with ``side`` ('k' or 'v') at ``method@bits`` and the other
        side near-exact (:data:`NEAR_EXACT`); sink 1, centering on, default block."""
        d, seed = self.head_dims[i], self.seed + 1000 * i
        exact_method, exact_bits = NEAR_EXACT
        if side == "k":
            keys = create(method, head_dim=d, bits=bits, seed=seed)
            values = create(exact_method, head_dim=d, bits=exact_bits, seed=seed + 1)
        elif side == "v":
            keys = create(exact_method, head_dim=d, bits=exact_bits, seed=seed)
            values = create(method, head_dim=d, bits=bits, seed=seed + 1)
        else:
            raise ConfigError(f"side must be 'k' or 'v', got {side!r}")
        return CompressedKVCache(keys, values, sink=1, center=True)


def sensitivity(
    probe: Probe,
    side: str,
    method: str,
    widths: list[int],
    progress: Callable[[str], None] | None = None,
) -> list[list[float]]:
    """``S[i][j]``: KL with layer ``i``'s ``side`` at ``method@widths[j]`` (``[L][W]``)."""
    table = []
    for i in range(len(probe.layers)):
        table.append([probe.layer_kl(i, probe.side_cache(i, side, method, b)) for b in widths])
        if progress is not None:
            progress(f"{side} {method} layer {i + 1}/{len(probe.layers)}")
    return table
