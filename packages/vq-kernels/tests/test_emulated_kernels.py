"""Every kernel body run on the CPU (``kernel_emulator.py``, the ``emulated`` fixture) against
the references.

The Python wrappers run unchanged (their grid, template values and shapes), with MLX's CUDA
launch replaced by the host emulator; outputs start poisoned, so an element left unwritten
fails. Tolerances are those of ``test_gpu_parity.py``: packing, codes and sign scores are
bit-exact, attention within 2e-4 absolute + 2e-4 relative (only summation order differs).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import vq_kernels as vk
from vq_kernels._attention import softmax_attention

REF = "reference"
TOL = 2e-4


@pytest.fixture(autouse=True)
def _cpu() -> None:
    with mx.stream(mx.cpu):
        yield


def _close(a: mx.array, b: mx.array, tol: float = TOL) -> None:
    assert a.shape == b.shape
    assert not mx.any(mx.isnan(a)).item(), "unwritten (poisoned) or NaN output"
    assert mx.array_equal(mx.isinf(a), mx.isinf(b)).item()
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    excess = mx.where(mx.isinf(b), 0.0, mx.abs(a - b) - tol * mx.abs(b))
    assert mx.max(excess).item() <= tol, f"max excess error {mx.max(excess).item()}"


def _codebook_case(
    seed: int, b: int, hkv: int, rows: int, lq: int, lbuf: int, d: int, kb: int, vb: int
):
    ks = mx.random.split(mx.random.key(seed), 7)
    ck = mx.sort(mx.random.normal((1 << kb,), key=ks[0]) * 0.09)
    cv = mx.sort(mx.random.normal((1 << vb,), key=ks[1]) * 0.09)
    kp = vk.pack_bits(mx.random.randint(0, 1 << kb, (b, hkv, lbuf, d), key=ks[2]), kb, backend=REF)
    vp = vk.pack_bits(mx.random.randint(0, 1 << vb, (b, hkv, lbuf, d), key=ks[3]), vb, backend=REF)
    kn = mx.random.uniform(4.0, 16.0, (b, hkv, lbuf), key=ks[4]).astype(mx.float16)
    vn = mx.random.uniform(0.5, 2.0, (b, hkv, lbuf), key=ks[5]).astype(mx.float16)
    q = mx.random.normal((b, hkv * rows, lq, d), key=ks[6])
    return (q, kp, kn, ck, kb, vp, vn, cv, vb)


@pytest.mark.parametrize("merge_in_kernel", [True, False])
@pytest.mark.parametrize(
    ("d", "hkv", "g", "lq", "kb", "vb"),
    [(64, 2, 1, 1, 4, 4), (128, 1, 4, 1, 2, 3), (32, 1, 3, 2, 3, 1), (256, 1, 2, 1, 1, 2)],
)
def test_codebook_attention_ragged(
    d: int, hkv: int, g: int, lq: int, kb: int, vb: int, merge_in_kernel: bool,
    emulated: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Batch rows of lengths 0, 1, 77 and the whole buffer, passed as a device array."""
    from vq_kernels import _attention

    monkeypatch.setattr(_attention, "MERGE_IN_KERNEL", merge_in_kernel)
    lbuf = 150
    args = _codebook_case(d + g + kb, 4, hkv, g, lq, lbuf, d, kb, vb)
    lengths = mx.array([0, 1, 77, lbuf], dtype=mx.int32)
    out, lse = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths)
    rout, rlse = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths, backend=REF)
    _close(out, rout)
    _close(lse, rlse)
    want = ["codebook_attn"] if merge_in_kernel else ["codebook_attn", "attn_reduce"]
    assert emulated == want


def test_codebook_attention_int_length_and_row_tiles(emulated: list[str]) -> None:
    """An int length; 8 query rows per kv head take two row tiles of 4."""
    args = _codebook_case(5, 1, 2, 8, 1, 300, 64, 4, 2)
    for n in (299, 300):
        out, lse = vk.codebook_decode_attention(*args, scale=0.125, length=n)
        rout, rlse = vk.codebook_decode_attention(*args, scale=0.125, length=n, backend=REF)
        _close(out, rout)
        _close(lse, rlse)
    assert emulated == ["codebook_attn"] * 2


