"""PCA from streaming moments or from samples: the one SVD helper of vq.

:class:`Moments` accumulates ``n``, ``Σx``, ``Σxxᵀ`` and ``max|x|`` per channel in float64
over any number of batches (so covariance needs no stored vectors); :func:`pca` turns a
covariance into eigenvalues (descending) and eigenvectors (columns, sign-fixed so the
largest-magnitude entry of each is positive, for reproducible artifacts).
"""

from __future__ import annotations

import numpy as np


class Moments:
    """Streaming first and second moments of vectors ``[..., d]``."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))
        self.max_abs = np.zeros(dim)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.sum.shape[0])
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x
        self.max_abs = np.maximum(self.max_abs, np.abs(x).max(axis=0, initial=0.0))

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    @property
    def covariance(self) -> np.ndarray:
        """Population covariance ``E[xxᵀ] - μμᵀ``."""
        mu = self.mean
        return self.outer / max(self.n, 1) - np.outer(mu, mu)


def pca(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric covariance ``[d, d]``.

    Returns ``(eigenvalues [d] descending, clipped at 0; vectors [d, d], column j the j-th
    principal direction)`` so ``y = (x - μ) @ vectors`` has ``Var(y_j) = eigenvalues[j]``.
    """
    cov = 0.5 * (cov + cov.T)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.maximum(vals[order], 0.0), vecs[:, order]
    flip = np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])])
    return vals, vecs * np.where(flip == 0, 1.0, flip)


def pca_samples(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of samples ``x [n, d]`` by SVD: ``(mean, eigenvalues, vectors)``."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    vals, vecs = pca(vt.T @ np.diag(s**2 / len(x)) @ vt)
    return mu, vals, vecs
