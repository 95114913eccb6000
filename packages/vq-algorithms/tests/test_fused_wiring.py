"""The fused decode implementations registered in vq_core's table compute the same segment
as the reference (each family's own ``scores`` and ``weighted_sum``).

On the CPU the kernels' gate is forced open, so each implementation runs its whole wiring
(query rotation or sketch, codebooks, divisors, the inverse rotation, per-row lengths)
through vq-kernels' ops: on the "cpu" backend the codebook op's native CPU code, the other
ops their pure-MLX references; the GPU kernels themselves are checked against those
references in vq-kernels' emulator and GPU parity tests.
"""

import mlx.core as mx
import pytest

import vq_algorithms.affine
import vq_algorithms.qjl
import vq_algorithms.rabitq
import vq_algorithms.turboquant_mse
import vq_algorithms.turboquant_prod
import vq_algorithms.turboquant_rvq
import vq_algorithms.vecinfer
from vq_core import CompressedSide, create, registered_compressed_attention
from vq_core.compressed_attention import reference_segment

D, HKV, G, LBUF = 64, 2, 2, 40
# The methods whose segment runs vq-kernels' codebook op: native CPU code on the "cpu" backend.
CPU_NATIVE = {
    vq_algorithms.turboquant_mse, vq_algorithms.rabitq, vq_algorithms.qjl,
    vq_algorithms.turboquant_prod, vq_algorithms.turboquant_rvq,
}  # fmt: skip
PAIRS = [
    (vq_algorithms.turboquant_mse, ("turboquant_mse", {"bits": 3}), ("turboquant_mse", {})),
    (vq_algorithms.rabitq, ("rabitq", {"bits": 1}), ("turboquant_mse", {"bits": 4})),
    (vq_algorithms.rabitq, ("rabitq", {"bits": 3}), ("turboquant_mse", {"bits": 2})),
    (vq_algorithms.qjl, ("qjl", {}), ("turboquant_mse", {"bits": 4})),
    (vq_algorithms.turboquant_prod, ("turboquant_prod", {"bits": 3}), ("turboquant_mse", {})),
    (vq_algorithms.turboquant_rvq, ("turboquant_rvq", {"bits": 4}), ("turboquant_rvq", {"bits": 5})),
    (vq_algorithms.turboquant_rvq, ("turboquant_rvq", {"bits": 3}), ("turboquant_mse", {"bits": 2})),
    (vq_algorithms.affine, ("affine", {"bits": 4, "group_size": 32}), ("affine", {"bits": 4, "group_size": 32})),
    (vq_algorithms.vecinfer, ("vecinfer", {"bits": 2, "untrained": True}), ("vecinfer", {"bits": 2, "untrained": True})),
]  # fmt: skip


