"""RateQuant: per-layer bit allocation from measured sensitivity, for any per-layer method.

Sensitivity ``S[i, b]`` (probed on a model by ``vq_mlxlm.calibration.probe``) is the mean
KL divergence of the next-token distributions when only layer ``i`` is compressed at ``b``
bits.

Allocation: choose ``b_i`` from ``bits_options`` minimizing ``Σ_i S[i, b_i]`` subject to
``Σ_i b_i = budget · L`` exactly (a multiple-choice knapsack, solved by dynamic programming;
the budget must make ``budget · L`` an integer). The result is a plain list for
``patch(model, method, bits=[...])``; the artifact ``ratequant.safetensors`` stores it with
the sensitivity table.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vq_core.artifacts import artifact_path, read_artifact

VERSION = 1


def allocate(sensitivity: np.ndarray, bits_options: list[int], budget: float) -> list[int]:
    """Per-layer bits (from ``bits_options``) with mean exactly ``budget``, least total
    sensitivity. ``sensitivity [L, len(bits_options)]``."""
    sens = np.asarray(sensitivity, dtype=np.float64)
    n_layers = sens.shape[0]
    total = budget * n_layers
    if abs(total - round(total)) > 1e-9:
        raise ValueError(f"budget {budget} x {n_layers} layers = {total} is not a whole number")
    total = round(total)
    lo, hi = min(bits_options) * n_layers, max(bits_options) * n_layers
    if not lo <= total <= hi:
        raise ValueError(f"budget {budget} is outside the options {sorted(bits_options)}")
    inf = math.inf
    # best[t] = least cost of the layers so far using t bits; choice[i][t] = option index.
    best = {0: 0.0}
    choice: list[dict[int, tuple[int, int]]] = []
    for i in range(n_layers):
        nxt: dict[int, float] = {}
        ch: dict[int, tuple[int, int]] = {}
        for t, cost in best.items():
            for j, b in enumerate(bits_options):
                c = cost + sens[i, j]
                if c < nxt.get(t + b, inf):
                    nxt[t + b], ch[t + b] = c, (t, j)
        best = nxt
        choice.append(ch)
    if total not in best:
        raise ValueError(f"no allocation from {sorted(bits_options)} sums to {total} bits")
    out, t = [], total
    for i in reversed(range(n_layers)):
        t, j = choice[i][t]
        out.append(bits_options[j])
    return out[::-1]


def default_options(budget: float, allowed: tuple[int, ...]) -> list[int]:
    """Widths of the base method within one bit of the budget's floor and ceiling."""
    return [b for b in allowed if math.floor(budget) - 1 <= b <= math.ceil(budget) + 1]


def load_allocation(artifact: str, fingerprint: dict[str, Any] | None = None) -> list[int]:
    """The per-layer bits saved by ``vq calibrate --method ratequant``."""
    art = read_artifact(artifact_path(artifact, "ratequant"))
    art.check(method="ratequant", version=VERSION, fingerprint=fingerprint)
    return [int(b) for b in art.arrays["allocation"].tolist()]
