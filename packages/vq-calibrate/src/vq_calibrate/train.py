"""Training of each calibrated method from a :class:`~vq_calibrate.capture.Capture`.

A trainer returns the artifact arrays, named ``layers.<i>.<k|v>.<field>`` as the method's
quantizer reads them (see :mod:`vq_algorithms.spectral`, :mod:`vq_algorithms.vecinfer`),
plus method-specific metadata.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from vq_calibrate.capture import Capture, progress_bar
from vq_calibrate.commutative_em import DEFAULT_EM, EMSettings, train_tables
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


def train_comm_vq(
    cap: Capture,
    bits: int,
    *,
    table_bits: int = 6,
    ropes: list | None = None,
    seed: int = 0,
    settings: EMSettings = DEFAULT_EM,
    progress: bool = False,
) -> tuple[dict, dict]:
    """EM-trained key tables ``[H, R, K, P, 2]`` per layer, from ``cap.head_samples``
    (pre-RoPE keys), plus each layer's RoPE geometry (``rope_perm``, ``rope_freqs``).
    Values are left to comm_vq's value partner (see :mod:`vq_algorithms.comm_vq`).

    One job per (layer, head), run on every CPU core (numpy releases the GIL).
    """
    from vq_algorithms._rope import RopeGeometry
    from vq_algorithms.comm_vq import CommVQConfig

    if not cap.head_samples:
        raise ValueError("comm_vq needs per-head samples: capture(..., head_samples=N)")
    d = cap.fingerprint["head_dim"]
    config = CommVQConfig(head_dim=d, bits=bits, table_bits=table_bits)
    jobs = []
    for (layer, kind), res in sorted(cap.head_samples.items()):
        if kind != "k":
            continue
        g = ropes[layer] if ropes is not None else RopeGeometry.identity(d)
        rows = res.sample.reshape(len(res.sample), -1, d)
        perm = np.array(g.perm)
        for h in range(rows.shape[1]):
            jobs.append((layer, kind, h, rows[:, h][:, perm]))

    def run(job):
        layer, _kind, h, x = job
        job_seed = seed + 1009 * layer + h
        return train_tables(x, config.stages, table_bits, seed=job_seed, settings=settings)

    results = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, out in enumerate(pool.map(run, jobs)):
            progress_bar("EM", i, len(jobs), progress)
            results.append(out)
    progress_bar("EM", len(jobs), len(jobs), progress)
    arrays: dict[str, Any] = {}
    errors: dict[str, list[float]] = {}
    for (layer, kind, _h, _x), (tables, errs) in zip(jobs, results, strict=True):
        arrays.setdefault(f"layers.{layer}.{kind}.tables", []).append(tables)
        errors.setdefault(f"{layer}.{kind}", []).append(errs[-1])
    arrays = {k: np.stack(v).astype(np.float32) for k, v in arrays.items()}
    for layer in sorted({layer for layer, *_ in jobs}):
        g = ropes[layer] if ropes is not None else RopeGeometry.identity(d)
        arrays[f"layers.{layer}.k.rope_perm"] = np.array(g.perm).astype(np.int32)
        arrays[f"layers.{layer}.k.rope_freqs"] = np.array(g.freqs).astype(np.float32)
    train_error = {k: float(np.mean(v)) for k, v in errors.items()}
    return arrays, {"bits": bits, "table_bits": table_bits, "train_error": train_error}


TRAINERS = {"spectral": train_spectral, "vecinfer": train_vecinfer, "comm_vq": train_comm_vq}
