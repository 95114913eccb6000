"""The exact prefix every row starts from, computed once and written into each cache.

A prompt prefilled in one chunk through a vq cache attends to its own exact keys and
values (the chunk is compressed only as it is stored), so its keys and values are the
same for every method. The harness therefore prefills a prefix once with mlx-lm's exact
``KVCache`` (in chunks of ``chunk`` tokens, which for an exact cache is the same as one
chunk) and hands each cache under test the resulting keys and values through
``update_and_fetch``, which is where each cache quantizes them. mlx-lm's
``QuantizedKVCache`` gets the same exact keys and values, so the prefix costs no row an
extra error; the error each row shows comes from attending to its stored history.
"""

from __future__ import annotations

import mlx.core as mx

KV = list[tuple[mx.array, mx.array]]  # per layer: keys, values [B, H_kv, L, D]


def exact_kv(model, tokens: mx.array, chunk: int = 256, start: KV | None = None) -> KV:
    """Keys and values of ``tokens [B, L]`` after ``start`` (an exact prefix), per layer."""
    from mlx_lm.models.cache import make_prompt_cache

    from vq_mlxlm.patch import unpatch

    caches = make_prompt_cache(unpatch(model))
    if start is not None:
        fill(caches, start)
    body = _backbone(model)
    for i in range(0, tokens.shape[1], chunk):
        mx.eval(body(tokens[:, i : i + chunk], cache=caches))
    return [_kv_of(c) for c in caches]


def fill(caches: list, kv: KV) -> list:
    """Write each layer's keys and values into ``caches`` (one ``update_and_fetch``)."""
    for cache, (keys, values) in zip(caches, kv, strict=True):
        cache.update_and_fetch(keys, values)
    eval_caches(caches)
    return caches


def eval_caches(caches: list) -> None:
    """Materialize every array the caches hold (their state may mix arrays and metadata)."""
    from mlx.utils import tree_flatten

    mx.eval([a for c in caches for _, a in tree_flatten(c.state) if isinstance(a, mx.array)])


def sliced(kv: KV, end: int) -> KV:
    """The first ``end`` tokens of every layer."""
    return [(k[:, :, :end], v[:, :, :end]) for k, v in kv]


def _kv_of(cache) -> tuple[mx.array, mx.array]:
    keys, values = cache.keys, cache.values
    return keys[:, :, : cache.offset], values[:, :, : cache.offset]


def _backbone(model):
    """The transformer without the LM head (the prefix's logits are never needed)."""
    inner = getattr(model, "model", None)
    return inner if callable(inner) else model
