"""What calibration saw, as arrays: the input every trainer of :mod:`vq_calibrate.train`
takes.

:class:`Capture` is fed key and value batches (``[B, H_kv, L, D]`` numpy arrays, whatever
produced them; vq-mlxlm's ``vq_mlxlm.calibration.capture`` records them from a model). Per
layer and kind (``"k"``, ``"v"``) it keeps streaming moments
(:class:`~vq_calibrate.pca.Moments`, over all heads and tokens) and a bounded uniform sample
of vectors (reservoir sampling, Vitter's Algorithm R, deterministic from ``seed``) for
k-means. Methods with per-head key codebooks also get :meth:`Capture.record_tokens`: a
sample of whole tokens' keys, ``[n, H·D]`` per layer, so every head keeps its own rows.
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


def progress_bar(label: str, i: int, n: int, enabled: bool) -> None:
    if enabled:
        width = 30
        done = width * i // max(n, 1)
        sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {i}/{n}")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()
