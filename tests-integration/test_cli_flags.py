"""Every bad flag of every `vq` subcommand fails before the model loads: one line
``vq <cmd>: error: ...`` naming the flag, exit status 2, no traceback, in seconds."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from vq_core import ArtifactStore
from vq_mlxlm import default_model
from vq_mlxlm.cli import main

# The embedded default model: SmolLM2-135M (llama, 30 layers, 3 KV heads, head_dim 64).
DEFAULT_FP = {"architecture": "llama", "layers": 30, "kv_heads": 3, "head_dim": 64}
SECONDS = 15  # generous for a loaded 2-core box; a model load plus a run takes far longer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    garbage = root / "garbage.gguf"
    garbage.write_bytes(bytes(range(256)) * 8)
    (root / "notes.txt").write_text("not a model")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty").mkdir()
    # A 2-bit vecinfer artifact for the default model's shape (layer 0 is all a check reads).
    vec = root / "vecinfer2"
    rng = np.random.default_rng(0)
    arrays = {}
    for kind in ("k", "v"):
        arrays[f"layers.0.{kind}.smooth"] = np.ones(64, np.float32)
        arrays[f"layers.0.{kind}.centroids"] = rng.standard_normal((16, 256, 4), np.float32)
    meta = {"method": "vecinfer", "version": 1, "text_sha256": "0" * 64, "bits": 2}
    ArtifactStore(vec).save("vecinfer", arrays, meta | {"fingerprint": DEFAULT_FP})
    other = root / "other_model"
    ArtifactStore(other).save(
        "vecinfer", arrays, meta | {"fingerprint": DEFAULT_FP | {"kv_heads": 2}}
    )
    return root


CASES = [
    # (argv with {root} for the fixture folder, the flag the one line must name)
    ("generate --seed -1", "--seed"),
    ("generate --seed 4294967296", "--seed"),
    ("generate --method comm_vq", "--artifacts"),
    ("generate --method spectral --bits 2", "--artifacts"),
    ("generate --method vecinfer --bits 2", "--artifacts"),
    ("generate --value-method comm_vq", "--value-method"),
    ("generate --method nope", "--method"),
    ("generate --bits 9", "--bits"),
    ("generate --bits 2.5", "--bits"),
    ("generate --value-bits 7", "--value-bits"),
    ("generate --value-method nope", "--value-method"),
    ("generate --window -1", "--window"),
    ("generate --sink x", "--sink"),
    ("generate --max-tokens 0", "--max-tokens"),
    ("generate --prompt=", "--prompt"),
    ("generate --model {root}/garbage.gguf", "--model"),
    ("generate --model {root}/notes.txt", "--model"),
    ("generate --model {root}/empty", "--model"),
    ("generate --model /does/not/exist", "--model"),
    ("generate --artifacts /does/not/exist", "--artifacts"),
    ("generate --method vecinfer --bits 2 --artifacts {root}/empty", "--artifacts"),
    ("generate --method vecinfer --bits 4 --artifacts {root}/vecinfer2", "--artifacts"),
    ("generate --method vecinfer --bits 2 --artifacts {root}/other_model", "--artifacts"),
    ("generate --method vecinfer --bits 9 --artifacts {root}/vecinfer2", "--bits"),
    ("estimate --context 0", "--context"),
    ("estimate", "--context"),
    ("estimate --context 8 --model {root}/garbage.gguf", "--model"),
    ("methods --bogus", "--bogus"),
    ("calibrate --method spectral --seq-len 0 --out {root}/out", "--seq-len"),
    ("calibrate --method spectral --sequences -1 --out {root}/out", "--sequences"),
    ("calibrate --method spectral --seed -1 --out {root}/out", "--seed"),
    ("calibrate --method vecinfer --bits 3 --out {root}/out", "--bits"),
    ("calibrate --method vecinfer --bits 9 --out {root}/out", "--bits"),
    ("calibrate --method comm_vq --bits 2.5 --out {root}/out", "--bits"),
    ("calibrate --method comm_vq --table-bits 9 --out {root}/out", "--table-bits"),
    ("calibrate --method comm_vq --head-samples 0 --out {root}/out", "--head-samples"),
    ("calibrate --method ratequant --bits 9 --out {root}/out", "--bits"),
    ("calibrate --method ratequant --bits 2.01 --out {root}/out", "--bits"),
    ("calibrate --method ratequant --base-method nope --out {root}/out", "--base-method"),
    ("calibrate --method ratequant --base-method spectral --out {root}/out", "--base-method"),
    ("calibrate --method nope --out {root}/out", "--method"),
    ("calibrate --method spectral --out {root}/notes.txt", "--out"),
    ("calibrate --method spectral --text {root}/latin1.txt --out {root}/out", "--text"),
    ("calibrate --method spectral --text /does/not/exist --out {root}/out", "--text"),
    ("calibrate --method spectral --model {root}/garbage.gguf --out {root}/out", "--model"),
    ("eval --bits 9", "--bits"),
    ("eval --bits x", "--bits"),
    ("eval --methods nope", "--methods"),
    ("eval --methods turboquant_mse@2+window=-1", "--methods"),
    ("eval --methods turboquant_mse@2 --add bad", "--add"),
    ("eval --methods spectral@2", "--artifacts"),
    ("eval --methods vecinfer@4 --artifacts {root}/vecinfer2", "--methods"),
    ("eval --window -1", "--window"),
    ("eval --artifacts /does/not/exist", "--artifacts"),
    ("eval --json /does/not/exist/report.json", "--json"),
    ("eval --markdown {root}/empty", "--markdown"),
    ("eval --text /does/not/exist", "--text"),
    ("eval --model {root}/garbage.gguf", "--model"),
    ("eval --needle-depths 0", "--needle-depths"),
    ("eval --held-out --text {root}/garbage.gguf", "--held-out"),
]


@pytest.mark.parametrize(("argv", "flag"), CASES, ids=[c[0] for c in CASES])
def test_bad_flag_is_one_line_before_the_model_loads(argv, flag, files, capsys, monkeypatch):
    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(default_model, "load_model", no_load)
    args = argv.format(root=files).split(" ")
    t0 = time.perf_counter()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vq {args[0]}: error: ") or lines[0].startswith("vq: error: ")
    assert flag in lines[0], lines[0]
    assert elapsed < SECONDS


@pytest.mark.parametrize(
    "argv",
    ["generate --seed -1", "calibrate --method spectral --seq-len 0 --out x", "eval --bits 9"],
)
def test_command_line_exit_status_and_stderr(argv):
    """The same end to end: a fresh interpreter, exit status 2, one stderr line."""
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "vq_mlxlm.cli", *argv.split()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
