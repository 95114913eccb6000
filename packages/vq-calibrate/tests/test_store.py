"""The artifact store: round trip, mismatch and corruption errors, atomic writes."""

import os

import mlx.core as mx
import numpy as np
import pytest

from vq_calibrate import SafetensorsStore, check_model
from vq_calibrate import store as store_mod
from vq_core import ArtifactError, ArtifactStore

FP = {"architecture": "llama", "layers": 2, "kv_heads": 3, "head_dim": 8}


def _meta(**kw):
    return {"method": "spectral", "version": 1, "fingerprint": dict(FP), "text_sha256": "ab"} | kw


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layers.0.k.rotation": rng.standard_normal((8, 8)).astype(np.float32),
        "layers.0.k.idx": np.arange(12, dtype=np.uint8),
    }


def test_round_trip(tmp_path):
    s = SafetensorsStore(tmp_path)
    assert isinstance(s, ArtifactStore)
    s.save("spectral", _arrays(), _meta())
    arrays, meta = s.load("spectral", method="spectral", version=1, fingerprint=FP)
    assert meta == _meta()
    for k, v in _arrays().items():
        assert np.array_equal(np.array(arrays[k]), v)
        assert arrays[k].dtype == (mx.float32 if v.dtype == np.float32 else mx.uint8)
    assert s.names() == ["spectral"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "vecinfer"}, "method 'spectral', not 'vecinfer'"),
        ({"version": 2}, "version 1; this install reads version 2"),
        ({"fingerprint": FP | {"layers": 30}}, r"layers: artifact 2 vs model 30"),
        ({"fingerprint": FP | {"architecture": "qwen2"}}, "another model"),
    ],
)
def test_mismatch_is_a_clear_error(tmp_path, kw, match):
    s = SafetensorsStore(tmp_path)
    s.save("spectral", _arrays(), _meta())
    with pytest.raises(ArtifactError, match=match):
        s.load("spectral", **kw)


def test_check_model(tmp_path):
    SafetensorsStore(tmp_path).save("spectral", _arrays(), _meta())
    check_model(tmp_path, "spectral", FP)
    with pytest.raises(ArtifactError, match="head_dim: artifact 8 vs model 64"):
        check_model(tmp_path, "spectral", FP | {"head_dim": 64})


def test_missing_metadata_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="lacks"):
        SafetensorsStore(tmp_path).save("x", _arrays(), {"method": "spectral"})


@pytest.mark.parametrize("where", ["data", "header"])
def test_flipped_byte_is_detected(tmp_path, where):
    s = SafetensorsStore(tmp_path)
    s.save("spectral", _arrays(), _meta())
    raw = bytearray(s.path("spectral").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    pos = len(raw) - 5 if where == "data" else 8 + raw[8 : 8 + n].index(b"text_sha256") + 2
    raw[pos] ^= 0x01
    s.path("spectral").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="corrupt"):
        s.load("spectral")


@pytest.mark.parametrize("keep", [0, 5, 40, -3])
def test_truncated_file_is_detected(tmp_path, keep):
    s = SafetensorsStore(tmp_path)
    s.save("spectral", _arrays(), _meta())
    raw = s.path("spectral").read_bytes()
    s.path("spectral").write_bytes(raw[:keep])
    with pytest.raises(ArtifactError, match="truncated"):
        s.load("spectral")


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        SafetensorsStore(tmp_path).load("spectral")


def test_crash_before_rename_keeps_the_old_artifact(tmp_path, monkeypatch):
    s = SafetensorsStore(tmp_path)
    s.save("spectral", _arrays(0), _meta())

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(store_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        s.save("spectral", _arrays(1), _meta())
    monkeypatch.undo()
    arrays, _ = s.load("spectral")
    assert np.array_equal(
        np.array(arrays["layers.0.k.rotation"]), _arrays(0)["layers.0.k.rotation"]
    )
    assert os.listdir(tmp_path) == ["spectral.safetensors"]


def test_crash_mid_write_leaves_nothing_loadable(tmp_path, monkeypatch):
    """A write killed halfway (no earlier artifact): the name does not load at all."""
    s = SafetensorsStore(tmp_path)
    data = store_mod.encode_artifact(_arrays(), _meta())
    real_open = open

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(b[: len(b) // 2])
            raise KeyboardInterrupt("killed mid-write")

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda p, m="r": HalfFile(real_open(p, m)))
    with pytest.raises(KeyboardInterrupt):
        store_mod.atomic_write(s.path("spectral"), data)
    monkeypatch.undo()
    assert s.names() == []
    with pytest.raises(ArtifactError):
        s.load("spectral")
