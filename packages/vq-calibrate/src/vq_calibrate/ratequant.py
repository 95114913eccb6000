"""RateQuant: per-layer bit allocation from measured sensitivity, for any per-layer method.

Probing (needs an mlx-lm model; imports vq_mlxlm lazily): for each layer ``i`` and width
``b``, only layer ``i`` gets a compressed cache (``method`` at ``b`` bits, keys and values),
every other layer stays exact, and the sensitivity ``S[i, b]`` is the mean KL divergence
KL(p_exact || p_quantized) of the next-token distributions over the evaluated positions.
The cache compresses history only, so each sequence is fed as a ``prefix`` (one chunk, then
compressed) followed by chunks of ``chunk`` tokens, and positions after the prefix count.

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

from vq_calibrate.capture import fresh_caches, progress_bar

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


def _kl(ref_logits, logits) -> float:
    import mlx.core as mx

    lp = ref_logits - mx.logsumexp(ref_logits, axis=-1, keepdims=True)
    lq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1).mean().item()


def chunked_logits(model, seq: list[int], caches: list, prefix: int, chunk: int):
    """Logits ``[len(seq) - prefix, V]`` for the positions after ``prefix`` (fp32)."""
    import mlx.core as mx

    model(mx.array([seq[:prefix]]), cache=caches)
    outs = []
    for s in range(prefix, len(seq), chunk):
        out = model(mx.array([seq[s : s + chunk]]), cache=caches)
        mx.eval(out)
        outs.append(out[0])
    return mx.concatenate(outs, axis=0).astype(mx.float32)


def probe(
    model,
    sequences: list[list[int]],
    method: str,
    bits_options: list[int],
    *,
    prefix: int = 256,
    chunk: int = 32,
    progress: bool = True,
    **options: Any,
) -> np.ndarray:
    """Sensitivity ``[L, len(bits_options)]``: mean KL with only layer ``i`` compressed."""
    import mlx.core as mx

    from vq_core import make_cache
    from vq_mlxlm.patch import _head_dim
    from vq_mlxlm.routing import route

    route()
    layers = list(model.layers)
    refs = []
    for seq in sequences:
        out = model(mx.array([seq]), cache=fresh_caches(model))[0, prefix:].astype(mx.float32)
        mx.eval(out)
        refs.append(out)
    sens = np.zeros((len(layers), len(bits_options)))
    steps, done = len(layers) * len(bits_options), 0
    for i, layer in enumerate(layers):
        for j, b in enumerate(bits_options):
            progress_bar("probe", done, steps, progress)
            kls = []
            for seq, ref in zip(sequences, refs, strict=True):
                caches = fresh_caches(model)
                if type(caches[i]).__name__ == "KVCache":
                    caches[i] = make_cache(method, head_dim=_head_dim(model, layer), bits=b,
                                           seed=1000 * i, **options)  # fmt: skip
                kls.append(_kl(ref, chunked_logits(model, seq, caches, prefix, chunk)))
            sens[i, j] = float(np.mean(kls))
            done += 1
    progress_bar("probe", steps, steps, progress)
    return sens


def default_options(budget: float, allowed: tuple[int, ...]) -> list[int]:
    """Widths of the base method within one bit of the budget's floor and ceiling."""
    return [b for b in allowed if math.floor(budget) - 1 <= b <= math.ceil(budget) + 1]


def load_allocation(artifact: str, fingerprint: dict[str, Any] | None = None) -> list[int]:
    """The per-layer bits saved by ``vq calibrate --method ratequant``."""
    from vq_algorithms._artifact import artifact_path, check_meta, read

    path = artifact_path(artifact, "ratequant")
    arrays, meta = read(path)
    check_meta(meta, path, method="ratequant", version=VERSION, fingerprint=fingerprint)
    return [int(b) for b in arrays["allocation"].tolist()]
