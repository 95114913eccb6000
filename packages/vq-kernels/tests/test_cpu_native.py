"""The native CPU codebook attention (``cpu/codebook_attn.cpp``) against the pure-MLX
reference: every key x value width, ragged rows (0 and full included), RaBitQ's divisor
and unit-norm keys, a second key term, several query tokens, head dims, query dtypes; both
its AVX2 loop and its portable loop; and its loader's errors."""

import ctypes

import mlx.core as mx
import pytest

import vq_kernels as vk
from vq_kernels import _cpu
from vq_kernels import codebook_attention_cpu as native

pytestmark = pytest.mark.skipif(_cpu.compiler() is None, reason="no C++ compiler (c++/g++)")

BITS = (1, 2, 3, 4)


def _codes(key, shape, bits, dim):
    idx = mx.random.randint(0, 1 << bits, (*shape, dim), key=key)
    return vk.pack_bits(idx, bits, backend="reference")


def _case(b=2, hkv=3, g=3, lq=1, lbuf=70, d=64, kb=4, vb=4, dtype=mx.float32, seed=0):
    ks = mx.random.split(mx.random.key(seed), 7)
    q = mx.random.normal((b, hkv * g, lq, d), key=ks[0]).astype(dtype)
    kc = mx.sort(mx.random.normal((1 << kb,), key=ks[1]))
    vc = mx.sort(mx.random.normal((1 << vb,), key=ks[2]))
    kn = mx.random.uniform(0.5, 2.0, (b, hkv, lbuf), key=ks[3]).astype(mx.float16)
    vn = mx.random.uniform(0.5, 2.0, (b, hkv, lbuf), key=ks[4]).astype(mx.float16)
    kp = _codes(ks[5], (b, hkv, lbuf), kb, d)
    vp = _codes(ks[6], (b, hkv, lbuf), vb, d)
    return (q, kp, kn, kc, kb, vp, vn, vc, vb)


def _both(args, scalar=False, **kw):
    """(native, reference) results; the native one through the op (AVX2 where compiled) or
    straight through the C call's portable loop (``scalar``)."""
    ref = vk.codebook_decode_attention(*args, backend="reference", **kw)
    if not scalar:
        return vk.codebook_decode_attention(*args, backend="cpu", **kw), ref
    lbuf = args[1].shape[2]
    lengths = kw.pop("lengths", None)
    n = kw.pop("length", lbuf) if lengths is None else lengths
    opts = {"k_divisor": None, "k_unit": False, "k_term": None, **kw}
    out = native.codebook_attention_cpu(*args, lengths=n, explicit=True, scalar=True, **opts)
    return out, ref


def _close(got, want, tol=2e-5):
    (o, s), (ro, rs) = got, want
    assert o.shape == ro.shape and o.dtype == mx.float32 and s.shape == rs.shape
    finite = mx.isfinite(rs)
    assert mx.array_equal(finite, mx.isfinite(s)).item()
    assert mx.allclose(mx.where(finite, s, 0), mx.where(finite, rs, 0), atol=tol, rtol=tol).item()
    assert mx.allclose(o, ro, atol=tol, rtol=tol).item()


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("vb", BITS)
@pytest.mark.parametrize("kb", BITS)
def test_every_width_pair_with_ragged_rows(kb, vb, scalar) -> None:
    args = _case(b=3, kb=kb, vb=vb, seed=kb * 4 + vb)
    lengths = mx.array([0, 33, 70], dtype=mx.int32)  # empty, a partial block, the full buffer
    got, want = _both(args, scalar, scale=0.125, lengths=lengths)
    _close(got, want)
    assert mx.all(got[0][0] == 0).item() and mx.all(got[1][0] == -mx.inf).item()


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("bits", [1, 3, 4])
def test_rabitq_divisor_and_unit_keys(bits, scalar) -> None:
    """Keys ``norm / divisor * c[idx] / ||c[idx]||`` over RaBitQ's half-integer grid."""
    args = list(_case(kb=bits, vb=4, seed=bits))
    args[3] = mx.arange(1 << bits, dtype=mx.float32) - ((1 << bits) - 1) / 2
    div = mx.random.uniform(0.6, 1.0, args[2].shape, key=mx.random.key(9)).astype(mx.float16)
    got, want = _both(tuple(args), scalar, scale=0.2, length=61, k_divisor=div, k_unit=True)
    _close(got, want)


def test_unit_keys_with_a_zero_code_vector() -> None:
    """A code vector of all-zero levels has norm 0: its key is 0 (score 0), as the reference."""
    args = list(_case(kb=2, vb=2, lbuf=20, seed=5))
    args[3] = mx.array([-1.0, 0.0, 0.5, 1.0])
    zero = vk.pack_bits(mx.ones((2, 3, 1, 64), mx.uint32), 2, backend="reference")
    args[1] = mx.concatenate([zero, args[1][:, :, 1:]], axis=2)
    _close(*_both(tuple(args), scale=0.3, k_unit=True))


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("term_bits", BITS)
def test_second_key_term(term_bits, scalar) -> None:
    args = _case(kb=3, vb=4, lbuf=50, seed=20 + term_bits)
    b, hq, lq, d = args[0].shape
    ks = mx.random.split(mx.random.key(30 + term_bits), 4)
    term = vk.KeyTerm(
        mx.random.normal((b, hq, lq, d), key=ks[0]),
        _codes(ks[1], (b, 3, 50), term_bits, d),
        mx.random.uniform(0.1, 0.5, (b, 3, 50), key=ks[2]).astype(mx.float16),
        mx.sort(mx.random.normal((1 << term_bits,), key=ks[3])),
        term_bits,
        0.7,
    )
    lengths = mx.array([50, 17], dtype=mx.int32)
    _close(*_both(args, scalar, scale=0.125, lengths=lengths, k_term=term))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [64, 128, 40, 20])
