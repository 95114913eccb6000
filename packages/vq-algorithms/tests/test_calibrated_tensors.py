"""Calibrated quantizers take tensors; loading from a file records the artifact's checksum,
and a cache state saved with one artifact is refused against a different one."""

import mlx.core as mx
import pytest

from vq_algorithms.spectral import Spectral, SpectralConfig
from vq_core import (
    ArtifactError,
    CacheStateError,
    CompressedKVCache,
    ConfigError,
    RandomOrthogonal,
    create,
    read_artifact,
)
from vq_core.artifacts import write

D = 16


def _write(path, seed):
    arrays = {}
    for kind in ("k", "v"):
        arrays[f"layers.0.{kind}.rotation"] = RandomOrthogonal(D, seed).matrix
        arrays[f"layers.0.{kind}.eigenvalues"] = mx.array([0.7**j for j in range(D)])
        arrays[f"layers.0.{kind}.mean"] = mx.zeros((D,))
    fp = {"architecture": "synthetic", "layers": 1, "kv_heads": 1, "head_dim": D}
    meta = {"method": "spectral", "version": 1, "fingerprint": fp, "text_sha256": "0" * 64}
    return write(path, arrays, meta)


def _cache(path):
    k = create("spectral", head_dim=D, bits=2, artifact=str(path), layer=0, kind="k")
    v = create("spectral", head_dim=D, bits=2, artifact=str(path), layer=0, kind="v")
    cache = CompressedKVCache(k, v, block=1)
    x = mx.random.normal((1, 1, 40, D), key=mx.random.key(0))
    cache.update_and_fetch(x, x)
    return cache


def test_loading_records_the_checksum_and_the_constructor_takes_tensors(tmp_path):
    path = _write(tmp_path / "spectral.safetensors", seed=1)
    q = create("spectral", head_dim=D, bits=2, artifact=str(path), layer=0, kind="v")
    art = read_artifact(path)
    assert q.config.artifact_checksum == art.checksum
    direct = Spectral(SpectralConfig(head_dim=D, bits=2), tensors=art.layer(0, "v"))
    x = mx.random.normal((5, D), key=mx.random.key(1))
    assert mx.array_equal(q.decode(q.encode(x)), direct.decode(direct.encode(x))).item()
    with pytest.raises(ConfigError, match="takes the artifact's tensors"):
        Spectral(SpectralConfig(head_dim=D, bits=2, artifact=str(path)))
    with pytest.raises(ArtifactError, match="lack \\['mean'\\]"):
        Spectral(SpectralConfig(head_dim=D, bits=2), tensors={"rotation": 0, "eigenvalues": 0})


def test_a_saved_state_is_refused_against_a_replaced_artifact(tmp_path):
    path = _write(tmp_path / "spectral.safetensors", seed=1)
    cache = _cache(path)
    state = cache.state
    again = CompressedKVCache.from_state(state)  # same artifact: loads
    assert again.meta_state == cache.meta_state and again.offset == cache.offset == 40
    assert again.key_quantizer.config.artifact_checksum == read_artifact(path).checksum
    _write(path, seed=2)  # recalibrated: a valid artifact with other tensors
    with pytest.raises(CacheStateError, match="not the one these codes were made with"):
        CompressedKVCache.from_state(state)
    with pytest.raises(ArtifactError, match="not the one these codes were made with"):
        create("spectral", head_dim=D, bits=2, artifact=str(path), artifact_checksum="0" * 64)
