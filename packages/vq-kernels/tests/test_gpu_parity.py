"""Element-wise parity of every kernel with its pure-MLX reference, on the GPU.

Packing and sign scores are bit-exact. Attention: |out - ref| <= 2e-4 + 2e-4 |ref| and
|lse - ref| <= 2e-4 (fp32 throughout; only summation order and exp2 differ), the codebook
kernel's tensor-core loop 1e-2 (fp16 operands); its tests run both loops. Codebook
quantize: norms equal, codes equal except where the fp32 norm's summation order flips an
argmin tie (at most 1 in 10^4).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import vq_kernels as vk

GPU = vk.available_backend()
pytestmark = pytest.mark.skipif(
    GPU == "reference", reason="needs MLX CUDA or Metal: this MLX build has neither GPU backend"
)
REF = "reference"
ATOL = RTOL = 2e-4
MMA_TOL = 1e-2  # the tensor-core loop's fp16 operands (q, levels, p * v_norm): 11 bits


@pytest.fixture(params=["fp32 loop", "tensor-core loop"])
def loop_tol(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The codebook kernel's loop (``USE_MMA``) and its (atol, rtol). The tensor-core loop
    takes 1/2/4-bit codes without RaBitQ's divisor and head_dim % 16 == 0 on CUDA; other
    cases run the fp32 loop under either setting."""
    from vq_kernels import _attention

    mma = request.param == "tensor-core loop"
    if mma and GPU != "cuda":
        pytest.skip("the tensor-core loop is CUDA's")
    monkeypatch.setattr(_attention, "USE_MMA", mma)
    return (MMA_TOL, MMA_TOL) if mma else (ATOL, RTOL)


def _close(a: mx.array, b: mx.array, atol: float = ATOL, rtol: float = RTOL) -> None:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    err = mx.max(mx.abs(a - b) - rtol * mx.abs(b)).item()
    assert mx.array_equal(mx.isinf(a), mx.isinf(b)).item()
    finite = mx.where(mx.isinf(b), 0.0, mx.abs(a - b) - rtol * mx.abs(b))
    assert mx.max(finite).item() <= atol, f"max excess error {err}"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n", [1, 37, 64, 128])
def test_pack_unpack_bit_exact(bits: int, n: int) -> None:
    codes = mx.random.randint(0, 1 << bits, (5, 3, n), key=mx.random.key(n + bits))
    words = vk.pack_bits(codes, bits, backend=GPU)
    assert mx.array_equal(words, vk.pack_bits(codes, bits, backend=REF)).item()
    back = vk.unpack_bits(words, bits, n, backend=GPU)
    assert mx.array_equal(back, codes.astype(mx.uint32)).item()


def _codebook(bits: int, seed: int) -> mx.array:
    return mx.sort(mx.random.normal((1 << bits,), key=mx.random.key(seed)) * 0.09)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_codebook_quantize_dequantize(bits: int, d: int) -> None:
    c = _codebook(bits, bits)
    y = mx.random.normal((7, 301, d), key=mx.random.key(d))
    y[0, 0] = 0.0  # zero vector: norm 0, no NaN
    packed, norm = vk.codebook_quantize(y, c, bits, backend=GPU)
    rpacked, rnorm = vk.codebook_quantize(y, c, bits, backend=REF)
    assert mx.array_equal(norm, rnorm).item()
    codes = vk.unpack_bits(packed, bits, d, backend=REF)
    rcodes = vk.unpack_bits(rpacked, bits, d, backend=REF)
    assert mx.mean(codes != rcodes).item() <= 1e-4
    rec = vk.codebook_dequantize(rpacked, rnorm, c, bits, d, backend=GPU)
    assert mx.array_equal(
        rec, vk.codebook_dequantize(rpacked, rnorm, c, bits, d, backend=REF)
    ).item()
    assert not mx.any(mx.isnan(rec)).item()


