"""Slim-install check: one package's main entry point, in an environment holding only that
package, its declared dependencies and its test group.

``python tools/slim_install.py PKG`` (tools/test.sh runs it after syncing PKG alone) first
checks that no workspace package PKG does not declare (directly or through what it
declares) is importable, so the environment really is slim, then calls PKG's main entry
point and checks its result. Each check prints one line; any failure exits non-zero.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
from importlib.metadata import requires
from pathlib import Path

WORKSPACE = ("vq-core", "vq-kernels", "vq-algorithms", "vq-calibrate", "vq-mlxlm")


def declared(package: str) -> set[str]:
    """Workspace packages ``package`` needs, itself and transitively (extras left out)."""
    out, todo = set(), [package]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        for req in requires(name) or []:
            dep = re.split(r"[\s<>=;\[!~]", req, maxsplit=1)[0]
            if dep in WORKSPACE and "extra ==" not in req:
                todo.append(dep)
    return out


def check_slim(package: str) -> None:
    extra = [
        p
        for p in sorted(set(WORKSPACE) - declared(package))
        if importlib.util.find_spec(p.replace("-", "_")) is not None
    ]
    if extra:
        raise SystemExit(f"{package}: the environment also holds undeclared {extra}")
    print(f"{package}: holds only {sorted(declared(package))} of the workspace")


def vq_core() -> str:
    """Write and read back an artifact; pack and unpack codes; rotate and rotate back."""
    import mlx.core as mx

    from vq_core import RandomizedHadamard, pack, read_artifact, unpack
    from vq_core.artifacts import write

    codes = mx.arange(64, dtype=mx.uint32) % 8
    assert mx.array_equal(unpack(pack(codes, 3), 3, 64), codes).item()
    rot = RandomizedHadamard(64, seed=1)
    x = mx.random.normal((4, 64), key=mx.random.key(0))
    assert mx.allclose(rot.inverse(rot.apply(x)), x, atol=1e-5).item()
    fp = {"architecture": "slim", "layers": 1, "kv_heads": 1, "head_dim": 64}
    meta = {"method": "x", "version": 1, "fingerprint": fp, "text_sha256": "0" * 64}
    with tempfile.TemporaryDirectory() as d:
        art = read_artifact(write(Path(d) / "x.safetensors", {"a": x}, meta))
    assert mx.array_equal(art.arrays["a"], x).item() and art.meta == meta
    return "artifact round trip, 3-bit packing, Hadamard rotation"


def vq_kernels() -> str:
    """Quantize against a codebook and reconstruct, on the backend this machine has."""
    import mlx.core as mx

    from vq_kernels import available_backend, codebook_dequantize, codebook_quantize

    centroids = mx.array([-1.5, -0.5, 0.5, 1.5])
    y = mx.random.normal((8, 64), key=mx.random.key(0))
    packed, norm = codebook_quantize(y, centroids, 2)
    back = codebook_dequantize(packed, norm, centroids, 2, 64)
    assert back.shape == y.shape and mx.isfinite(back).all().item()
    return f"codebook quantize/dequantize on {available_backend()}"


def vq_algorithms() -> str:
    """A compressed cache of the default method: attention close to exact attention."""
    import mlx.core as mx

    import vq_algorithms  # noqa: F401
    from vq_core import attend, make_cache

    cache = make_cache("turboquant_mse", head_dim=64, bits=4)
    k = mx.random.normal((1, 2, 96, 64), key=mx.random.key(1))
    v = mx.random.normal((1, 2, 96, 64), key=mx.random.key(2))
    q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(3))
    keys, values = cache.update_and_fetch(k, v)
    out = attend(q, keys, values, scale=64**-0.5, mask=None)
    kk, vv = mx.repeat(k, 2, axis=1), mx.repeat(v, 2, axis=1)
    ref = mx.fast.scaled_dot_product_attention(q, kk, vv, scale=64**-0.5)
    cos = (out * ref).sum() / (mx.linalg.norm(out) * mx.linalg.norm(ref))
    assert cos.item() > 0.95, cos.item()
    return f"turboquant_mse@4 cache, attention cosine {cos.item():.3f} vs exact"


def vq_calibrate() -> str:
    """Train spectral on arrays and write its artifact (no model, no vq-algorithms)."""
    import numpy as np

    from vq_calibrate import Capture, train
    from vq_core import read_artifact

    fp = {"architecture": "slim", "layers": 1, "kv_heads": 2, "head_dim": 32}
    cap = Capture(fp, text_sha256="0" * 64)
    x = np.random.default_rng(0).standard_normal((1, 2, 256, 32)).astype(np.float32)
    cap.record(0, "k", x, cap=1024, seed=0)
    cap.record(0, "v", x, cap=1024, seed=0)
    with tempfile.TemporaryDirectory() as d:
        art = read_artifact(train("spectral", cap, 2, d, version=1))
        assert art.meta["fingerprint"] == fp
        assert art.layer(0, "k")["rotation"].shape == (32, 32)
    return "spectral trained from arrays, artifact written and verified"


def vq_mlxlm() -> str:
    """``vq estimate`` on the embedded default model (read from its GGUF metadata)."""
    import contextlib
    import io

    from vq_mlxlm.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["estimate", "--context", "4096", "--json"]) == 0
    report = json.loads(out.getvalue())
    return f"vq estimate --json: {len(json.dumps(report))} bytes of report"


if __name__ == "__main__":
    package = sys.argv[1] if len(sys.argv) == 2 else ""
    if package not in WORKSPACE:
        raise SystemExit(f"usage: slim_install.py {{{','.join(WORKSPACE)}}}")
    if package == "vq-mlxlm":
        from vq_mlxlm.fast_blas import enable_fast_blas

        enable_fast_blas()
    check_slim(package)
    print(f"{package}: {globals()[package.replace('-', '_')]()}")
