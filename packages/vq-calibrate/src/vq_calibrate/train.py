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

    keys = {layer: res for (layer, kind), res in cap.head_samples.items() if kind == "k"}
    if not keys:
        raise ValueError("comm_vq needs per-head samples: capture(..., head_samples=N)")
    d = cap.fingerprint["head_dim"]
    config = CommVQConfig(head_dim=d, bits=bits, table_bits=table_bits)
    geometry = {
        layer: ropes[layer] if ropes is not None else RopeGeometry.identity(d) for layer in keys
    }
    jobs = []  # (layer, head, pre-RoPE keys in pair order [n, D])
    for layer in sorted(keys):
        rows = keys[layer].sample.reshape(len(keys[layer].sample), -1, d)
        perm = np.array(geometry[layer].perm)
        jobs += [(layer, h, rows[:, h][:, perm]) for h in range(rows.shape[1])]

    def run(job):
        layer, h, x = job
        job_seed = seed + 1009 * layer + h
        return train_tables(x, config.stages, table_bits, seed=job_seed, settings=settings)

    results = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, out in enumerate(pool.map(run, jobs)):
            progress_bar("EM", i, len(jobs), progress)
            results.append(out)
    progress_bar("EM", len(jobs), len(jobs), progress)
    tables: dict[int, list[np.ndarray]] = {}
    errors: dict[str, list[float]] = {}
    for (layer, _h, _x), (layer_tables, errs) in zip(jobs, results, strict=True):
        tables.setdefault(layer, []).append(layer_tables)
        errors.setdefault(f"{layer}.k", []).append(errs[-1])
    arrays: dict[str, Any] = {}
    for layer, per_head in tables.items():
        arrays[f"layers.{layer}.k.tables"] = np.stack(per_head).astype(np.float32)
        arrays[f"layers.{layer}.k.rope_perm"] = np.array(geometry[layer].perm).astype(np.int32)
        arrays[f"layers.{layer}.k.rope_freqs"] = np.array(geometry[layer].freqs).astype(np.float32)
    train_error = {k: float(np.mean(v)) for k, v in errors.items()}
    return arrays, {"bits": bits, "table_bits": table_bits, "train_error": train_error}


TRAINERS = {"spectral": train_spectral, "vecinfer": train_vecinfer, "comm_vq": train_comm_vq}