@pytest.mark.parametrize(("kb", "d", "vb"), [(1, 64, 2), (3, 32, 2), (4, 128, 4), (2, 64, 1)])
def test_codebook_attention_rabitq_style_keys(
    kb: int, d: int, vb: int, emulated: list[str]
) -> None:
    """Keys norm / divisor * grid / ||grid code|| (RaBitQ's estimator), ragged batch; 1/2/4
    bits run the tensor-core loop (code norms from its Gram products), 3 the fp32 loop."""
    args = _codebook_case(kb, 2, 1, 4, 1, 100, d, kb, vb)
    half = ((1 << kb) - 1) / 2
    grid = mx.arange(1 << kb, dtype=mx.float32) - half
    args = (args[0], args[1], args[2], grid, *args[4:])
    div = mx.random.uniform(0.6, 0.9, args[2].shape, key=mx.random.key(4)).astype(mx.float16)
    lengths = mx.array([37, 100], dtype=mx.int32)
    kw = {"scale": d**-0.5, "lengths": lengths, "k_divisor": div, "k_unit": True}
    out, lse = vk.codebook_decode_attention(*args, **kw)
    rout, rlse = vk.codebook_decode_attention(*args, **kw, backend=REF)
    tol = TOL if kb == 3 else MMA_TOL
    _close(out, rout, tol)
    _close(lse, rlse, tol)
    assert emulated == ["codebook_attn"]


def _orthogonal(d: int, seed: int) -> mx.array:
    q, _ = mx.linalg.qr(mx.random.normal((d, d), key=mx.random.key(seed)), stream=mx.cpu)
    return q


@pytest.mark.parametrize(
    ("d", "hkv", "g", "kb", "vb", "centered", "dtype"),
    [(64, 2, 4, 4, 4, True, mx.float16), (128, 1, 8, 2, 3, False, mx.float32),
     (32, 1, 2, 3, 1, True, mx.float32)],
)  # fmt: skip
def test_codebook_attention_with_tail(
    d: int, hkv: int, g: int, kb: int, vb: int, centered: bool, dtype, emulated: list[str]
) -> None:
    """The whole decode attention in one launch: ragged compressed and exact counts (0 of
    either included), the keys' and values' rotations, centering means and the finite flag."""
    b, lbuf, cap = 4, 120, 40
    args = _codebook_case(d + kb, b, hkv, g, 1, lbuf, d, kb, vb)
    ks = mx.random.split(mx.random.key(d), 4)
    ek = mx.random.normal((b, hkv, cap, d), key=ks[0]).astype(dtype)
    ev = mx.random.normal((b, hkv, cap, d), key=ks[1]).astype(dtype)
    means = {}
    if centered:
        means["key_mean"] = mx.random.normal((b, hkv, 1, d), key=ks[2]) * 0.5
        means["value_mean"] = mx.random.normal((b, hkv, 1, d), key=ks[3]) * 0.5
    counts = mx.array([[0, 1, 77, lbuf], [5, 0, cap, 1]], dtype=mx.int32)
    for finite in (None, mx.array(True), mx.array(False)):
        tail = vk.DecodeTail(
            _orthogonal(d, 1), _orthogonal(d, 2).T, ek, ev, counts, finite=finite, **means
        )
        out, lse = vk.codebook_decode_attention(*args, scale=d**-0.5, tail=tail)
        rout, rlse = vk.codebook_decode_attention(*args, scale=d**-0.5, tail=tail, backend=REF)
        if finite is not None and not finite.item():
            assert mx.all(mx.isnan(out)).item()
            continue
        _close(out, rout)
        _close(lse, rlse)
    assert emulated == ["codebook_attn"] * 3


def _key_term(seed: int, q: mx.array, lbuf: int, hkv: int, bits: int) -> vk.KeyTerm:
    """A sketch-like term at 1 bit (codebook -1, +1, a small scale), else a second pass."""
    b, _, _, d = q.shape
    ks = mx.random.split(mx.random.key(seed), 4)
    codes = vk.pack_bits(
        mx.random.randint(0, 1 << bits, (b, hkv, lbuf, d), key=ks[0]), bits, backend=REF
    )
    norm = mx.random.uniform(0.5, 3.0, (b, hkv, lbuf), key=ks[1]).astype(mx.float16)
    if bits == 1:
        codebook, scale = mx.array([-1.0, 1.0]), 0.05
    else:
        codebook, scale = mx.sort(mx.random.normal((1 << bits,), key=ks[3]) * 0.09), 1.0
    return vk.KeyTerm(mx.random.normal(q.shape, key=ks[2]), codes, norm, codebook, bits, scale)


