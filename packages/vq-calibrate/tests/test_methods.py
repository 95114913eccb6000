"""Each calibrated method, trained on synthetic data with the structure it exploits, beats its
untrained neighbour at the same bits per element; RateQuant meets its budget exactly."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from vq_calibrate import SafetensorsStore, allocate
from vq_calibrate.capture import Capture
from vq_calibrate.train import train_spectral, train_vecinfer
from vq_core import ArtifactError, ConfigError, create


def _capture(x: np.ndarray, kind_data=None) -> Capture:
    d = x.shape[-1]
    fp = {"architecture": "synthetic", "layers": 1, "kv_heads": 1, "head_dim": d}
    cap = Capture(fp, "0" * 64)
    for chunk in np.array_split(x, 4):
        cap.record(0, "k", chunk, cap=4096, seed=0)
        cap.record(0, "v", chunk, cap=4096, seed=0)
    return cap


def _save(tmp_path, method, cap, arrays, extra=None):
    meta = {"method": method, "version": 1, "fingerprint": cap.fingerprint}
    meta |= {"text_sha256": cap.text_sha256, **(extra or {})}
    SafetensorsStore(tmp_path).save(method, arrays, meta)
    return str(tmp_path)


def _rel_err(q, x):
    xh = q.decode(q.encode(x))
    return (((xh - x) ** 2).sum() / (x**2).sum()).item()


def _anisotropic(n, d, seed):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = 4.0 * 0.8 ** np.arange(d)  # a fast-decaying spectrum, as keys have
    return ((rng.standard_normal((n, d)) * scales) @ basis.T + 1.5).astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_spectral_beats_untrained_and_turboquant_on_anisotropic_keys(tmp_path, bits):
    d = 64
    cap = _capture(_anisotropic(8192, d, 0))
    art = _save(tmp_path, "spectral", cap, train_spectral(cap, bits)[0])
    trained = create("spectral", head_dim=d, bits=bits, artifact=art, layer=0, kind="k")
    untrained = create("spectral", head_dim=d, bits=bits, untrained=True)
    tq = create("turboquant_mse", head_dim=d, bits=bits)
    assert trained.bits_per_element == tq.bits_per_element == bits + 16 / d
    x = mx.array(_anisotropic(2048, d, 0)[:2048])  # same distribution (same basis)
    e_trained, e_tq = _rel_err(trained, x), _rel_err(tq, x)
    assert e_trained < 0.5 * e_tq
    assert e_trained < 0.5 * _rel_err(untrained, x)
    assert 0 < trained.signal_dims < d  # the noise part gets no bits at this spectrum
    # compressed-domain attention equals decode-then-matmul
    codes = trained.encode(x[:33].reshape(1, 1, 33, d))
    q = mx.random.normal((1, 1, 3, d), key=mx.random.key(1))
    ref = q @ trained.decode(codes).swapaxes(-1, -2)
    assert mx.allclose(trained.scores(q, codes), ref, rtol=1e-3, atol=1e-2).item()
    p = mx.softmax(mx.random.normal((1, 1, 3, 33)), axis=-1)
    assert mx.allclose(trained.weighted_sum(p, codes), p @ trained.decode(codes), atol=1e-3).item()


def _outliers_and_clusters(n, d, seed):
    rng = np.random.default_rng(seed)
    modes = np.random.default_rng(99).standard_normal((16, d)) * 2.0
    x = modes[rng.integers(16, size=n)] + 0.3 * rng.standard_normal((n, d))
    x[:, [3, 17]] *= 15.0  # outlier channels, as keys have
    return x.astype(np.float32)


def test_vecinfer_trained_beats_untrained(tmp_path):
    d, bits = 32, 2
    cap = _capture(_outliers_and_clusters(8192, d, 0))
    arrays, extra = train_vecinfer(cap, bits, iters=8)
    art = _save(tmp_path, "vecinfer", cap, arrays, extra)
    trained = create("vecinfer", head_dim=d, bits=bits, artifact=art, layer=0, kind="v")
    untrained = create("vecinfer", head_dim=d, bits=bits, untrained=True)
    x = mx.array(_outliers_and_clusters(2048, d, 1))
    assert trained.bits_per_element == untrained.bits_per_element == bits
    e_trained, e_untrained = _rel_err(trained, x), _rel_err(untrained, x)
    assert e_trained < 0.25 * e_untrained
    codes = trained.encode(x[:40].reshape(1, 1, 40, d))
    assert codes["idx"].dtype == mx.uint8 and codes["idx"].shape == (1, 1, 40, d // 4)
    q = mx.random.normal((1, 1, 2, d), key=mx.random.key(2))
    ref = q @ trained.decode(codes).swapaxes(-1, -2)
    assert mx.allclose(trained.scores(q, codes), ref, rtol=1e-3, atol=1e-2).item()
    with pytest.raises(ConfigError, match="calibrate with these bits"):
        create("vecinfer", head_dim=d, bits=4, artifact=art, layer=0, kind="k")


def test_artifact_errors_from_the_quantizer(tmp_path):
    cap = _capture(_anisotropic(512, 16, 0))
    art = _save(tmp_path, "spectral", cap, train_spectral(cap, 2)[0])
    with pytest.raises(ArtifactError, match="head_dim: artifact 16 vs model 32"):
        create("spectral", head_dim=32, bits=2, artifact=art)
    with pytest.raises(ArtifactError, match="layer=3 is out of range"):
        create("spectral", head_dim=16, bits=2, artifact=art, layer=3)
    with pytest.raises(ArtifactError, match="does not exist"):
        create("vecinfer", head_dim=16, bits=2, artifact=art)


def test_ratequant_allocation_is_exact_and_optimal():
    rng = np.random.default_rng(0)
    options = [1, 2, 3, 4]
    base = rng.uniform(0.1, 10, size=(6, 1))
    sens = base * np.array([[1.0, 0.3, 0.08, 0.02]])  # more bits, less KL; layers differ
    alloc = allocate(sens, options, 2.5)
    assert sum(alloc) == 15 and set(alloc) <= set(options)
    cost = sum(sens[i, options.index(b)] for i, b in enumerate(alloc))
    brute = min(
        sum(sens[i, options.index(b)] for i, b in enumerate(c))
        for c in itertools.product(options, repeat=6)
        if sum(c) == 15
    )
    assert cost == pytest.approx(brute)
    # beats (or equals) the uniform 2/3 split at the same budget
    uniform = sum(sens[i, options.index(2 if i % 2 else 3)] for i in range(6))
    assert cost <= uniform
    with pytest.raises(ValueError, match="not a whole number"):
        allocate(sens, options, 2.45)
