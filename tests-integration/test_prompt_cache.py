"""vq_mlxlm.save_prompt_cache / load_prompt_cache: every corruption tried is refused by name.

Like the artifact tests: truncation at every section boundary, bit flips in the data
section, swapped arrays, edited metadata, a layer fewer, another config, another model,
and a save killed with SIGKILL that must leave the previous file whole.
"""

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import load_prompt_cache as mlx_load
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import build

from vq_core import CacheStateError
from vq_mlxlm import load_prompt_cache, patch, save_prompt_cache

TOKENS = (mx.arange(100)[None] * 37) % 97  # enough tokens that codes are written
NEXT = mx.array([[7]])


def _model(method="turboquant_mse", bits=4, arch="llama"):
    return patch(build(arch), method, bits)


def _saved(tmp_path, model, name="c.safetensors"):
    cache = make_prompt_cache(model)
    model(TOKENS, cache=cache)
    path = tmp_path / name
    save_prompt_cache(path, cache, model=model, metadata={"note": "x"})
    return path, cache


def _table(path: Path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__")
    return raw, n, header


def _refused(path, model, match=None, **kw):
    with pytest.raises(CacheStateError) as e:
        load_prompt_cache(path, model=model, **kw)
    assert str(path) in str(e.value)
    if match:
        assert match in str(e.value), str(e.value)
    return str(e.value)


def test_round_trip_continues_identically_and_mlx_lm_reads_it(tmp_path):
    model = _model()
    path, cache = _saved(tmp_path, model)
    loaded, meta = load_prompt_cache(path, model=model, return_metadata=True)
    assert meta == {"note": "x"}
    ref = model(NEXT, cache=cache)
    assert mx.array_equal(model(NEXT, cache=loaded), ref).item()
    assert mx.array_equal(model(NEXT, cache=mlx_load(str(path))), ref).item()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_truncation_at_every_section_boundary_names_the_file(tmp_path):
    model = _model()
    path, _ = _saved(tmp_path, model)
    raw, n, header = _table(path)
    cuts = {*range(8), 8 + n // 2, 8 + n}
    for e in header.values():
        begin, end = e["data_offsets"]
        cuts |= {8 + n + begin + 1, 8 + n + end - 1}
    cut_file = tmp_path / "cut.safetensors"
    for cut in sorted(cuts):
        cut_file.write_bytes(raw[:cut])
        message = _refused(cut_file, model)
        assert "truncated" in message or "unreadable" in message, (cut, message)


def test_every_bit_flip_in_the_data_section_is_refused_or_changes_nothing(tmp_path):
    model = _model()
    path, _ = _saved(tmp_path, model)
    raw, n, header = _table(path)
    data = len(raw) - 8 - n
    covered = set()
    for e in header.values():
        covered |= set(range(*e["data_offsets"]))
    rng = random.Random(0)
    positions = {rng.randrange(data * 8) for _ in range(150)}
    for e in header.values():  # first and last bit of every tensor
        begin, end = e["data_offsets"]
        positions |= {begin * 8, end * 8 - 1}
    flipped = tmp_path / "flip.safetensors"
    ref = _layer_states(load_prompt_cache(path, model=model))
    for bit in sorted(positions):
        bad = bytearray(raw)
        bad[8 + n + bit // 8] ^= 1 << (bit % 8)
        flipped.write_bytes(bytes(bad))
        if bit // 8 in covered:
            _refused(flipped, model, "layer")
        else:  # a byte no tensor reads: the loaded cache is the same
            assert _layer_states(load_prompt_cache(flipped, model=model)) == ref
    # mlx-lm's own loader refuses a flipped code word too (the state's own checksum)
    begin = next(e for k, e in header.items() if k.endswith("k__idx"))["data_offsets"][0]
    bad = bytearray(raw)
    bad[8 + n + begin] ^= 4
    flipped.write_bytes(bytes(bad))
    with pytest.raises(CacheStateError, match="k__idx"):
        mlx_load(str(flipped))


def _layer_states(cache):
    return [{k: v.tolist() if isinstance(v, mx.array) else v for k, v in c.state.items()}
            for c in cache]  # fmt: skip


def test_swapped_layer_arrays_of_equal_shape_are_refused(tmp_path):
    model = _model()
    path, _ = _saved(tmp_path, model)
    raw, n, header = _table(path)
    a, b = header["0.k__idx"]["data_offsets"], header["1.k__idx"]["data_offsets"]
    assert a[1] - a[0] == b[1] - b[0]
    bad = bytearray(raw)
    bad[8 + n + a[0] : 8 + n + a[1]], bad[8 + n + b[0] : 8 + n + b[1]] = (
        raw[8 + n + b[0] : 8 + n + b[1]],
        raw[8 + n + a[0] : 8 + n + a[1]],
    )
    path.write_bytes(bytes(bad))
    _refused(path, model, "layer 0: its arrays fail the checksum")


def test_edited_metadata_is_refused(tmp_path):
    model = _model()
    path, _ = _saved(tmp_path, model)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    edits = {"header config bits": (b'\\"bits\\": 4', b'\\"bits\\": 8')}
    edits["header method"] = (b"turboquant_mse", b"turboquant_rvq")
    for what, (old, new) in edits.items():
        assert old in header, what
        edited = header.replace(old, new, 1)
        path.write_bytes(raw[:8] + edited + raw[8 + n :])
        _refused(path, model, "metadata that fails its checksum")
    # the layer's own meta (key seed, bits, method) lives in the data section as code points
    path.write_bytes(raw)
    raw, n, table = _table(path)
    begin, end = table["1.meta"]["data_offsets"]
    text = "".join(chr(c) for c in memoryview(raw[8 + n + begin : 8 + n + end]).cast("i"))
    for old, new in (('"seed": 1000', '"seed": 1001'), ('"bits": 4', '"bits": 3'),
                     ("turboquant_mse", "turboquant_rvq")):  # fmt: skip
        assert old in text
        edited = text.replace(old, new, 1).encode("utf-32-le")
        assert len(edited) == end - begin
        bad = raw[: 8 + n + begin] + edited + raw[8 + n + end :]
        (tmp_path / "e.safetensors").write_bytes(bad)
        _refused(tmp_path / "e.safetensors", model, "layer 1")


def test_a_layer_fewer_another_config_or_another_model_is_refused(tmp_path):
    model = _model()
    cache = make_prompt_cache(model)
    model(TOKENS, cache=cache)
    short = tmp_path / "short.safetensors"
    save_prompt_cache(short, cache[:-1], model=model)
    _refused(short, model, "holds 1 layers; the model has 2")
    path, _ = _saved(tmp_path, model)
    affine = _model("affine", 8)  # same weights, another cache config
    message = _refused(path, affine, "layer 0: saved with key turboquant_mse@4")
    assert "affine@8" in message and "use_file_config" in message
    loaded = load_prompt_cache(path, model=affine, use_file_config=True)
    assert loaded[0].key_quantizer.method == "turboquant_mse"
    assert mx.array_equal(affine(NEXT, cache=loaded), model(NEXT, cache=cache)).item()
    window = patch(build("llama"), "turboquant_mse", 4, window=4)
    _refused(path, window, "layer 0: saved with window 0, the model is patched with 4")
    other = _model(arch="qwen3")  # head_dim 128
    _refused(path, other, "another model")


def test_not_a_vq_file_and_bad_paths(tmp_path):
    model = _model()
    from mlx_lm.models.cache import save_prompt_cache as mlx_save

    cache = make_prompt_cache(model)
    model(TOKENS, cache=cache)
    plain = tmp_path / "plain.safetensors"
    mlx_save(str(plain), cache)
    _refused(plain, model, "no vq_checksum")
    _refused(tmp_path / "missing.safetensors", model, "cannot be read")
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes((20).to_bytes(8, "little") + b"{not json" + b" " * 11)
    _refused(garbage, model, "unreadable header")


_SAVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from vq_mlxlm import patch, save_prompt_cache
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from tiny_models import build

    model = patch(build("llama"), "turboquant_mse", 4)
    caches = []
    for n in (800, 500):
        c = make_prompt_cache(model)
        model(mx.arange(n)[None] % 97, cache=c)
        mx.eval([layer.state for layer in c])
        caches.append(c)
    if len(sys.argv) > 3:  # pause inside the save, after writing, at its first fsync
        import os
        import time

        def paused_fsync(fd):
            print("mid-save", flush=True)
            time.sleep(60)

        os.fsync = paused_fsync
    print("ready", flush=True)
    i = 0
    while True:  # save and save again until killed
        save_prompt_cache(sys.argv[1], caches[i % 2], model=model)
        i += 1
    """
)


def test_a_save_killed_mid_write_leaves_the_previous_file_whole(tmp_path):
    model = _model()
    path, _ = _saved(tmp_path, model)
    here = str(Path(__file__).parent)
    rng = random.Random(1)
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path), here], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        before = path.stat().st_mtime_ns
        time.sleep(rng.uniform(0.1, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert path.stat().st_mtime_ns != before  # it was saving over the file
        cache = load_prompt_cache(path, model=model)  # whole: one of the versions saved
        assert cache[0].offset in (500, 800)
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert all(p.name.startswith(".c.") and p.name.endswith(".tmp.safetensors") for p in leftovers)


def test_a_save_killed_after_writing_before_the_rename_changes_nothing(tmp_path):
    """Killed at a known point inside the save (the temporary file written, not yet
    renamed): the target keeps its previous bytes exactly."""
    model = _model()
    path, _ = _saved(tmp_path, model)
    before = path.read_bytes()
    here = str(Path(__file__).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(path), here, "pause"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == "mid-save"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == before
    (tmp,) = [p for p in tmp_path.iterdir() if p != path]  # the half-done save, set aside
    assert tmp.stat().st_size > 0
    assert load_prompt_cache(path, model=model)[0].offset == TOKENS.shape[1]


def _spectral_artifact(directory, model, seed):
    """A valid spectral artifact for ``model`` (random rotations from ``seed``)."""
    from vq_core import RandomOrthogonal
    from vq_core.artifacts import write
    from vq_mlxlm.model_shape import model_fingerprint

    fp = model_fingerprint(model)
    d = fp["head_dim"]
    arrays = {}
    for layer in range(fp["layers"]):
        for side in ("k", "v"):
            prefix = f"layers.{layer}.{side}."
            arrays[prefix + "rotation"] = RandomOrthogonal(d, seed + layer).matrix
            arrays[prefix + "eigenvalues"] = mx.array([0.9**j for j in range(d)])
            arrays[prefix + "mean"] = mx.zeros((d,))
    meta = {"method": "spectral", "version": 1, "fingerprint": fp, "text_sha256": "0" * 64}
    write(Path(directory) / "spectral.safetensors", arrays, meta)


def test_a_calibrated_prompt_cache_is_refused_after_its_artifact_changes(tmp_path):
    """The saved cache records each layer's artifact checksum; a recalibrated artifact (valid,
    other tensors) would decode the saved codes wrongly, so loading refuses it."""
    art = tmp_path / "art"
    model = build("llama")
    _spectral_artifact(art, model, seed=1)
    patch(model, "spectral", 2, artifacts=str(art))
    path, _ = _saved(tmp_path, model)
    assert len(load_prompt_cache(path, model=model)) == len(model.layers)  # same artifact
    _spectral_artifact(art, model, seed=2)
    with pytest.raises(CacheStateError, match="not the one these codes were made with"):
        load_prompt_cache(path, model=model, use_file_config=True)