@pytest.mark.parametrize(
    ("d", "g", "kb", "vb", "tb"),
    [(64, 4, 3, 4, 1), (128, 2, 1, 2, 1), (16, 1, 2, 2, 1), (64, 4, 2, 2, 2), (128, 2, 3, 4, 3),
     (32, 2, 4, 4, 4)],
)  # fmt: skip
def test_codebook_attention_key_term(d, g, kb, vb, tb, emulated: list[str]) -> None:
    """A second key term (TurboQuant-prod's 1-bit residual sketch, a residual VQ's second
    pass of 2-4 bits) in the fp32 loop, ragged rows, with and without the decode tail; and
    the reference against scores built here."""
    b, hkv, lbuf, cap = 3, 2, 90, 20
    q, kp, kn, ck, _, vp, vn, cv, _ = _codebook_case(d + 1, b, hkv, g, 1, lbuf, d, kb, vb)
    sk = _key_term(d + tb, q, lbuf, hkv, tb)
    args = (q, kp, kn, ck, kb, vp, vn, cv, vb)
    lengths = mx.array([0, 41, lbuf], dtype=mx.int32)
    out, lse = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths, k_term=sk)
    rout, rlse = vk.codebook_decode_attention(
        *args, scale=d**-0.5, lengths=lengths, k_term=sk, backend=REF
    )
    _close(out, rout)
    _close(lse, rlse)
    # the reference: scores s = scale * (q . k + term scale * norm * q_term . c2[idx2])
    k = vk.codebook_dequantize_reference(kp, kn, ck, kb, d)[2:]
    levels = sk.codebook[vk.unpack_bits_reference(sk.codes, tb, d)[2:]]
    qg = q[2:].reshape(1, hkv, g, d)
    s = qg @ k.swapaxes(-1, -2)
    s = s + sk.scale * sk.norm[2:].astype(mx.float32)[:, :, None] * (
        sk.q_term[2:].reshape(1, hkv, g, d) @ levels.swapaxes(-1, -2)
    )
    v = vk.codebook_dequantize_reference(vp, vn, cv, vb, d)[2:]
    p = mx.softmax(d**-0.5 * s, axis=-1)
    _close(rout[2:], (p @ v).reshape(1, hkv * g, 1, d))
    ks = mx.random.split(mx.random.key(7), 2)
    ek = mx.random.normal((b, hkv, cap, d), key=ks[0])
    counts = mx.array([[0, 33, lbuf], [3, 0, cap]], dtype=mx.int32)
    tail = vk.DecodeTail(_orthogonal(d, 1), _orthogonal(d, 2).T, ek, ek * 0.5, counts)
    out, lse = vk.codebook_decode_attention(*args, scale=d**-0.5, tail=tail, k_term=sk)
    rout, rlse = vk.codebook_decode_attention(
        *args, scale=d**-0.5, tail=tail, k_term=sk, backend=REF
    )
    _close(out, rout)
    _close(lse, rlse)
    assert emulated == ["codebook_attn"] * 2
    with pytest.raises(ValueError, match="key term codes"):
        bad = vk.KeyTerm(sk.q_term, sk.codes[..., :0], sk.norm, sk.codebook, tb)
        vk.codebook_decode_attention(*args, scale=0.1, k_term=bad)
    with pytest.raises(ValueError, match="2\\^bits levels"):
        bad = vk.KeyTerm(sk.q_term, sk.codes, sk.norm, mx.zeros((3,)), tb)
        vk.codebook_decode_attention(*args, scale=0.1, k_term=bad)


def test_codebook_attention_tail_needs_one_token(emulated: list[str]) -> None:
    args = _codebook_case(1, 1, 1, 2, 2, 16, 32, 2, 2)
    ek = mx.zeros((1, 1, 4, 32), mx.float16)
    tail = vk.DecodeTail(mx.eye(32), mx.eye(32), ek, ek, mx.array([[16], [4]], dtype=mx.int32))
    with pytest.raises(ValueError, match="one query token"):
        vk.codebook_decode_attention(*args, scale=0.1, tail=tail)


def _affine_case(seed: int, b: int, hkv: int, g: int, lbuf: int, d: int, gs: int, bits: int):
    ks = mx.random.split(mx.random.key(seed), 3)
    k = mx.random.normal((b, hkv, lbuf, d), key=ks[0]).astype(mx.float16)
    v = mx.random.normal((b, hkv, lbuf, d), key=ks[1]).astype(mx.float16)
    q = mx.random.normal((b, hkv * g, 1, d), key=ks[2])
    return q, mx.quantize(k, group_size=gs, bits=bits), mx.quantize(v, group_size=gs, bits=bits)


