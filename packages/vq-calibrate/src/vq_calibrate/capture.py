"""Capture per-layer keys and values from an mlx-lm model running calibration text.

Each layer's cache is wrapped in a :class:`RecordingCache` that forwards everything to the
real cache and records the ``keys``/``values`` passed to ``update_and_fetch``: exactly what a
compressed cache would receive (post-RoPE keys, ``[B, H_kv, L, D]``). Per layer and kind
(``"k"``, ``"v"``) it keeps streaming moments (:class:`~vq_calibrate.pca.Moments`, over all
heads and tokens) and a bounded uniform sample of vectors (reservoir sampling, Vitter's
Algorithm R, deterministic from ``seed``) for k-means.

Methods with per-head key codebooks ask for ``head_samples``: a sample of whole tokens'
keys, ``[n, H·D]`` per layer, so every head keeps its own rows. With ``ropes`` (one
:class:`~vq_algorithms._rope.RopeGeometry` per layer, from
:func:`vq_mlxlm.model_shape.model_ropes`) those keys
are rotated back to their pre-RoPE form, using each token's position (the cache offset).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vq_calibrate.pca import Moments


class Reservoir:
    """A uniform sample of at most ``cap`` rows from a stream of ``[n, d]`` batches."""

    def __init__(self, cap: int, dim: int, seed: int):
        self.cap, self.seen = cap, 0
        self.rows = np.empty((cap, dim), dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        take = min(max(self.cap - self.seen, 0), len(x))
        self.rows[self.seen : self.seen + take] = x[:take]
        rest = x[take:]
        if len(rest):
            idx = np.arange(self.seen + take, self.seen + len(x))
            j = (self.rng.random(len(rest)) * (idx + 1)).astype(np.int64)
            keep = j < self.cap
            self.rows[j[keep]] = rest[keep]
        self.seen += len(x)

    @property
    def sample(self) -> np.ndarray:
        return self.rows[: min(self.seen, self.cap)]


@dataclass
class Capture:
    """What calibration saw: per ``(layer, kind)`` moments and samples, plus the model."""

    fingerprint: dict[str, Any]
    text_sha256: str
    moments: dict[tuple[int, str], Moments] = field(default_factory=dict)
    samples: dict[tuple[int, str], Reservoir] = field(default_factory=dict)
    head_samples: dict[tuple[int, str], Reservoir] = field(default_factory=dict)
    tokens: list[list[int]] = field(default_factory=list)

    def record(self, layer: int, kind: str, x: np.ndarray, cap: int, seed: int) -> None:
        x = x.reshape(-1, x.shape[-1])
        key = (layer, kind)
        if key not in self.moments:
            self.moments[key] = Moments(x.shape[-1])
            self.samples[key] = Reservoir(cap, x.shape[-1], seed + 2 * layer + (kind == "v"))
        self.moments[key].update(x)
        self.samples[key].update(x)

    def record_tokens(self, layer: int, kind: str, x: np.ndarray, cap: int, seed: int) -> None:
        """``x [B, H, L, D]`` as ``B·L`` token rows of ``H·D`` (heads side by side)."""
        b, h, n, d = x.shape
        rows = x.transpose(0, 2, 1, 3).reshape(b * n, h * d)
        key = (layer, kind)
        if key not in self.head_samples:
            self.head_samples[key] = Reservoir(cap, h * d, seed + 7919 + 2 * layer + (kind == "v"))
        self.head_samples[key].update(rows)


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


def fresh_caches(model) -> list:
    """mlx-lm's own caches for ``model`` (its unpatched ``make_cache`` if vq patched it)."""
    original = model.__dict__.get("_vq_original_make_cache", "unset")
    if original not in ("unset", None):
        return original()
    if original is None or not hasattr(model, "make_cache"):
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in model.layers]
    return model.make_cache()


def progress_bar(label: str, i: int, n: int, enabled: bool) -> None:
    if enabled:
        width = 30
        done = width * i // max(n, 1)
        sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {i}/{n}")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()


def model_fingerprint(model, head_dim: int, kv_heads: int) -> dict[str, Any]:
    args = getattr(model, "args", None)
    arch = getattr(model, "model_type", None) or getattr(args, "model_type", None)
    return {
        "architecture": str(arch),
        "layers": len(model.layers),
        "kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
    }


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
    import mlx.core as mx

    state: dict[str, Any] = {}
    cap: Capture | None = None

    def sink(layer, keys, values, offset):
        state["shape"] = keys.shape
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
        caches = [RecordingCache(c, j, sink) for j, c in enumerate(fresh_caches(model))]
        mx.eval(model(mx.array([seq]), cache=caches))
        if cap is None:
            _, kv_heads, _, head_dim = state["shape"]
            cap = Capture(model_fingerprint(model, head_dim, kv_heads), text_sha256)
        for layer, kind, arr in state.pop("batch"):
            cap.record(layer, kind, arr, max_samples, seed)
        for layer, kind, arr in state.pop("tokens", []):
            cap.record_tokens(layer, kind, arr, head_samples, seed)
    progress_bar("capture", len(sequences), len(sequences), progress)
    cap.tokens = [list(s) for s in sequences]
    return cap