def test_query_tokens_head_dims_and_dtypes(d, dtype) -> None:
    """Lq = 3 with g = 3 (9 rows a kv head: three row groups of the C loop); head dims the
    AVX2 loop takes (multiples of 8) and one it leaves to the portable loop (20)."""
    args = _case(b=1, hkv=2, g=3, lq=3, lbuf=45, d=d, kb=4, vb=2, dtype=dtype, seed=d)
    _close(*_both(args, scale=d**-0.5))


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_long_rows_split_over_threads(threads, monkeypatch) -> None:
    """Rows longer than a work item (several chunks merged by log-sum-exp) on 1-3 threads."""
    monkeypatch.setenv("VQ_KERNELS_THREADS", threads)
    args = _case(b=2, hkv=1, g=2, lbuf=3 * native.MIN_CHUNK_TOKENS + 40, kb=4, vb=3, seed=7)
    lengths = mx.array([args[1].shape[2], 2 * native.MIN_CHUNK_TOKENS + 5], dtype=mx.int32)
    _close(*_both(args, scale=0.3, lengths=lengths))


def test_host_pointer_is_zero_copy() -> None:
    a = mx.arange(8, dtype=mx.float32)
    mx.eval(a)
    ptr, view = native.host_pointer(a)
    ctypes.c_float.from_address(ptr + 4).value = 42.0
    assert a[1].item() == 42.0 and native.host_pointer(a)[0] == ptr
    del view
    t = mx.arange(6, dtype=mx.float32).reshape(2, 3).T
    mx.eval(t)
    with pytest.raises(vk.KernelError, match="not row-contiguous"):
        native.host_pointer(t)


def test_transposed_inputs_are_copied_not_misread() -> None:
    """Strided views (every second element of a wider array) give the same result."""
    args = list(_case(b=1, lbuf=24, seed=3))
    want = vk.codebook_decode_attention(*args, scale=0.125, backend="reference")
    args[0] = mx.repeat(args[0], 2, axis=-1)[..., ::2]
    args[2] = mx.repeat(args[2], 2, axis=-1)[..., ::2]
    mx.eval(args[0], args[2])
    assert not memoryview(args[0]).c_contiguous
    _close(vk.codebook_decode_attention(*args, scale=0.125, backend="cpu"), want)


def test_bad_inputs_raise() -> None:
    args = _case(b=2, lbuf=10)
    with pytest.raises(ValueError, match="lengths must have shape"):
        vk.codebook_decode_attention(*args, scale=1.0, lengths=mx.array([1]), backend="cpu")
    with pytest.raises(ValueError, match="widths"):
        vk.codebook_decode_attention(*args[:4], 3, *args[5:], scale=1.0, backend="cpu")
    with pytest.raises(ValueError, match="k_divisor"):
        bad = mx.ones((2, 3, 9), mx.float16)
        vk.codebook_decode_attention(*args, scale=1.0, k_divisor=bad, backend="cpu")
    with pytest.raises(ValueError, match="outside the buffer"):
        vk.codebook_decode_attention(*args, scale=1.0, length=11, backend="cpu")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        vk.codebook_decode_attention(args[0][:, :8], *args[1:], scale=1.0, backend="cpu")


def test_not_inside_compile() -> None:
    args = _case(b=1, lbuf=8)

    def step(q):
        return vk.codebook_decode_attention(q, *args[1:], scale=1.0, backend="cpu")[0]

    with pytest.raises(vk.KernelError, match=r"mx\.compile"):
        mx.compile(step)(args[0])


def test_backend_rule() -> None:
    """On "cpu" the ops in CPU_OPS run native code; every other op its reference."""
    assert vk.resolve_backend("cpu", op="codebook_decode_attention") == "cpu"
    assert vk.resolve_backend("cpu", op="pack_bits") == "reference"
    assert vk.resolve_backend("cpu", op="affine_decode_attention") == "reference"
    codes = mx.array([[1, 2, 3, 0, 1, 2, 3, 0]], dtype=mx.uint32)
    assert mx.array_equal(vk.unpack_bits(vk.pack_bits(codes, 2, backend="cpu"), 2, 8), codes)


def test_build_failure_is_an_error_when_asked_for(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("VQ_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(vk.KernelError, match=r"compiling codebook_attn\.cpp failed"):
        _cpu.build("codebook_attn")
    assert "compiling codebook_attn.cpp" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_default_choice_warns_once_and_runs_the_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VQ_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setattr(_cpu, "_LOADED", {})
    monkeypatch.setattr(_cpu, "_FAILED", {})
    native._function.cache_clear()
    try:
        with pytest.raises(vk.KernelError, match="native CPU code is unavailable"):
            native.available(explicit=True)
        assert _cpu.library("codebook_attn", explicit=False) is None
        assert _cpu.library("codebook_attn", explicit=False) is None
        err = capsys.readouterr().err
        assert err.count("the pure-MLX reference runs instead") == 1
    finally:
        native._function.cache_clear()
