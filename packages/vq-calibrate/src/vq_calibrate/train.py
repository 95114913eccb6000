"""Training of each calibrated method from a :class:`~vq_calibrate.capture.Capture`.

A trainer returns the artifact arrays, named ``layers.<i>.<k|v>.<field>`` as the method's
quantizer reads them (see :mod:`vq_algorithms.spectral`, :mod:`vq_algorithms.vecinfer`),
plus method-specific metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vq_calibrate.capture import Capture, progress_bar
from vq_calibrate.kmeans import product_kmeans
from vq_calibrate.pca import pca


def train_spectral(cap: Capture, bits: int, progress: bool = False) -> tuple[dict, dict]:
    """PCA per layer and kind: ``rotation [D, D]``, ``eigenvalues [D]``, ``mean [D]``.

    The artifact serves every bit width: the quantizer water-fills its ``bits`` over the
    eigenvalues when it is built.
    """
    arrays: dict[str, Any] = {}
    for (layer, kind), m in sorted(cap.moments.items()):
        vals, vecs = pca(m.covariance)
        p = f"layers.{layer}.{kind}."
        arrays[p + "rotation"] = vecs.astype(np.float32)
        arrays[p + "eigenvalues"] = vals.astype(np.float32)
        arrays[p + "mean"] = m.mean.astype(np.float32)
    return arrays, {}


def smoothing_factors(max_abs: np.ndarray) -> np.ndarray:
    """``s_c = sqrt(max|x_c|)`` normalized to geometric mean 1 (zero channels get 1)."""
    s = np.sqrt(np.maximum(max_abs, 1e-8))
    return s / np.exp(np.log(s).mean())


def hadamard_matrix(dim: int) -> np.ndarray:
    """The fixed transform VecInfer uses (vq_core's RandomizedHadamard with seed 0)."""
    from vq_core import RandomizedHadamard

    return np.array(RandomizedHadamard(dim, seed=0).matrix, dtype=np.float64)


def train_vecinfer(
    cap: Capture, bits: int, *, iters: int = 20, seed: int = 0, progress: bool = False
) -> tuple[dict, dict]:
    """Smoothing ``[D]`` and k-means product codebooks ``[S, 256, D/S]`` per layer/kind."""
    from vq_algorithms.vecinfer import CODEBOOK_SIZE

    arrays: dict[str, Any] = {}
    items = sorted(cap.moments.items())
    for n, ((layer, kind), m) in enumerate(items):
        progress_bar("k-means", n, len(items), progress)
        x = cap.samples[(layer, kind)].sample.astype(np.float64)
        d = x.shape[1]
        s = smoothing_factors(m.max_abs)
        z = (x / s) @ hadamard_matrix(d)
        books, _ = product_kmeans(z, d // (8 // bits), CODEBOOK_SIZE, iters=iters, seed=seed)
        p = f"layers.{layer}.{kind}."
        arrays[p + "smooth"] = s.astype(np.float32)
        arrays[p + "centroids"] = books.astype(np.float32)
    progress_bar("k-means", len(items), len(items), progress)
    return arrays, {"bits": bits}


TRAINERS = {"spectral": train_spectral, "vecinfer": train_vecinfer}