def _codebook_case(d: int, hkv: int, g: int, lq: int, lbuf: int, kb: int, vb: int, batch: int = 2):
    ks = mx.random.split(mx.random.key(d * 7 + g * 3 + lbuf + kb * 11 + vb + batch), 6)
    ck, cv = _codebook(kb, kb + 10), _codebook(vb, vb + 20)
    kp = vk.pack_bits(mx.random.randint(0, 1 << kb, (batch, hkv, lbuf, d), key=ks[0]), kb)
    vp = vk.pack_bits(mx.random.randint(0, 1 << vb, (batch, hkv, lbuf, d), key=ks[1]), vb)
    kn = (mx.random.uniform(4.0, 16.0, (batch, hkv, lbuf), key=ks[2])).astype(mx.float16)
    vn = mx.random.uniform(0.5, 2.0, (batch, hkv, lbuf), key=ks[3]).astype(mx.float16)
    q = mx.random.normal((batch, hkv * g, lq, d), key=ks[4])
    return q, kp, kn, ck, vp, vn, cv


BITS = [(1, 1), (2, 2), (3, 3), (4, 4), (4, 2), (2, 4), (3, 4)]


@pytest.mark.parametrize(("kb", "vb"), BITS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize(("g", "lq"), [(1, 1), (3, 1), (4, 1), (8, 1), (4, 2)])
def test_codebook_decode_attention(kb: int, vb: int, d: int, g: int, lq: int, loop_tol) -> None:
    lbuf = 1500
    q, kp, kn, ck, vp, vn, cv = _codebook_case(d, 2, g, lq, lbuf, kb, vb)
    scale = d**-0.5
    for length in (1, 200, 1237, lbuf):
        args = (q, kp, kn, ck, kb, vp, vn, cv, vb)
        out, lse = vk.codebook_decode_attention(*args, scale=scale, length=length, backend=GPU)
        rout, rlse = vk.codebook_decode_attention(*args, scale=scale, length=length, backend=REF)
        _close(out, rout, *loop_tol)
        _close(lse, rlse, *loop_tol)


@pytest.mark.parametrize("merge_in_kernel", [True, False])
@pytest.mark.parametrize(("d", "g", "kb", "vb"), [(64, 1, 4, 4), (128, 4, 2, 2), (256, 8, 3, 4)])
def test_codebook_decode_attention_ragged_batch(
    d: int, g: int, kb: int, vb: int, merge_in_kernel: bool, monkeypatch: pytest.MonkeyPatch,
    loop_tol,
) -> None:  # fmt: skip
    """B = 4 rows of different valid lengths (0, 1, 777, the whole buffer) from a device array;
    a poisoned output proves every element is written."""
    from vq_kernels import _attention

    monkeypatch.setattr(_attention, "MERGE_IN_KERNEL", merge_in_kernel)
    lbuf = 1500
    q, kp, kn, ck, vp, vn, cv = _codebook_case(d, 2, g, 1, lbuf, kb, vb, batch=4)
    lengths = mx.array([0, 1, 777, lbuf], dtype=mx.int32)
    args = (q, kp, kn, ck, kb, vp, vn, cv, vb)
    out, lse = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths, backend=GPU)
    rout, rlse = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths, backend=REF)
    assert not mx.any(mx.isnan(out)).item()
    _close(out, rout, *loop_tol)
    _close(lse, rlse, *loop_tol)
    for i, n in enumerate(lengths.tolist()):  # each row equals its own single-row call
        one = (q[i : i + 1], kp[i : i + 1], kn[i : i + 1], ck, kb, vp[i : i + 1], vn[i : i + 1])
        o1, _ = vk.codebook_decode_attention(*one, cv, vb, scale=d**-0.5, length=n, backend=GPU)
        _close(o1, rout[i : i + 1], *loop_tol)


def _orthogonal(d: int, seed: int) -> mx.array:
    q, _ = mx.linalg.qr(mx.random.normal((d, d), key=mx.random.key(seed)), stream=mx.cpu)
    return q


