"""RateQuant's allocation meets its budget exactly and is optimal."""

import itertools

import numpy as np
import pytest

from vq_calibrate import allocate


def test_ratequant_allocation_is_exact_and_optimal():
    rng = np.random.default_rng(0)
    options = [1, 2, 3, 4]
    base = rng.uniform(0.1, 10, size=(6, 1))
    sens = base * np.array([[1.0, 0.3, 0.08, 0.02]])  # more bits, less KL; layers differ
    alloc = allocate(sens, options, 2.5)
    assert sum(alloc) == 15 and set(alloc) <= set(options)
    cost = sum(sens[i, options.index(b)] for i, b in enumerate(alloc))
    brute = min(
        sum(sens[i, options.index(b)] for i, b in enumerate(c))
        for c in itertools.product(options, repeat=6)
        if sum(c) == 15
    )
    assert cost == pytest.approx(brute)
    # beats (or equals) the uniform 2/3 split at the same budget
    uniform = sum(sens[i, options.index(2 if i % 2 else 3)] for i in range(6))
    assert cost <= uniform
    with pytest.raises(ValueError, match="not a whole number"):
        allocate(sens, options, 2.45)
