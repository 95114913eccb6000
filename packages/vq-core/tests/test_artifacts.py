"""The artifact format: round trip, mismatch and corruption errors, atomic writes."""

import json
import os
import time

import mlx.core as mx
import numpy as np
import pytest

from vq_core import ArtifactError, ArtifactStore, atomic_write
from vq_core import artifacts as artifact_mod
from vq_core import atomic as vq_atomic
from vq_core.artifacts import check_model

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
    s = ArtifactStore(tmp_path)
    assert s.save("spectral", _arrays(), _meta()) == tmp_path / "spectral.safetensors"
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
    s = ArtifactStore(tmp_path)
    s.save("spectral", _arrays(), _meta())
    with pytest.raises(ArtifactError, match=match):
        s.load("spectral", **kw)


def test_check_model(tmp_path):
    ArtifactStore(tmp_path).save("spectral", _arrays(), _meta())
    check_model(tmp_path, "spectral", FP)
    with pytest.raises(ArtifactError, match="head_dim: artifact 8 vs model 64"):
        check_model(tmp_path, "spectral", FP | {"head_dim": 64})


def test_missing_metadata_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="lacks"):
        ArtifactStore(tmp_path).save("x", _arrays(), {"method": "spectral"})


@pytest.mark.parametrize("where", ["data", "header"])
def test_flipped_byte_is_detected(tmp_path, where):
    s = ArtifactStore(tmp_path)
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
    s = ArtifactStore(tmp_path)
    s.save("spectral", _arrays(), _meta())
    raw = s.path("spectral").read_bytes()
    s.path("spectral").write_bytes(raw[:keep])
    with pytest.raises(ArtifactError, match="truncated"):
        s.load("spectral")


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        ArtifactStore(tmp_path).load("spectral")


def test_crash_before_rename_keeps_the_old_artifact(tmp_path, monkeypatch):
    s = ArtifactStore(tmp_path)
    s.save("spectral", _arrays(0), _meta())

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(vq_atomic.os, "replace", crash)
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
    s = ArtifactStore(tmp_path)
    data = artifact_mod.encode(_arrays(), _meta())
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
        atomic_write(s.path("spectral"), data)
    monkeypatch.undo()
    assert s.names() == []
    with pytest.raises(ArtifactError):
        s.load("spectral")


def _rewrite_header(path, edit):
    """Replace the safetensors header of ``path`` by ``edit(header)`` (JSON), data kept."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8 : 8 + n]))
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])


ENTRY = "layers.0.k.rotation"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h | {ENTRY: 5}, f"entry '{ENTRY}' is a int, not a tensor description"),
        (lambda h: h | {ENTRY: [1, 2]}, f"entry '{ENTRY}' is a list"),
        (
            lambda h: h | {ENTRY: {k: v for k, v in h[ENTRY].items() if k != "data_offsets"}},
            f"entry '{ENTRY}' lacks \\['data_offsets'\\]",
        ),
        (lambda h: h | {ENTRY: h[ENTRY] | {"dtype": "Q7"}}, "unknown dtype 'Q7'"),
        (lambda h: h | {ENTRY: h[ENTRY] | {"shape": "8x8"}}, "not a list of sizes"),
        (lambda h: h | {ENTRY: h[ENTRY] | {"data_offsets": [0]}}, "not \\[start, end\\]"),
        (lambda h: h | {ENTRY: h[ENTRY] | {"shape": [8, 9]}}, "not the size of F32 \\[8, 9\\]"),
        (lambda h: list(h), "its header is a list"),
        (lambda h: h | {"__metadata__": {"vq_format": 1}}, "__metadata__ is not a string table"),
    ],
)
def test_malformed_header_names_the_file_and_entry(tmp_path, edit, message):
    s = ArtifactStore(tmp_path)
    s.save("spectral", _arrays(), _meta())
    _rewrite_header(s.path("spectral"), edit)
    with pytest.raises(ArtifactError, match=message) as err:
        s.load("spectral")
    assert str(s.path("spectral")) in str(err.value)


def _count_verifications(monkeypatch):
    calls = []
    real = artifact_mod._verified
    monkeypatch.setattr(artifact_mod, "_verified", lambda p: calls.append(p) or real(p))
    return calls


def test_in_place_corruption_after_a_good_read_is_caught(tmp_path, monkeypatch):
    """Even with the mtime set back: the cache key holds the ctime, which utime cannot set."""
    monkeypatch.setattr(artifact_mod, "_RACY_NS", 0)  # cache even a file written just now
    calls = _count_verifications(monkeypatch)
    s = ArtifactStore(tmp_path)
    s.save("spectral", _arrays(), _meta())
    path = s.path("spectral")
    s.load("spectral")
    s.load("spectral")
    assert len(calls) == 1  # the second read came from the cache
    st = path.stat()
    time.sleep(0.01)
    with open(path, "r+b") as f:  # flip one data byte in place, same size
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        s.load("spectral")


def test_replaced_file_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_mod, "_RACY_NS", 0)
    s = ArtifactStore(tmp_path)
    s.save("spectral", _arrays(0), _meta())
    st = s.path("spectral").stat()
    s.load("spectral")
    s.save("spectral", _arrays(1), _meta())  # same size; a new inode
    os.utime(s.path("spectral"), ns=(st.st_atime_ns, st.st_mtime_ns))
    arrays, _ = s.load("spectral")
    assert np.array_equal(np.array(arrays[ENTRY]), _arrays(1)[ENTRY])


def test_a_file_changed_just_now_is_not_cached(tmp_path, monkeypatch):
    calls = _count_verifications(monkeypatch)
    s = ArtifactStore(tmp_path)
    s.save("spectral", _arrays(), _meta())
    s.load("spectral")
    s.load("spectral")
    assert len(calls) == 2


def test_written_files_load_in_mlx_and_float64_is_refused(tmp_path):
    path = ArtifactStore(tmp_path).save("spectral", _arrays(), _meta())
    arrays, header = mx.load(str(path), return_metadata=True)
    assert header["vq_format"] == "1" and json.loads(header["vq_meta"]) == _meta()
    assert np.array_equal(np.array(arrays["layers.0.k.idx"]), np.arange(12))
    with pytest.raises(ArtifactError, match="dtype float64"):
        ArtifactStore(tmp_path).save("x", {"a": np.zeros(3)}, _meta())


def test_the_checksum_is_the_files_and_changes_with_any_tensor(tmp_path):
    s = ArtifactStore(tmp_path)
    s.save("spectral", _arrays(0), _meta())
    first = artifact_mod.read_artifact(s.path("spectral")).checksum
    assert first == mx.load(str(s.path("spectral")), return_metadata=True)[1]["vq_checksum"]
    s.save("spectral", _arrays(1), _meta())
    assert artifact_mod.read_artifact(s.path("spectral")).checksum != first
