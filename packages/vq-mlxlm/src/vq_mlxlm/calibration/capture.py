"""Capture per-layer keys and values from an mlx-lm model running calibration text.

Each layer's cache is wrapped in a :class:`RecordingCache` that forwards everything to the
real cache and records the ``keys``/``values`` passed to ``update_and_fetch``: exactly what a
compressed cache would receive (post-RoPE keys, ``[B, H_kv, L, D]``). They go into a
:class:`vq_calibrate.Capture` (moments and reservoir samples per layer and kind).

With ``head_samples`` it also keeps whole tokens' keys per layer; with ``ropes`` (one
:class:`~vq_algorithms._rope.RopeGeometry` per layer, from
:func:`vq_mlxlm.model_shape.model_ropes`) those keys are rotated back to their pre-RoPE
form, using each token's position (the cache offset).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from vq_calibrate import Capture
from vq_calibrate.capture import progress_bar
from vq_mlxlm.model_shape import model_fingerprint, original_caches


class RecordingCache:
    """Forwards the mlx-lm cache protocol to ``inner``; records ``update_and_fetch`` inputs."""

    def __init__(self, inner, layer: int, sink):
        self.__dict__.update(_inner=inner, _layer=layer, _sink=sink)

    def update_and_fetch(self, keys, values):
        self._sink(self._layer, keys, values, self._inner.offset)
        return self._inner.update_and_fetch(keys, values)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def capture(
    model,
    sequences: list[list[int]],
    *,
    text_sha256: str,
    max_samples: int = 16384,
    seed: int = 0,
    progress: bool = True,
    head_samples: int = 0,
    ropes: list | None = None,
) -> Capture:
    """Run ``model`` on token ``sequences`` (one forward pass each) and record every layer;
    ``head_samples`` > 0 also keeps that many whole tokens' keys per layer (pre-RoPE when
    ``ropes`` is given)."""
    state: dict[str, Any] = {}
    cap = Capture(model_fingerprint(model), text_sha256)

    def sink(layer, keys, values, offset):
        keys, values = keys.astype(mx.float32), values.astype(mx.float32)
        if head_samples:
            if ropes is not None:
                g = ropes[layer]
                keys_pre = g.from_pairs(g.rotate_pairs(g.to_pairs(keys), offset, inverse=True))
            else:
                keys_pre = keys
            state.setdefault("tokens", []).append((layer, "k", np.array(keys_pre)))
        for kind, x in (("k", keys), ("v", values)):
            state.setdefault("batch", []).append((layer, kind, np.array(x)))

    for i, seq in enumerate(sequences):
        progress_bar("capture", i, len(sequences), progress)
        caches = [RecordingCache(c, j, sink) for j, c in enumerate(original_caches(model))]
        mx.eval(model(mx.array([seq]), cache=caches))
        for layer, kind, arr in state.pop("batch"):
            cap.record(layer, kind, arr, max_samples, seed)
        for layer, kind, arr in state.pop("tokens", []):
            cap.record_tokens(layer, kind, arr, head_samples, seed)
    progress_bar("capture", len(sequences), len(sequences), progress)
    cap.tokens = [list(s) for s in sequences]
    return cap
