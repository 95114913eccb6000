"""k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), batched and deterministic.

The one k-means of vq: every codebook (VecInfer's product-VQ sub-codebooks, any future
method) is trained here. Runs in numpy float64 on the CPU; distances are computed in batches
of ``batch`` rows so memory stays ``batch * k``.
"""

from __future__ import annotations

import numpy as np


def _sq_dist(x: np.ndarray, c: np.ndarray, c_sq: np.ndarray) -> np.ndarray:
    """Squared distances ``[n, k]`` (clipped at 0 against rounding)."""
    d = (x * x).sum(axis=1, keepdims=True) - 2.0 * (x @ c.T) + c_sq[None, :]
    return np.maximum(d, 0.0)


def assign(x: np.ndarray, centroids: np.ndarray, batch: int = 16384) -> tuple[np.ndarray, float]:
    """Nearest centroid of every row of ``x [n, d]`` and the total squared error."""
    c_sq = (centroids * centroids).sum(axis=1)
    labels = np.empty(len(x), dtype=np.int64)
    err = 0.0
    for i in range(0, len(x), batch):
        d = _sq_dist(x[i : i + batch], centroids, c_sq)
        labels[i : i + batch] = d.argmin(axis=1)
        err += float(d.min(axis=1).sum())
    return labels, err


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next center drawn with probability ∝ D(x)²."""
    n = len(x)
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    closest = ((x - centers[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: repeat points
            centers[j:] = x[rng.integers(n, size=k - j)]
            break
        centers[j] = x[rng.choice(n, p=closest / total)]
        closest = np.minimum(closest, ((x - centers[j]) ** 2).sum(axis=1))
    return centers


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    iters: int = 25,
    seed: int = 0,
    tol: float = 1e-6,
    batch: int = 16384,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's algorithm from k-means++ seeds.

    Args:
        x: ``[n, d]`` points.
        k: clusters (``n >= 1``; with ``n < k`` points repeat).
    Returns:
        ``(centroids [k, d] float64, labels [n], mse)`` where ``mse`` is the mean squared
        distance per point. Empty clusters are re-seeded at the worst-fitted points.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans needs points [n, d] with n >= 1, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    centers = kmeans_pp(x, k, rng)
    prev = np.inf
    for _ in range(iters):
        labels, err = assign(x, centers, batch)
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, x)
        empty = counts == 0
        centers[~empty] = sums[~empty] / counts[~empty, None]
        if empty.any():
            d = ((x - centers[labels]) ** 2).sum(axis=1)
            centers[empty] = x[np.argsort(d)[::-1][: int(empty.sum())]]
        if np.isfinite(prev) and prev - err <= tol * prev:
            break
        prev = err
    labels, err = assign(x, centers, batch)
    return centers, labels, err / len(x)


def product_kmeans(
    x: np.ndarray, subspaces: int, k: int, *, iters: int = 25, seed: int = 0
) -> tuple[np.ndarray, float]:
    """Product-VQ codebooks: ``x [n, D]`` split into ``subspaces`` equal parts, one k-means
    each (seed ``seed + s``). Returns ``(centroids [S, k, D/S], mse per point)``."""
    d = x.shape[1]
    if d % subspaces:
        raise ValueError(f"dimension {d} does not split into {subspaces} subspaces")
    sub = d // subspaces
    books, total = [], 0.0
    for s in range(subspaces):
        c, _, mse = kmeans(x[:, s * sub : (s + 1) * sub], k, iters=iters, seed=seed + s)
        books.append(c)
        total += mse
    return np.stack(books), total
