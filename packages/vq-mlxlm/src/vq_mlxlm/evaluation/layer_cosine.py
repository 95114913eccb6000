"""Per-layer attention-output cosine against the exact cache, on identical inputs.

One chunk of ``L`` tokens after the exact prefix is run once through the exact model,
recording for every layer the queries, the chunk's own keys and values, and the exact
attention output (``[B, H_q, L, D]``). Each cache under test is then filled with the same
exact prefix (so it stores it compressed) and, layer by layer, given the *recorded* chunk
keys/values and queries; its attention output is compared with the recorded one. No
error carries from one layer to the next, so the numbers isolate each layer's attention
error. Cosine is taken per token over all query heads concatenated (the vector that
enters ``o_proj``) and averaged over the chunk's tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx

from vq_mlxlm.evaluation.prefix import KV, fill
from vq_mlxlm.routing import routed_attention

_NAME = "scaled_dot_product_attention"


@dataclass(frozen=True)
class Record:
    queries: mx.array  # [B, H_q, L, D]
    keys: mx.array  # the chunk's own keys [B, H_kv, L, D]
    values: mx.array
    scale: float
    mask: object
    output: mx.array  # exact attention output [B, H_q, L, D]


def capture(model, prefix: KV, tokens: mx.array) -> list[Record]:
    """Run ``tokens [1, L]`` after the exact ``prefix``; one record per attention call."""
    from mlx_lm.models.cache import make_prompt_cache

    from vq_mlxlm.patch import unpatch

    caches = fill(make_prompt_cache(unpatch(model)), prefix)
    module = sys.modules[type(model).__module__]
    original = getattr(module, _NAME)
    length = tokens.shape[1]
    records: list[Record] = []

    def recorder(queries, keys, values, cache=None, scale=1.0, mask=None, sinks=None):
        out = original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        chunk_k, chunk_v = keys[:, :, -length:], values[:, :, -length:]
        records.append(Record(queries, chunk_k, chunk_v, scale, mask, out))
        return out

    setattr(module, _NAME, recorder)
    try:
        mx.eval(model(tokens, cache=caches))
    finally:
        setattr(module, _NAME, original)
    mx.eval([(r.queries, r.keys, r.values, r.output) for r in records])
    return records


def layer_cosines(caches: list, prefix: KV, records: list[Record]) -> list[float]:
    """Mean per-token cosine of each layer's attention output through ``caches``."""
    fill(caches, prefix)
    out = []
    for cache, r in zip(caches, records, strict=True):
        keys, values = cache.update_and_fetch(r.keys, r.values)
        queries = r.queries * 1  # a copy: mlx-lm's quantized attention scales it in place
        got = routed_attention(queries, keys, values, cache, r.scale, r.mask)
        out.append(_cosine(got, r.output))
    return out


def _cosine(a: mx.array, b: mx.array) -> float:
    bsz, heads, length, dim = a.shape
    a = a.astype(mx.float32).transpose(0, 2, 1, 3).reshape(bsz * length, heads * dim)
    b = b.astype(mx.float32).transpose(0, 2, 1, 3).reshape(bsz * length, heads * dim)
    num = (a * b).sum(-1)
    den = mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1)
    return (num / mx.maximum(den, 1e-30)).mean().item()