@pytest.mark.parametrize(
    ("d", "gs", "bits", "g"), [(64, 32, 4, 4), (128, 64, 8, 1), (32, 32, 3, 2)]
)
def test_affine_attention_ragged(d: int, gs: int, bits: int, g: int, emulated: list[str]) -> None:
    q, kq, vq = _affine_case(bits, 3, 1, g, 90, d, gs, bits)
    kw = {"scale": d**-0.5, "group_size": gs, "bits": bits}
    kw["lengths"] = mx.array([0, 45, 90], dtype=mx.int32)
    out, lse = vk.affine_decode_attention(q, kq, vq, **kw)
    rout, rlse = vk.affine_decode_attention(q, kq, vq, **kw, backend=REF)
    _close(out, rout)
    _close(lse, rlse)
    assert emulated == ["affine_attn"]


@pytest.mark.parametrize(
    ("d", "kgs", "kb", "vgs", "vb", "g"),
    [(64, 32, 2, 64, 4, 4), (128, 16, 4, 32, 2, 2), (32, 32, 3, 32, 8, 1), (128, 128, 8, 64, 4, 4)],
)
def test_affine_attention_channel_keys(
    d, kgs, kb, vgs, vb, g, channel_quantize, emulated: list[str]
) -> None:
    """KIVI's keys (per channel) with per-token values of other bits and group size: the
    kernel against the reference, and the reference against attention over the keys
    dequantized here."""
    ks = mx.random.split(mx.random.key(d + kb), 3)
    lbuf = 4 * kgs
    k = mx.random.normal((3, 1, lbuf, d), key=ks[0]) * mx.linspace(0.2, 3.0, d)
    v = mx.random.normal((3, 1, lbuf, d), key=ks[1]).astype(mx.float16)
    q = mx.random.normal((3, g, 1, d), key=ks[2])
    kq, k_deq = channel_quantize(k, kgs, kb)
    vq = mx.quantize(v, group_size=vgs, bits=vb)
    kw = {"scale": d**-0.5, "group_size": kgs, "bits": kb, "key_axis": "channel"}
    kw |= {"value_group_size": vgs, "value_bits": vb}
    kw["lengths"] = mx.array([0, 2 * kgs, lbuf], dtype=mx.int32)
    out, lse = vk.affine_decode_attention(q, kq, vq, **kw)
    rout, rlse = vk.affine_decode_attention(q, kq, vq, **kw, backend=REF)
    _close(out, rout)
    _close(lse, rlse)
    assert emulated == ["affine_attn"]
    f32 = mx.float32
    v_deq = mx.dequantize(vq[0], vq[1].astype(f32), vq[2].astype(f32), group_size=vgs, bits=vb)
    dense, dlse = softmax_attention(q[2:], k_deq[2:], v_deq[2:], d**-0.5)
    _close(rout[2:], dense)
    _close(rlse[2:], dlse)


def test_affine_attention_channel_keys_need_whole_blocks(channel_quantize) -> None:
    kq, _ = channel_quantize(mx.zeros((1, 1, 64, 64)), 32, 4)
    vq = mx.quantize(mx.zeros((1, 1, 64, 64), mx.float16), group_size=64, bits=4)
    q = mx.zeros((1, 1, 1, 64))
    kw = {"scale": 0.1, "group_size": 32, "bits": 4, "key_axis": "channel"}
    kw["value_group_size"] = 64
    with pytest.raises(ValueError, match="whole blocks of 32 tokens; 40"):
        vk.affine_decode_attention(q, kq, vq, **kw, length=40)
    with pytest.raises(ValueError, match="key_axis"):
        vk.affine_decode_attention(q, kq, vq, **{**kw, "key_axis": "row"})
    with pytest.raises(ValueError, match=r"values.*group size"):
        vk.affine_decode_attention(q, kq, vq, **{**kw, "value_group_size": 48})
    with pytest.raises(ValueError, match=r"values: scales/biases .* \[1, 1, 64, 2\]"):
        vk.affine_decode_attention(q, kq, vq, **{**kw, "value_group_size": 32})


