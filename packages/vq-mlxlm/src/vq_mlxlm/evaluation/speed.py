"""Prefill and decode speed, each measured side by side with the exact cache.

Absolute tokens/s on a CPU say little (and the machine may be shared), so every row is
timed right after the exact cache on the same work, and the ratio is what the report
shows. Prefill: ``tokens`` fed from an empty cache in chunks of ``chunk`` (the second and
later chunks attend to the compressed history). Decode: ``steps`` single-token forwards on
a cache that already holds the scored text (the caches the quality run left behind); the
exact cache is trimmed back afterwards so every row decodes at the same context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Speed:
    prefill_tps: float
    decode_tps: float
    exact_prefill_tps: float
    exact_decode_tps: float
    decode_context: int

    @property
    def prefill_ratio(self) -> float:
        return self.prefill_tps / self.exact_prefill_tps

    @property
    def decode_ratio(self) -> float:
        return self.decode_tps / self.exact_decode_tps


def prefill_tps(model, caches: list, tokens: list[int], chunk: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(tokens), chunk):
        mx.eval(model(mx.array(tokens[i : i + chunk])[None], cache=caches))
    return len(tokens) / (time.perf_counter() - start)


def decode_tps(model, caches: list, tokens: list[int]) -> float:
    mx.eval(model(mx.array(tokens[:1])[None], cache=caches))  # first step: not timed
    start = time.perf_counter()
    for t in tokens[1:]:
        mx.eval(model(mx.array([[t]]), cache=caches))
    return (len(tokens) - 1) / (time.perf_counter() - start)


def side_by_side(
    model,
    exact_fresh: list,
    test_fresh: list,
    exact_full: list,
    test_full: list,
    prefill_tokens: list[int],
    decode_tokens: list[int],
    chunk: int,
) -> Speed:
    """Time exact then test on the same prefill and decode work; ``*_full`` hold context."""
    from mlx_lm.models.cache import trim_prompt_cache

    context = exact_full[0].offset
    exact_p = prefill_tps(model, exact_fresh, prefill_tokens, chunk)
    test_p = prefill_tps(model, test_fresh, prefill_tokens, chunk)
    exact_d = decode_tps(model, exact_full, decode_tokens)
    trim_prompt_cache(exact_full, len(decode_tokens))
    test_d = decode_tps(model, test_full, decode_tokens)
    return Speed(test_p, test_d, exact_p, exact_d, context)
