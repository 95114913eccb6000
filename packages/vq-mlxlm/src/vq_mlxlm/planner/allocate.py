"""Per-layer key/value widths under a budget: a multiple-choice knapsack, solved exactly.

Each layer ``i`` picks one option ``o`` (a key width and a value width) with distortion
``D[i][o]`` (measured, :mod:`.probe`) and cost ``C[i][o]`` in integer units (accounted bits
or measured bytes, :func:`units`); the plan minimizes ``sum_i D[i][o_i]`` subject to
``sum_i C[i][o_i] <= capacity`` by dynamic programming over the units spent (Kellerer,
Pferschy & Pisinger, *Knapsack Problems*, 2004, Section 11.5), ``O(L * options *
capacity)``. Costs are rounded *up* to units, so a plan that fits in units fits in reality.

The cost of a layer at a context of ``N`` tokens, as the cache holds it: the first ``sink``
tokens, the ``window`` most recent ones and the newest partial ``block`` stay exact, the rest
are compressed (:class:`vq_core.CompressedKVCache`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vq_core import ConfigError

INF = math.inf


def compressed_tokens(context: int, sink: int, window: int, block: int) -> int:
    """Tokens a cache holding ``context`` tokens keeps compressed."""
    free = max(0, context - sink - window)
    return free - free % block


def accounted_bits(
    key_bpe: float, value_bpe: float, context: int, sink: int, window: int, block: int
) -> float:
    """Bits per cached element (keys and values averaged), exact tokens at 16 bits, as
    ``vq eval`` accounts them (:func:`vq_mlxlm.evaluation.specs.accounted_bits`)."""
    comp = compressed_tokens(context, sink, window, block)
    return (comp * (key_bpe + value_bpe) / 2 + (context - comp) * 16) / context


def units(costs: Sequence[Sequence[float]], budget: float, resolution: int) -> tuple[list, int]:
    """Integer costs (``ceil(cost / unit)``) and the capacity (``floor(budget / unit)``),
    with ``unit = budget / resolution``."""
    if budget <= 0:
        raise ConfigError(f"budget must be positive, got {budget}")
    unit = budget / resolution
    return [[math.ceil(c / unit - 1e-9) for c in row] for row in costs], resolution


def allocate(distortion: Sequence[Sequence[float]], cost: Sequence[Sequence[int]], capacity: int):
    """The option index of each layer minimizing total distortion within ``capacity``
    (``distortion``, ``cost``: ``[L][options]``); ValueError when nothing fits."""
    if len(distortion) != len(cost) or any(
        len(d) != len(c) for d, c in zip(distortion, cost, strict=True)
    ):
        raise ConfigError("distortion and cost tables differ in shape")
    best = [0.0] + [INF] * capacity  # best[t]: least distortion spending exactly t units
    choices = []
    for d_row, c_row in zip(distortion, cost, strict=True):
        nxt = [INF] * (capacity + 1)
        pick = [-1] * (capacity + 1)
        for o, (d, c) in enumerate(zip(d_row, c_row, strict=True)):
            if c > capacity:
                continue
            for t in range(capacity - c + 1):
                v = best[t] + d
                if v < nxt[t + c]:
                    nxt[t + c], pick[t + c] = v, o
        best = nxt
        choices.append(pick)
    end = min(range(capacity + 1), key=lambda t: best[t])
    if best[end] == INF:
        cheapest = sum(min(row) for row in cost)
        raise ConfigError(
            f"no option fits: the cheapest plan costs {cheapest} units, the budget {capacity}"
        )
    out = []
    t = end
    for i in reversed(range(len(cost))):
        o = choices[i][t]
        out.append(o)
        t -= cost[i][o]
    return out[::-1]