@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
@pytest.mark.parametrize(("d", "g", "kb", "vb"), [(128, 4, 4, 4), (128, 4, 2, 2), (64, 8, 3, 4)])
def test_codebook_decode_attention_with_tail(
    d: int, g: int, kb: int, vb: int, dtype, loop_tol
) -> None:
    """One launch for the whole decode attention: ragged compressed and exact counts, both
    rotations, centering means, the finite flag (False gives NaN everywhere)."""
    lbuf, cap = 1500, 40
    q, kp, kn, ck, vp, vn, cv = _codebook_case(d, 2, g, 1, lbuf, kb, vb, batch=4)
    ks = mx.random.split(mx.random.key(d + g), 4)
    ek = mx.random.normal((4, 2, cap, d), key=ks[0]).astype(dtype)
    ev = mx.random.normal((4, 2, cap, d), key=ks[1]).astype(dtype)
    km = mx.random.normal((4, 2, 1, d), key=ks[2]) * 0.5
    vm = mx.random.normal((4, 2, 1, d), key=ks[3]) * 0.5
    counts = mx.array([[0, 1, 777, lbuf], [5, 0, cap, 33]], dtype=mx.int32)
    args = (q.astype(dtype), kp, kn, ck, kb, vp, vn, cv, vb)
    for finite in (None, mx.array(True), mx.array(False)):
        mk = _orthogonal(d, 1).astype(dtype)  # float16: the query rotation's float16 GEMM
        tail = vk.DecodeTail(mk, _orthogonal(d, 2).T, ek, ev, counts, km, vm, finite)
        out, lse = vk.codebook_decode_attention(*args, scale=d**-0.5, tail=tail, backend=GPU)
        rout, rlse = vk.codebook_decode_attention(*args, scale=d**-0.5, tail=tail, backend=REF)
        if finite is not None and not finite.item():
            assert mx.all(mx.isnan(out)).item()
            continue
        _close(out, rout, *loop_tol)
        _close(lse, rlse, *loop_tol)


@pytest.mark.parametrize(("d", "kb", "vb", "tb"), [(128, 3, 4, 1), (128, 2, 2, 2), (64, 4, 4, 3)])
def test_codebook_decode_attention_key_term(d: int, kb: int, vb: int, tb: int) -> None:
    """A second key term (TurboQuant-prod's sign sketch at 1 bit, a residual VQ's second
    pass at 2-3 bits): ragged rows from a device array, then one launch with the tail."""
    lbuf, cap = 3000, 40
    q, kp, kn, ck, vp, vn, cv = _codebook_case(d, 2, 4, 1, lbuf, kb, vb, batch=3)
    ks = mx.random.split(mx.random.key(d + tb), 5)
    codes = vk.pack_bits(mx.random.randint(0, 1 << tb, (3, 2, lbuf, d), key=ks[0]), tb)
    norm = mx.random.uniform(0.5, 3.0, (3, 2, lbuf), key=ks[1]).astype(mx.float16)
    codebook = mx.array([-1.0, 1.0]) if tb == 1 else _codebook(tb, tb + 30)
    term = vk.KeyTerm(mx.random.normal(q.shape, key=ks[2]), codes, norm, codebook, tb, 0.3)
    args = (q, kp, kn, ck, kb, vp, vn, cv, vb)
    kw = {"scale": d**-0.5, "k_term": term, "lengths": mx.array([0, 1234, lbuf], dtype=mx.int32)}
    out, lse = vk.codebook_decode_attention(*args, **kw, backend=GPU)
    rout, rlse = vk.codebook_decode_attention(*args, **kw, backend=REF)
    _close(out, rout)
    _close(lse, rlse)
    if GPU != "cuda":  # the tail merges in the kernel: CUDA only
        return
    ek = mx.random.normal((3, 2, cap, d), key=ks[3]).astype(mx.float16)
    km = mx.random.normal((3, 2, 1, d), key=ks[4]) * 0.5
    counts = mx.array([[0, 777, lbuf], [5, 0, cap]], dtype=mx.int32)
    tail = vk.DecodeTail(_orthogonal(d, 1), _orthogonal(d, 2).T, ek, ek, counts, km, km)
    kw = {"scale": d**-0.5, "k_term": term, "tail": tail}
    out, lse = vk.codebook_decode_attention(*args, **kw, backend=GPU)
    rout, rlse = vk.codebook_decode_attention(*args, **kw, backend=REF)
    _close(out, rout)
    _close(lse, rlse)


def _rabitq_style_keys(kb: int, norm_shape, seed: int) -> tuple[mx.array, dict]:
    """RaBitQ's half-integer grid codebook for ``kb``-bit keys and the kernel options of its
    estimator: a float16 divisor per key (``norm_shape``) and unit code vectors."""
    grid = mx.arange(1 << kb, dtype=mx.float32) - ((1 << kb) - 1) / 2
    div = mx.random.uniform(0.6, 0.9, norm_shape, key=mx.random.key(seed)).astype(mx.float16)
    return grid, {"k_divisor": div, "k_unit": True}


