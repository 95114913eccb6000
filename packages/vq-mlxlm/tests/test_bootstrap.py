"""Bootstrap intervals against distributions whose answer is known (these can fail)."""

import math
import random

import pytest

from vq_mlxlm.evaluation.bootstrap import (
    Interval,
    delta_ppl_interval,
    mean_interval,
    paired_interval,
)


def test_mean_interval_covers_the_true_mean_at_its_level():
    """Normal(1, 2) samples of 64: a 95% interval holds the true mean ~95% of the time
    (percentile intervals run a little short at this size), and its width is close to
    2 * 1.96 * sigma / sqrt(n)."""
    rng = random.Random(1)
    hits, widths = 0, []
    reps = 120
    for r in range(reps):
        values = [rng.gauss(1.0, 2.0) for _ in range(64)]
        ci = mean_interval(values, block=1, resamples=250, seed=r)
        hits += ci.contains(1.0)
        widths.append(ci.high - ci.low)
    assert 0.86 <= hits / reps <= 0.995
    expected = 2 * 1.96 * 2.0 / math.sqrt(64)
    assert sum(widths) / reps == pytest.approx(expected, rel=0.12)


def test_blocks_keep_the_coverage_of_correlated_tokens():
    """AR(1) tokens (phi = 0.9): resampling single tokens gives intervals far too narrow;
    blocks of 32 keep them honest."""
    rng = random.Random(2)
    reps, n = 50, 512
    cover = {1: 0, 32: 0}
    for r in range(reps):
        x, values = 0.0, []
        for _ in range(n):
            x = 0.9 * x + rng.gauss(0, 1)
            values.append(x)
        for block in cover:
            cover[block] += mean_interval(values, block, resamples=150, seed=r).contains(0.0)
    assert cover[1] / reps < 0.6
    assert cover[32] / reps >= 0.75


def test_delta_ppl_is_paired_and_in_percent():
    """A cache that adds 0.05 nats to every token: ΔPPL = 100 (e^0.05 - 1) exactly, with a
    zero-width interval however much the exact NLL itself varies (pairing)."""
    rng = random.Random(3)
    exact = [rng.expovariate(0.5) for _ in range(256)]
    cache = [e + 0.05 for e in exact]
    ci = delta_ppl_interval(cache, exact, block=32, resamples=200)
    assert ci.estimate == pytest.approx(100 * math.expm1(0.05))
    assert ci.high - ci.low == pytest.approx(0.0, abs=1e-9)
    noisy = [e + 0.05 + rng.gauss(0, 0.3) for e in exact]
    ci = delta_ppl_interval(noisy, exact, block=32, resamples=500)
    assert ci.low < 100 * math.expm1(0.05) < ci.high
    assert ci.low > 0  # 256 tokens at sd 0.3 resolve a 0.05-nat shift


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="block"):
        mean_interval([1.0, 2.0], block=0)
    with pytest.raises(ValueError, match="no values"):
        mean_interval([], block=4)
    with pytest.raises(ValueError, match="resamples"):
        mean_interval([1.0, 2.0], block=1, resamples=3)
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], block=1, level=1.5)
    with pytest.raises(ValueError, match="differ in length"):
        paired_interval([[1.0], [1.0, 2.0]], lambda m: m[0], block=1)
    assert Interval(1.0, 0.5, 1.5).contains(1.2)
