"""k-means and PCA on synthetic data with known answers."""

import numpy as np

from vq_calibrate.kmeans import kmeans, product_kmeans
from vq_calibrate.pca import Moments, pca, pca_samples


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((8, 5)) * 10
    x = np.concatenate([c + 0.1 * rng.standard_normal((200, 5)) for c in centers])
    found, labels, mse = kmeans(x, 8, seed=1)
    # every true center has a found centroid within 0.05; error is the noise variance
    d = np.linalg.norm(centers[:, None] - found[None], axis=-1).min(axis=1)
    assert d.max() < 0.05
    assert abs(mse - 5 * 0.01) < 0.005
    assert len(set(labels.tolist())) == 8


def test_kmeans_is_deterministic_and_beats_random_codebook():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 2))
    a, _, mse = kmeans(x, 16, seed=3)
    b, _, _ = kmeans(x, 16, seed=3)
    assert np.array_equal(a, b)
    rand = x[:16]
    rand_mse = ((x[:, None] - rand[None]) ** 2).sum(-1).min(1).mean()
    assert mse < 0.7 * rand_mse
    # 16 points in 2-D beat the 4 x 4 grid of 2-bit Lloyd-Max levels (2 x 0.1175 = 0.235)
    assert mse < 0.235


def test_product_kmeans_shapes():
    x = np.random.default_rng(2).standard_normal((1000, 8))
    books, mse = product_kmeans(x, 4, 16, seed=0)
    assert books.shape == (4, 16, 2)
    assert 0 < mse < 8


def test_streaming_moments_match_numpy_and_pca_finds_axes():
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    scales = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    x = (rng.standard_normal((20000, 6)) * scales) @ basis.T + 7.0
    m = Moments(6)
    for chunk in np.array_split(x, 7):
        m.update(chunk)
    assert np.allclose(m.mean, x.mean(0))
    assert np.allclose(m.covariance, np.cov(x.T, bias=True), atol=1e-8)
    assert np.allclose(m.max_abs, np.abs(x).max(0))
    vals, vecs = pca(m.covariance)
    assert np.allclose(vals, scales**2, rtol=0.05)
    assert np.allclose(np.abs(np.diag(vecs.T @ basis)), 1, atol=0.01)
    _, vals2, vecs2 = pca_samples(x)
    assert np.allclose(vals2, vals) and np.allclose(vecs2, vecs, atol=1e-6)
