"""The one-launch decode (codebook and affine kernels with a tail) through a real cache, on the CPU.

vq-kernels' host emulator runs the CUDA kernel body; each decode step of a cache (sink,
centering, blocked encoding, ragged exact counts as blocks fill) must equal the same step
with the one-launch path switched off (the segment path: the CPU reference)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlx.core as mx
import pytest

import vq_algorithms  # noqa: F401  (registers the methods and their kernels)
import vq_kernels
from vq_core import CompressedKVCache, attend, create, make_cache
from vq_core import compressed_attention as table

EMULATOR = Path(__file__).parents[1] / "packages/vq-kernels/tests/kernel_emulator.py"


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("vq_kernel_emulator_it", EMULATOR)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    launched = mod.emulate(monkeypatch)
    monkeypatch.setattr(vq_kernels, "resolve_backend", lambda b=None, op=None: "cuda")
    mx.disable_compile()  # the emulator evaluates its inputs; a compiled trace cannot
    yield launched
    mx.enable_compile()


def _without(entries: dict, fn):
    """``fn()`` with one of vq_core's attention tables emptied (its reference path runs)."""
    saved = dict(entries)
    entries.clear()
    try:
        return fn()
    finally:
        entries.update(saved)


def _without_decode_table(fn):
    return _without(table._DECODE, fn)


@pytest.mark.parametrize(
    ("method", "bits", "options"),
    [("turboquant_mse", 4, {}), ("turboquant_mse", 2, {}), ("rabitq", 3, {}),
     ("qjl", 1, {"sketch_dim": 64}), ("turboquant_prod", 3, {}), ("turboquant_prod", 2, {}),
     ("turboquant_rvq", 4, {}), ("turboquant_rvq", 5, {})],
)  # fmt: skip
def test_decode_steps_match_the_segment_path(method, bits, options, emulated) -> None:
    hkv, g, d = 2, 4, 64
    cache = make_cache(method, head_dim=d, bits=bits, block=8, **options)
    ks = mx.random.split(mx.random.key(bits), 3)
    k = mx.random.normal((1, hkv, 60, d), key=ks[0]) + 0.5
    v = mx.random.normal((1, hkv, 60, d), key=ks[1])
    q = mx.random.normal((1, hkv * g, 1, d), key=ks[2])
    cache.update_and_fetch(k[:, :, :40], v[:, :, :40])  # prefill: reference path
    for t in range(40, 60):  # decode: exact counts 1..9 as blocks of 8 fill and encode
        kv, vv = cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
        fused = attend(q, kv, vv, scale=d**-0.5)
        ref = _without_decode_table(lambda kv=kv, vv=vv: attend(q, kv, vv, scale=d**-0.5))
        assert mx.allclose(fused, ref, atol=3e-4, rtol=3e-4).item(), (t, mx.abs(fused - ref).max())
    assert emulated and set(emulated) == {"codebook_attn"}


@pytest.mark.parametrize(
    ("keys", "values"),
    [({"method": "kivi", "bits": 4}, {"method": "affine", "bits": 4}),
     ({"method": "kivi", "bits": 2}, {"method": "kivi", "bits": 2, "axis": "token"}),
     ({"method": "kivi", "bits": 4, "group_size": 16}, {"method": "affine", "bits": 8}),
     ({"method": "affine", "bits": 4, "group_size": 32}, {"method": "kivi", "bits": 3,
                                                            "axis": "token"})],
)  # fmt: skip
def test_affine_kernel_decode_matches_the_segment_path(keys, values, emulated) -> None:
    """KIVI's per-channel keys (and affine/KIVI pairs) through a real cache: each decode
    step from vq-kernels' affine kernel (emulated), as one launch with the decode tail and
    as the compressed segment of the segment path, equals the reference, as blocks of 32
    tokens fill and encode."""
    hkv, g, d = 2, 4, 64
    cache = CompressedKVCache(
        create(**keys, head_dim=d), create(**values, head_dim=d, seed=1), block=32
    )
    ks = mx.random.split(mx.random.key(keys["bits"]), 3)
    k = mx.random.normal((1, hkv, 110, d), key=ks[0]) * mx.linspace(0.3, 2.0, d) + 0.5
    v = mx.random.normal((1, hkv, 110, d), key=ks[1])
    q = mx.random.normal((1, hkv * g, 1, d), key=ks[2])
    cache.update_and_fetch(k[:, :, :60], v[:, :, :60])  # prefill: reference path
    for t in range(60, 110):
        kv, vv = cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
        n = len(emulated)
        fused = attend(q, kv, vv, scale=d**-0.5)
        assert len(emulated) == n + 1  # one launch for the whole step

        def segments(kv=kv, vv=vv):
            return attend(q, kv, vv, scale=d**-0.5)

        seg = _without_decode_table(segments)
        ref = _without_decode_table(lambda: _without(table._TABLE, segments))
        for got in (fused, seg):
            assert mx.allclose(got, ref, atol=3e-4, rtol=3e-4).item(), (t, mx.abs(got - ref).max())
    assert emulated and set(emulated) == {"affine_attn"}


@pytest.mark.parametrize("values", ["turboquant_rvq", "turboquant_mse"])
def test_rvq_decode_matches_the_reference(values, emulated) -> None:
    """Two-pass TurboQuant-RVQ keys: one launch per value pass (the second weighted in
    through the log-sum-exps, centering shift included) equals the pure reference."""
    hkv, g, d = 2, 4, 64
    cache = make_cache("turboquant_rvq", head_dim=d, bits=4, block=8, value_method=values)
    ks = mx.random.split(mx.random.key(5), 3)
    k = mx.random.normal((1, hkv, 56, d), key=ks[0]) + 0.5
    v = mx.random.normal((1, hkv, 56, d), key=ks[1])
    q = mx.random.normal((1, hkv * g, 1, d), key=ks[2])
    cache.update_and_fetch(k[:, :, :40], v[:, :, :40])
    for t in range(40, 56):
        kv, vv = cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert kv.mean is not None  # the centering shift is exercised
        n = len(emulated)
        fused = attend(q, kv, vv, scale=d**-0.5)
        assert len(emulated) - n == (2 if values == "turboquant_rvq" else 1)

        def segments(kv=kv, vv=vv):
            return attend(q, kv, vv, scale=d**-0.5)

        ref = _without_decode_table(lambda: _without(table._TABLE, segments))
        assert mx.allclose(fused, ref, atol=1e-4, rtol=1e-4).item(), (t, mx.abs(fused - ref).max())
