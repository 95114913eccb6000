"""RateQuant's sensitivity probe: how much each layer's compression costs, measured.

For each layer ``i`` and width ``b``, only layer ``i`` gets a compressed cache (``method``
at ``b`` bits, keys and values; the cache :func:`vq_mlxlm.patch` would build), every other
layer stays exact, and ``S[i, b]`` is the mean KL divergence KL(p_exact || p_quantized) of
the next-token distributions over the evaluated positions. The cache compresses history
only, so each sequence is fed as a ``prefix`` (one chunk, then compressed) followed by
chunks of ``chunk`` tokens, and positions after the prefix count. The allocation itself is
:func:`vq_calibrate.allocate`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from vq_calibrate.capture import progress_bar
from vq_mlxlm.layer_caches import plan
from vq_mlxlm.model_shape import layer_head_dim, model_fingerprint, original_caches
from vq_mlxlm.routing import route


def _kl(ref_logits, logits) -> float:
    lp = ref_logits - mx.logsumexp(ref_logits, axis=-1, keepdims=True)
    lq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1).mean().item()


def chunked_logits(model, seq: list[int], caches: list, prefix: int, chunk: int):
    """Logits ``[len(seq) - prefix, V]`` for the positions after ``prefix`` (fp32)."""
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
) -> np.ndarray:
    """Sensitivity ``[L, len(bits_options)]``: mean KL with only layer ``i`` compressed."""
    route()
    layers = list(model.layers)
    fingerprint = model_fingerprint(model)
    refs = []
    for seq in sequences:
        out = model(mx.array([seq]), cache=original_caches(model))[0, prefix:]
        out = out.astype(mx.float32)
        mx.eval(out)
        refs.append(out)
    sens = np.zeros((len(layers), len(bits_options)))
    steps, done = len(layers) * len(bits_options), 0
    plans = [plan(fingerprint, method, b) for b in bits_options]  # patch()'s caches
    for i, layer in enumerate(layers):
        for j, resolved in enumerate(plans):
            progress_bar("probe", done, steps, progress)
            kls = []
            for seq, ref in zip(sequences, refs, strict=True):
                caches = original_caches(model)
                if type(caches[i]).__name__ == "KVCache":
                    caches[i] = resolved.layer_cache(i, layer_head_dim(model, layer))
                kls.append(_kl(ref, chunked_logits(model, seq, caches, prefix, chunk)))
            sens[i, j] = float(np.mean(kls))
            done += 1
    progress_bar("probe", steps, steps, progress)
    return sens
