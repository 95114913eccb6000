"""Each calibrated method, trained (vq-calibrate) on synthetic data with the structure it
exploits, beats its untrained neighbour (vq-algorithms) at the same bits per element."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vq_algorithms._rope import probe_rope
from vq_algorithms.comm_vq import CommVQConfig
from vq_algorithms.vecinfer import CODEBOOK_SIZE
from vq_calibrate import Capture, train_comm_vq, train_spectral, train_vecinfer
from vq_core import ArtifactError, ArtifactStore, ConfigError, create


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
    ArtifactStore(tmp_path).save(method, arrays, meta)
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
    arrays, extra = train_vecinfer(cap, bits, codebook_size=CODEBOOK_SIZE, iters=8)
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


def _keys(n, d, seed, rope):
    """Pre-RoPE keys with the structure real ones have (a mean, a decaying spectrum, an
    outlier pair), seen post-RoPE at random positions."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((d, d)))
    pre = (rng.standard_normal((n, d)) * 3.0 * 0.85 ** np.arange(d)) @ basis.T + 1.0
    pre[:, [1, d // 2 + 1]] *= 6.0
    return pre.astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2])
def test_trained_beats_untrained_and_turboquant_rvq_on_rope_keys(tmp_path, bits):
    d, heads = 32, 2
    rope = nn.RoPE(d, base=10000)
    geometry = probe_rope(rope, d)
    fp = {"architecture": "synthetic", "layers": 1, "kv_heads": heads, "head_dim": d}
    cap = Capture(fp, "0" * 64)
    train = np.stack([_keys(2048, d, 0, rope), _keys(2048, d, 1, rope)], axis=1)  # [n, H, D]
    cap.record_tokens(0, "k", train.transpose(1, 0, 2)[None], cap=2048, seed=0)
    stages = CommVQConfig(head_dim=d, bits=bits, table_bits=4).stages
    arrays, extra = train_comm_vq(cap, bits, stages=stages, table_bits=4, ropes=[geometry])
    meta = {"method": "comm_vq", "version": 1, "fingerprint": fp, "text_sha256": "0" * 64}
    ArtifactStore(tmp_path).save("comm_vq", arrays, meta | extra)
    art = str(tmp_path)
    trained = create("comm_vq", head_dim=d, bits=bits, table_bits=4, artifact=art, kind="k")
    assert trained.position_aware and trained.geometry.matches(geometry)
    untrained = create("comm_vq", head_dim=d, bits=bits, table_bits=4, untrained=True)
    # calibration-free neighbours, at more bits per element (their fp16 norms)
    neighbours = [create("turboquant_mse", head_dim=d, bits=bits)]
    if bits >= 2:
        neighbours.append(create("turboquant_rvq", head_dim=d, bits=bits))  # 1+1 passes
    held_out = np.stack([_keys(512, d, 10, rope), _keys(512, d, 11, rope)])[None]
    pre = mx.array(held_out)  # [1, H, L, D]
    start = 300
    post = rope(pre, offset=start)  # what the cache receives

    def err(q, x, **kw):
        xh = q.decode(q.encode(x, **kw), **kw)
        return (((xh - x) ** 2).sum() / (x**2).sum()).item()

    e_trained = err(trained, post, start=start)
    assert e_trained < 0.5 * err(untrained, post)
    for other in neighbours:
        assert trained.bits_per_element <= bits < other.bits_per_element
        assert e_trained < err(other, post)
    assert e_trained == pytest.approx(err(trained, post[..., :256, :], start=start), rel=0.3)
    with pytest.raises(ConfigError, match="tables have shape"):
        create("comm_vq", head_dim=d, bits=bits, table_bits=3, artifact=art, kind="k")
    with pytest.raises(ArtifactError, match="head_dim"):
        create("comm_vq", head_dim=64, bits=bits, artifact=art, kind="k")
    assert "layers.0.v.tables" not in arrays  # values go to turboquant_mse