@pytest.mark.parametrize(("kb", "d"), [(1, 128), (2, 128), (4, 64)])
def test_codebook_decode_attention_rabitq_style_keys(kb: int, d: int) -> None:
    """Keys norm / divisor * grid / ||grid code|| (RaBitQ), values 4-bit, ragged B = 2."""
    q, kp, kn, _, vp, vn, cv = _codebook_case(d, 2, 4, 1, 1500, kb, 4)
    grid, keys = _rabitq_style_keys(kb, kn.shape, seed=kb)
    kw = {"scale": d**-0.5, "lengths": mx.array([999, 1500], dtype=mx.int32), **keys}
    args = (q, kp, kn, grid, kb, vp, vn, cv, 4)
    out, lse = vk.codebook_decode_attention(*args, **kw, backend=GPU)
    rout, rlse = vk.codebook_decode_attention(*args, **kw, backend=REF)
    _close(out, rout)
    _close(lse, rlse)


def _affine_case(seed: int, b: int, hkv: int, g: int, lbuf: int, d: int, gs: int, bits: int):
    ks = mx.random.split(mx.random.key(seed), 3)
    k = mx.random.normal((b, hkv, lbuf, d), key=ks[0]).astype(mx.float16)
    v = mx.random.normal((b, hkv, lbuf, d), key=ks[1]).astype(mx.float16)
    q = mx.random.normal((b, hkv * g, 1, d), key=ks[2])
    return q, mx.quantize(k, group_size=gs, bits=bits), mx.quantize(v, group_size=gs, bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize(("d", "gs", "g"), [(64, 32, 1), (128, 64, 4), (256, 128, 8)])
def test_affine_decode_attention(bits: int, d: int, gs: int, g: int) -> None:
    """mlx-lm-format codes (fp16 scales/biases), ragged B = 3 from a device array."""
    q, kq, vq = _affine_case(bits + d, 3, 2, g, 1500, d, gs, bits)
    kw = {"scale": d**-0.5, "group_size": gs, "bits": bits}
    kw["lengths"] = mx.array([0, 777, 1500], dtype=mx.int32)
    out, lse = vk.affine_decode_attention(q, kq, vq, **kw, backend=GPU)
    rout, rlse = vk.affine_decode_attention(q, kq, vq, **kw, backend=REF)
    _close(out, rout)
    _close(lse, rlse)


@pytest.mark.parametrize(
    ("d", "kgs", "kb", "vgs", "vb", "g"),
    [
        (128, 32, 2, 64, 2, 4),
        (128, 32, 4, 64, 4, 4),
        (64, 16, 8, 32, 4, 1),
        (256, 64, 3, 128, 8, 8),
    ],
)
def test_affine_decode_attention_channel_keys(d, kgs, kb, vgs, vb, g, channel_quantize) -> None:
    """KIVI's per-channel keys with per-token values of other bits and group size, ragged
    B = 3 from a device array."""
    ks = mx.random.split(mx.random.key(d + kb), 3)
    lbuf = 48 * kgs
    k = mx.random.normal((3, 2, lbuf, d), key=ks[0]) * mx.linspace(0.2, 3.0, d)
    v = mx.random.normal((3, 2, lbuf, d), key=ks[1]).astype(mx.float16)
    q = mx.random.normal((3, 2 * g, 1, d), key=ks[2])
    kq, _ = channel_quantize(k, kgs, kb)
    vq = mx.quantize(v, group_size=vgs, bits=vb)
    kw = {"scale": d**-0.5, "group_size": kgs, "bits": kb, "key_axis": "channel"}
    kw |= {"value_group_size": vgs, "value_bits": vb}
    kw["lengths"] = mx.array([0, 17 * kgs, lbuf], dtype=mx.int32)
    out, lse = vk.affine_decode_attention(q, kq, vq, **kw, backend=GPU)
    rout, rlse = vk.affine_decode_attention(q, kq, vq, **kw, backend=REF)
    _close(out, rout)
    _close(lse, rlse)


@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
@pytest.mark.parametrize(
    ("d", "kgs", "kb", "vgs", "vb", "axis"),
    [(128, 64, 4, 64, 4, "token"), (128, 32, 2, 64, 4, "channel"), (64, 32, 8, 32, 3, "token")],
)
def test_affine_decode_attention_with_tail(d, kgs, kb, vgs, vb, axis, dtype, channel_quantize):
    """affine_attn's one launch (no rotation): ragged compressed counts in whole blocks and
    exact counts, 0 of either, means, the finite flag."""
    lbuf, cap = 48 * kgs, 40
    ks = mx.random.split(mx.random.key(d + kb), 6)
    k = mx.random.normal((4, 2, lbuf, d), key=ks[0]).astype(mx.float16)
    v = mx.random.normal((4, 2, lbuf, d), key=ks[1]).astype(mx.float16)
    q = mx.random.normal((4, 8, 1, d), key=ks[2]).astype(dtype)
    kq = channel_quantize(k, kgs, kb)[0] if axis == "channel" else mx.quantize(k, kgs, kb)
    vq = mx.quantize(v, group_size=vgs, bits=vb)
    ek = mx.random.normal((4, 2, cap, d), key=ks[3]).astype(dtype)
    ev = mx.random.normal((4, 2, cap, d), key=ks[4]).astype(dtype)
    km = mx.random.normal((4, 2, 1, d), key=ks[5]) * 0.5
    counts = mx.array([[0, kgs, 21 * kgs, lbuf], [5, 0, cap, 33]], dtype=mx.int32)
    kw = {"scale": d**-0.5, "group_size": kgs, "bits": kb, "key_axis": axis}
    kw |= {"value_group_size": vgs, "value_bits": vb}
    for finite in (None, mx.array(False)):
        tail = vk.DecodeTail(None, None, ek, ev, counts, km, km * 0.5, finite)
        out, lse = vk.affine_decode_attention(q, kq, vq, **kw, tail=tail, backend=GPU)
        if finite is not None:
            assert mx.all(mx.isnan(out)).item()
            continue
        rout, rlse = vk.affine_decode_attention(q, kq, vq, **kw, tail=tail, backend=REF)
        tol = (2e-3, 2e-3) if dtype == mx.float16 else (ATOL, RTOL)
        _close(out, rout, *tol)
        _close(lse, rlse, *tol)


def test_codebook_decode_attention_long_and_empty(loop_tol) -> None:
    q, kp, kn, ck, vp, vn, cv = _codebook_case(128, 2, 4, 1, 40000, 4, 4)
    args = (q, kp, kn, ck, 4, vp, vn, cv, 4)
    for length in (0, 39999):
        out, lse = vk.codebook_decode_attention(*args, scale=0.088, length=length, backend=GPU)
        rout, rlse = vk.codebook_decode_attention(*args, scale=0.088, length=length, backend=REF)
        _close(out, rout, *loop_tol)
        _close(lse, rlse, *loop_tol)


@pytest.mark.parametrize(("d", "m", "kc"), [(64, 16, 16), (128, 16, 256), (128, 32, 64)])
@pytest.mark.parametrize("g", [1, 3, 4, 8])
def test_pq_decode_attention(d: int, m: int, kc: int, g: int) -> None:
    ks = mx.random.split(mx.random.key(d + m + kc + g), 5)
    hkv, lbuf = 2, 700
    cent_k = mx.random.normal((m, kc, d // m), key=ks[0]) * 0.3
    cent_v = mx.random.normal((m, kc, d // m), key=ks[1])
    kcodes = mx.random.randint(0, kc, (2, hkv, lbuf, m), key=ks[2]).astype(mx.uint8)
    vcodes = mx.random.randint(0, kc, (2, hkv, lbuf, m), key=ks[3]).astype(mx.uint8)
    q = mx.random.normal((2, hkv * g, 1, d), key=ks[4])
    for length in (1, 333, lbuf):
        a = (q, kcodes, cent_k, vcodes, cent_v)
        out, lse = vk.pq_decode_attention(*a, scale=d**-0.5, length=length, backend=GPU)
        rout, rlse = vk.pq_decode_attention(*a, scale=d**-0.5, length=length, backend=REF)
        _close(out, rout)
        _close(lse, rlse)


@pytest.mark.parametrize("dim", [64, 100, 128])
@pytest.mark.parametrize("g", [1, 4])
def test_sign_dot_planes_bit_exact(dim: int, g: int) -> None:
    ks = mx.random.split(mx.random.key(dim + g), 3)
    k = vk.pack_bits(mx.random.randint(0, 2, (2, 2, 257, dim), key=ks[1]), 1)
    planes = vk.pack_bits(mx.random.randint(0, 2, (2, 2 * g, 3, 4, dim), key=ks[2]), 1)
    got = vk.sign_dot_planes(planes, k, dim, backend=GPU)
    assert mx.array_equal(got, vk.sign_dot_planes(planes, k, dim, backend=REF)).item()


def test_compile_report_records_first_calls() -> None:
    vk.pack_bits(mx.zeros((2, 5), dtype=mx.uint32), 2, backend=GPU)
    rows = vk.compile_report()
    assert any(r.kernel == "pack_bits" and r.backend == GPU for r in rows)
    assert all(r.first_call_s > 0 for r in rows)


@pytest.mark.skipif(GPU != "cuda", reason="the tensor-core loop is CUDA's")
@pytest.mark.parametrize(("d", "g", "kb", "vb"), [(128, 4, 4, 4), (128, 4, 2, 2), (64, 8, 1, 4)])
def test_codebook_decode_attention_tensor_core_loop(
    d: int, g: int, kb: int, vb: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """USE_MMA: ragged rows without a tail, and the one-launch tail with an fp16 query."""
    from vq_kernels import _attention

    monkeypatch.setattr(_attention, "USE_MMA", True)
    lbuf, cap = 1500, 40
    q, kp, kn, ck, vp, vn, cv = _codebook_case(d, 2, g, 1, lbuf, kb, vb, batch=4)
    args = (q, kp, kn, ck, kb, vp, vn, cv, vb)
    lengths = mx.array([0, 1, 777, lbuf], dtype=mx.int32)
    out, lse = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths, backend=GPU)
    rout, rlse = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths, backend=REF)
    _close(out, rout, MMA_TOL, MMA_TOL)
    _close(lse, rlse, MMA_TOL, MMA_TOL)
    ks = mx.random.split(mx.random.key(d + g), 4)
    ek = mx.random.normal((4, 2, cap, d), key=ks[0]).astype(mx.float16)
    km = mx.random.normal((4, 2, 1, d), key=ks[2]) * 0.5
    counts = mx.array([[0, 1, 777, lbuf], [5, 0, cap, 33]], dtype=mx.int32)
    tail = vk.DecodeTail(_orthogonal(d, 1), _orthogonal(d, 2).T, ek, ek, counts, km, km)
    args = (q.astype(mx.float16), *args[1:])
    out, lse = vk.codebook_decode_attention(*args, scale=d**-0.5, tail=tail, backend=GPU)
    rout, rlse = vk.codebook_decode_attention(*args, scale=d**-0.5, tail=tail, backend=REF)
    _close(out, rout, MMA_TOL, MMA_TOL)
    _close(lse, rlse, MMA_TOL, MMA_TOL)


@pytest.mark.parametrize("rabitq_keys", [False, True])
def test_codebook_decode_attention_long_cache_plan(rabitq_keys: bool, loop_tol) -> None:
    """A cache long enough for the long-cache plan (``LONG_GROUPS`` thread groups: 8 kv heads
    x 66,000 tokens >= ``LONG_TOKENS``), with a tail; RaBitQ-style keys take the fp32 loop."""
    from vq_kernels import _attention

    lbuf, kb, d = 66000, 4, 128
    assert 8 * lbuf >= _attention.LONG_TOKENS
    q, kp, kn, ck, vp, vn, cv = _codebook_case(d, 8, 4, 1, lbuf, kb, 4, batch=1)
    kw: dict = {"scale": d**-0.5}
    if rabitq_keys:
        ck, keys = _rabitq_style_keys(kb, kn.shape, seed=5)
        kw |= keys
    ks = mx.random.split(mx.random.key(9), 2)
    ek = mx.random.normal((1, 8, 32, d), key=ks[0]).astype(mx.float16)
    ev = mx.random.normal((1, 8, 32, d), key=ks[1]).astype(mx.float16)
    counts = mx.array([[lbuf - 7], [19]], dtype=mx.int32)
    kw["tail"] = vk.DecodeTail(_orthogonal(d, 3), _orthogonal(d, 4).T, ek, ev, counts)
    args = (q, kp, kn, ck, kb, vp, vn, cv, 4)
    out, lse = vk.codebook_decode_attention(*args, **kw, backend=GPU)
    rout, rlse = vk.codebook_decode_attention(*args, **kw, backend=REF)
    _close(out, rout, *loop_tol)
    _close(lse, rlse, *loop_tol)