def _sides(key, value, lengths, lbuf=LBUF, n=LBUF - 3, d=D):
    ks = mx.random.split(mx.random.key(3), 3)
    k = mx.random.normal((3, HKV, lbuf, d), key=ks[0])
    v = mx.random.normal((3, HKV, lbuf, d), key=ks[1])
    kq = create(key[0], head_dim=d, seed=1, **key[1])
    vq = create(value[0], head_dim=d, seed=2, **value[1])
    q = mx.random.normal((3, HKV, G, d), key=ks[2])
    return (
        q,
        CompressedSide(kq, kq.encode(k), n, lengths),
        CompressedSide(vq, vq.encode(v), n, lengths),
    )


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize(("module", "key", "value"), PAIRS, ids=lambda p: str(p)[:30])
def test_fused_segment_equals_reference(module, key, value, ragged, monkeypatch) -> None:
    lengths = mx.array([0, 11, LBUF - 3], dtype=mx.int32) if ragged else None
    q, keys, values = _sides(key, value, lengths)
    impl = registered_compressed_attention()[(key[0], value[0])]
    monkeypatch.setenv("VQ_KERNELS_BACKEND", "reference")
    assert impl(q, keys, values, scale=0.125) is None  # no kernel applies
    monkeypatch.setenv("VQ_KERNELS_BACKEND", "cpu")  # only the codebook op has CPU code
    assert (impl(q, keys, values, scale=0.125) is not None) == (module in CPU_NATIVE)
    monkeypatch.setattr(module, "kernel_applies", lambda head_dim, rows, op: True)
    if ragged and key[0] == "vecinfer":  # the PQ kernel takes one length: it declines
        assert impl(q, keys, values, scale=0.125) is None
        return
    out, lse = impl(q, keys, values, scale=0.125)
    rout, rlse = reference_segment(q, keys, values, scale=0.125)
    assert out.shape == rout.shape and lse.shape == rlse.shape
    finite = mx.isfinite(rlse)
    assert mx.array_equal(finite, mx.isfinite(lse)).item()
    assert mx.allclose(mx.where(finite, lse, 0), mx.where(finite, rlse, 0), atol=1e-4).item()
    assert mx.allclose(out, rout, atol=1e-4).item()


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize(
    ("key", "value"),
    [(("kivi", {"bits": 2}), ("affine", {"bits": 4})),
     (("kivi", {"bits": 4, "group_size": 16}), ("kivi", {"bits": 3, "axis": "token"})),
     (("affine", {"bits": 4, "group_size": 32}), ("affine", {"bits": 8, "group_size": 64}))],
    ids=str,
)  # fmt: skip
def test_affine_kernel_pairs_equal_reference(key, value, ragged, monkeypatch) -> None:
    """KIVI keys (per channel: whole blocks of their group size) and affine/KIVI values of
    other widths through the affine kernel's wiring."""
    lengths = mx.array([0, 32, 64], dtype=mx.int32) if ragged else None
    q, keys, values = _sides(key, value, lengths, 64, 64)
    impl = registered_compressed_attention()[(key[0], value[0])]
    monkeypatch.setenv("VQ_KERNELS_BACKEND", "cpu")
    assert impl(q, keys, values, scale=0.125) is None  # the affine op has no CPU code
    monkeypatch.setattr(vq_algorithms.affine, "kernel_applies", lambda head_dim, rows, op: True)
    out, lse = impl(q, keys, values, scale=0.125)
    rout, rlse = reference_segment(q, keys, values, scale=0.125)
    finite = mx.isfinite(rlse)
    assert mx.array_equal(finite, mx.isfinite(lse)).item()
    assert mx.allclose(mx.where(finite, lse, 0), mx.where(finite, rlse, 0), atol=1e-4).item()
    assert mx.allclose(out, rout, atol=1e-4).item()


def test_binary_query_rabitq_and_channel_values_decline(monkeypatch) -> None:
    """The quantized-query estimator and KIVI's per-channel values keep the reference path."""
    monkeypatch.setattr(vq_algorithms.rabitq, "kernel_applies", lambda head_dim, rows, op: True)
    monkeypatch.setattr(vq_algorithms.affine, "kernel_applies", lambda head_dim, rows, op: True)
    table = registered_compressed_attention()
    q, keys, values = _sides(
        ("rabitq", {"bits": 1, "binary_query": True}), ("turboquant_mse", {}), None
    )
    assert table[("rabitq", "turboquant_mse")](q, keys, values, scale=0.1) is None
    q, keys, values = _sides(("kivi", {"bits": 4}), ("kivi", {"bits": 4}), None, 64, 64)
    assert table[("kivi", "kivi")](q, keys, values, scale=0.1) is None


def test_channel_blocks_shorter_than_the_kernel_lanes_decline(monkeypatch) -> None:
    """Per-channel key blocks of 16 tokens at head_dim 32 (32 token lanes a step): the
    affine kernel cannot take them, so the reference runs; at head_dim 64 (16 lanes) it can."""
    monkeypatch.setattr(vq_algorithms.affine, "kernel_applies", lambda head_dim, rows, op: True)
    impl = registered_compressed_attention()[("kivi", "affine")]
    key, value = ("kivi", {"bits": 4, "group_size": 16}), ("affine", {"bits": 4, "group_size": 32})
    q, keys, values = _sides(key, value, None, 64, 64, d=32)
    assert impl(q, keys, values, scale=0.1) is None
    q, keys, values = _sides(key, value, None, 64, 64, d=64)
    assert impl(q, keys, values, scale=0.1) is not None