@pytest.mark.parametrize(
    ("d", "kgs", "kb", "vgs", "vb", "axis", "centered", "dtype"),
    [(64, 32, 4, 64, 4, "token", True, mx.float16), (128, 32, 2, 32, 4, "channel", False, mx.float32),
     (32, 32, 8, 32, 3, "token", False, mx.float16)],
)  # fmt: skip
def test_affine_attention_with_tail(
    d, kgs, kb, vgs, vb, axis, centered, dtype, channel_quantize, emulated: list[str]
) -> None:
    """affine_attn's whole decode step in one launch (no rotation): ragged compressed counts
    (whole per-channel blocks) and exact counts, 0 of either included, means, finite flag."""
    b, hkv, g, lbuf, cap = 4, 2, 2, 4 * kgs, 40
    ks = mx.random.split(mx.random.key(d + kb), 6)
    k = mx.random.normal((b, hkv, lbuf, d), key=ks[0]).astype(mx.float16)
    v = mx.random.normal((b, hkv, lbuf, d), key=ks[1]).astype(mx.float16)
    q = mx.random.normal((b, hkv * g, 1, d), key=ks[2]).astype(dtype)
    kq = channel_quantize(k, kgs, kb)[0] if axis == "channel" else mx.quantize(k, kgs, kb)
    vq = mx.quantize(v, group_size=vgs, bits=vb)
    ek = mx.random.normal((b, hkv, cap, d), key=ks[3]).astype(dtype)
    ev = mx.random.normal((b, hkv, cap, d), key=ks[4]).astype(dtype)
    means = {}
    if centered:
        means["key_mean"] = mx.random.normal((b, hkv, 1, d), key=ks[5]) * 0.5
        means["value_mean"] = mx.random.normal((b, hkv, 1, d), key=ks[5]) * 0.3
    counts = mx.array([[0, kgs, 3 * kgs, lbuf], [5, 0, cap, 1]], dtype=mx.int32)
    kw = {"scale": d**-0.5, "group_size": kgs, "bits": kb, "key_axis": axis}
    kw |= {"value_group_size": vgs, "value_bits": vb}
    for finite in (None, mx.array(False)):
        tail = vk.DecodeTail(None, None, ek, ev, counts, finite=finite, **means)
        out, lse = vk.affine_decode_attention(q, kq, vq, **kw, tail=tail)
        if finite is not None:
            assert mx.all(mx.isnan(out)).item()
            continue
        rout, rlse = vk.affine_decode_attention(q, kq, vq, **kw, tail=tail, backend=REF)
        assert out.dtype == (mx.float16 if dtype == mx.float16 else mx.float32)
        _close(out, rout, 2e-3 if dtype == mx.float16 else TOL)
        _close(lse, rlse)
    assert emulated == ["affine_attn"] * 2
    with pytest.raises(ValueError, match="original basis"):
        tail = vk.DecodeTail(mx.eye(d), mx.eye(d), ek, ev, counts)
        vk.affine_decode_attention(q, kq, vq, **kw, tail=tail)


