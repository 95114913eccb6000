"""The planner's knapsack against brute force, and its cost accounting."""

import itertools
import random

import pytest

from vq_mlxlm.planner.allocate import accounted_bits, allocate, compressed_tokens, units


def _brute(dist, cost, capacity):
    best, arg = float("inf"), None
    for picks in itertools.product(*[range(len(r)) for r in dist]):
        if sum(cost[i][o] for i, o in enumerate(picks)) <= capacity:
            d = sum(dist[i][o] for i, o in enumerate(picks))
            if d < best:
                best, arg = d, picks
    return best, arg


@pytest.mark.parametrize("seed", range(8))
def test_allocation_is_optimal(seed):
    rng = random.Random(seed)
    layers, options = 5, 4
    dist = [[rng.random() for _ in range(options)] for _ in range(layers)]
    cost = [[rng.randrange(1, 9) for _ in range(options)] for _ in range(layers)]
    capacity = rng.randrange(sum(min(r) for r in cost), sum(max(r) for r in cost) + 1)
    picks = allocate(dist, cost, capacity)
    assert sum(cost[i][o] for i, o in enumerate(picks)) <= capacity
    best, _ = _brute(dist, cost, capacity)
    assert sum(dist[i][o] for i, o in enumerate(picks)) == pytest.approx(best)


def test_sensitive_layer_gets_the_bits():
    """Two layers, widths 2 and 4 (costs 2 and 4), budget 6: the layer whose error falls
    more with width gets 4 bits."""
    dist = [[1.0, 0.1], [0.2, 0.15]]
    assert allocate(dist, [[2, 4], [2, 4]], 6) == [1, 0]
    with pytest.raises(ValueError, match="no option fits"):
        allocate(dist, [[2, 4], [2, 4]], 3)
    with pytest.raises(ValueError, match="differ in shape"):
        allocate(dist, [[2, 4]], 6)


def test_costs_follow_the_cache():
    """Sink, window and the newest partial block stay exact (16 bits)."""
    assert compressed_tokens(1000, sink=1, window=0, block=32) == 992  # 999 -> 31 blocks
    assert compressed_tokens(1000, sink=1, window=64, block=32) == 928
    assert compressed_tokens(10, sink=1, window=64, block=32) == 0
    bits = accounted_bits(4.25, 2.25, 1000, sink=1, window=0, block=32)
    assert bits == pytest.approx((992 * 3.25 + 8 * 16) / 1000)
    unit_cost, capacity = units([[1.0, 2.5]], 4.0, 8)  # unit 0.5: costs rounded up
    assert unit_cost == [[2, 5]] and capacity == 8
    with pytest.raises(ValueError, match="positive"):
        units([[1.0]], 0.0, 8)
