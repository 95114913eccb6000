"""Training of each calibrated method from a :class:`~vq_calibrate.capture.Capture`.

A trainer returns the artifact arrays, named ``layers.<i>.<k|v>.<field>`` as the method's
quantizer in vq-algorithms reads them (``vq_algorithms.spectral``, ``vecinfer``,
``comm_vq``), plus method-specific metadata. :func:`train` runs one and writes the artifact
(:mod:`vq_core.artifacts`). Nothing here runs a model or imports vq-algorithms: what a
trainer needs to know about its method (codebook size, stage count, RoPE pairing) is passed
in by the caller.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vq_calibrate.capture import Capture, progress_bar
from vq_calibrate.commutative_em import DEFAULT_EM, EMSettings, train_tables
from vq_calibrate.kmeans import product_kmeans
from vq_calibrate.pca import pca
from vq_core import ArtifactStore, RandomizedHadamard, invalid_choice


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
    return np.array(RandomizedHadamard(dim, seed=0).matrix, dtype=np.float64)


def train_vecinfer(
    cap: Capture,
    bits: int,
    *,
    codebook_size: int,
    iters: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict, dict]:
    """Smoothing ``[D]`` and k-means product codebooks ``[S, codebook_size, D/S]`` per
    layer/kind (``S = D / (8 / bits)``; VecInfer's ``CODEBOOK_SIZE`` is 256)."""
    arrays: dict[str, Any] = {}
    items = sorted(cap.moments.items())
    for n, ((layer, kind), m) in enumerate(items):
        progress_bar("k-means", n, len(items), progress)
        x = cap.samples[(layer, kind)].sample.astype(np.float64)
        d = x.shape[1]
        s = smoothing_factors(m.max_abs)
        z = (x / s) @ hadamard_matrix(d)
        books, _ = product_kmeans(z, d // (8 // bits), codebook_size, iters=iters, seed=seed)
        p = f"layers.{layer}.{kind}."
        arrays[p + "smooth"] = s.astype(np.float32)
        arrays[p + "centroids"] = books.astype(np.float32)
    progress_bar("k-means", len(items), len(items), progress)
    return arrays, {"bits": bits}


def train_comm_vq(
    cap: Capture,
    bits: int,
    *,
    stages: int,
    ropes: list,
    table_bits: int = 6,
    seed: int = 0,
    settings: EMSettings = DEFAULT_EM,
    progress: bool = False,
) -> tuple[dict, dict]:
    """EM-trained key tables ``[H, R, K, P, 2]`` per layer (``R = stages``, ``K =
    2**table_bits``), from ``cap.head_samples`` (pre-RoPE keys), plus each layer's RoPE
    geometry (``rope_perm``, ``rope_freqs``). ``ropes``: per layer an object with ``perm
    [D]`` and ``freqs [D/2]`` (``vq_algorithms._rope.RopeGeometry``); ``stages``: what
    ``CommVQConfig(head_dim, bits, table_bits).stages`` gives. Values are left to comm_vq's
    value partner.

    One job per (layer, head), run on every CPU core (numpy releases the GIL).
    """
    keys = {layer: res for (layer, kind), res in cap.head_samples.items() if kind == "k"}
    if not keys:
        raise ValueError("comm_vq needs per-head samples: capture(..., head_samples=N)")
    d = cap.fingerprint["head_dim"]
    geometry = {layer: ropes[layer] for layer in keys}
    jobs = []  # (layer, head, pre-RoPE keys in pair order [n, D])
    for layer in sorted(keys):
        rows = keys[layer].sample.reshape(len(keys[layer].sample), -1, d)
        perm = np.array(geometry[layer].perm)
        jobs += [(layer, h, rows[:, h][:, perm]) for h in range(rows.shape[1])]

    def run(job):
        layer, h, x = job
        job_seed = seed + 1009 * layer + h
        return train_tables(x, stages, table_bits, seed=job_seed, settings=settings)

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


def train(
    method: str,
    cap: Capture,
    bits: int,
    out: str | os.PathLike,
    *,
    version: int,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> Path:
    """Train ``method`` on ``cap`` and write ``<out>/<method>.safetensors``; its path.

    ``version``: the method's config version (what its quantizer checks on load);
    ``config``: quantizer options saved with the artifact (``patch()`` passes them on, e.g.
    comm_vq's ``table_bits``); ``options`` go to the trainer (see each ``train_*``). The
    metadata holds ``method``, ``version``, ``bits``, the capture's ``fingerprint`` and
    ``text_sha256``, and what the trainer adds.
    """
    invalid_choice("method", method, tuple(TRAINERS))
    arrays, extra = TRAINERS[method](cap, int(bits), progress=progress, **options)
    meta: dict[str, Any] = {"text_sha256": cap.text_sha256, "bits": bits}
    if config:
        meta["config"] = dict(config)
    meta |= extra | {"method": method, "version": version, "fingerprint": cap.fingerprint}
    return ArtifactStore(out).save(method, arrays, meta)