def test_pq_attention(emulated: list[str]) -> None:
    ks = mx.random.split(mx.random.key(3), 5)
    d, m, kc, hkv, g, lbuf = 64, 16, 16, 2, 2, 200
    cent_k = mx.random.normal((m, kc, d // m), key=ks[0]) * 0.3
    cent_v = mx.random.normal((m, kc, d // m), key=ks[1])
    kcodes = mx.random.randint(0, kc, (2, hkv, lbuf, m), key=ks[2]).astype(mx.uint8)
    vcodes = mx.random.randint(0, kc, (2, hkv, lbuf, m), key=ks[3]).astype(mx.uint8)
    q = mx.random.normal((2, hkv * g, 1, d), key=ks[4])
    a = (q, kcodes, cent_k, vcodes, cent_v)
    out, lse = vk.pq_decode_attention(*a, scale=d**-0.5, length=133)
    rout, rlse = vk.pq_decode_attention(*a, scale=d**-0.5, length=133, backend=REF)
    _close(out, rout)
    _close(lse, rlse)
    assert emulated == ["pq_attn_partial", "attn_reduce"]


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_pack_unpack_bit_exact(bits: int, emulated: list[str]) -> None:
    codes = mx.random.randint(0, 1 << bits, (3, 37), key=mx.random.key(bits))
    words = vk.pack_bits(codes, bits)
    assert mx.array_equal(words, vk.pack_bits(codes, bits, backend=REF)).item()
    assert mx.array_equal(vk.unpack_bits(words, bits, 37), codes.astype(mx.uint32)).item()
    assert emulated == ["pack_bits", "unpack_bits"]


def test_codebook_quantize_dequantize(emulated: list[str]) -> None:
    c = mx.sort(mx.random.normal((8,), key=mx.random.key(1)) * 0.09)
    y = mx.random.normal((5, 64), key=mx.random.key(2))
    packed, norm = vk.codebook_quantize(y, c, 3)
    rpacked, rnorm = vk.codebook_quantize(y, c, 3, backend=REF)
    assert mx.array_equal(norm, rnorm).item() and mx.array_equal(packed, rpacked).item()
    rec = vk.codebook_dequantize(rpacked, rnorm, c, 3, 64)
    assert mx.array_equal(rec, vk.codebook_dequantize(rpacked, rnorm, c, 3, 64, backend=REF)).item()
    assert emulated == ["codebook_quantize", "codebook_dequantize"]


def test_sign_dot_planes_bit_exact(emulated: list[str]) -> None:
    ks = mx.random.split(mx.random.key(9), 3)
    k = vk.pack_bits(mx.random.randint(0, 2, (1, 2, 33, 100), key=ks[1]), 1, backend=REF)
    planes = vk.pack_bits(mx.random.randint(0, 2, (1, 4, 2, 4, 100), key=ks[2]), 1, backend=REF)
    got = vk.sign_dot_planes(planes, k, 100)
    assert mx.array_equal(got, vk.sign_dot_planes(planes, k, 100, backend=REF)).item()
    assert emulated == ["sign_dot_planes"]


MMA_TOL = 1e-2  # fp16 operands (q, levels, p * v_norm) round to 11 bits


@pytest.mark.parametrize(
    ("d", "hkv", "g", "kb", "vb"),
    [(64, 2, 4, 4, 4), (128, 1, 8, 2, 1), (32, 1, 3, 1, 2), (128, 1, 4, 4, 4), (256, 1, 2, 1, 4)],
)
def test_codebook_attention_tensor_core_loop(
    d: int, hkv: int, g: int, kb: int, vb: int, emulated: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The m16n8k16 loop (USE_MMA) against the reference, ragged rows (0, 1, 77, all), row
    tiles of up to 4 padded to the MMA's 8; and not bit-equal to the fp32 loop (it ran)."""
    from vq_kernels import _attention

    lbuf = 150
    args = _codebook_case(d + g + kb, 4, hkv, g, 1, lbuf, d, kb, vb)
    lengths = mx.array([0, 1, 77, lbuf], dtype=mx.int32)
    monkeypatch.setattr(_attention, "USE_MMA", False)
    scalar, _ = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths)
    monkeypatch.setattr(_attention, "USE_MMA", True)
    out, lse = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths)
    rout, rlse = vk.codebook_decode_attention(*args, scale=d**-0.5, lengths=lengths, backend=REF)
    _close(out, rout, MMA_TOL)
    _close(lse, rlse, MMA_TOL)
    assert not mx.array_equal(out, scalar).item()
    assert emulated == ["codebook_attn"] * 2


def test_codebook_attention_fp16_query_with_tail_both_loops(
    emulated: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float16 query (float16 output) with a decode tail, the fp32 loop and then USE_MMA:
    rotations, means, exact tokens (the tail group keeps the fp32 loop), ragged counts."""
    from vq_kernels import _attention

    b, hkv, g, d, lbuf, cap = 4, 2, 4, 64, 120, 40
    args = _codebook_case(7, b, hkv, g, 1, lbuf, d, 4, 2)
    ks = mx.random.split(mx.random.key(3), 4)
    ek = mx.random.normal((b, hkv, cap, d), key=ks[0]).astype(mx.float16)
    ev = mx.random.normal((b, hkv, cap, d), key=ks[1]).astype(mx.float16)
    means = {
        "key_mean": mx.random.normal((b, hkv, 1, d), key=ks[2]) * 0.5,
        "value_mean": mx.random.normal((b, hkv, 1, d), key=ks[3]) * 0.5,
    }
    counts = mx.array([[0, 1, 77, lbuf], [5, 0, cap, 1]], dtype=mx.int32)
    tail = vk.DecodeTail(_orthogonal(d, 1), _orthogonal(d, 2).T, ek, ev, counts, **means)
    q16 = args[0].astype(mx.float16)
    rout, rlse = vk.codebook_decode_attention(q16, *args[1:], scale=d**-0.5, tail=tail, backend=REF)
    assert rout.dtype == mx.float16
    for mma in (False, True):
        monkeypatch.setattr(_attention, "USE_MMA", mma)
        out, lse = vk.codebook_decode_attention(q16, *args[1:], scale=d**-0.5, tail=tail)
        assert out.dtype == mx.float16
        _close(out, rout, MMA_TOL)
        _close(lse, rlse, MMA_TOL)
    assert emulated == ["codebook_attn"] * 2
