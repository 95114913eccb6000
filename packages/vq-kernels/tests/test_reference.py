"""Exact tests of the pure-MLX references (they are the oracle the kernels are checked against)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import mlx.core as mx
import pytest

import vq_kernels as vk

REF = "reference"


@pytest.fixture(autouse=True)
def _on_cpu() -> Iterator[None]:
    """The references are exact on the CPU; GPU matmuls may round differently (TF32)."""
    with mx.stream(mx.cpu):
        yield


def test_three_bit_layout_straddles_words_by_hand() -> None:
    codes = mx.array([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 6, 5]], dtype=mx.uint8)
    # code i sits at stream bits [3i, 3i + 3); code 10 (= 0b110) covers bits 30, 31 | 32.
    word0 = 1 | 2 << 3 | 3 << 6 | 4 << 9 | 5 << 12 | 6 << 15 | 7 << 18 | 0 << 21
    word0 |= 1 << 24 | 2 << 27 | (6 & 0b11) << 30
    word1 = (6 >> 2) | 5 << 1
    words = vk.pack_bits(codes, 3, backend=REF)
    assert words.dtype == mx.uint32
    assert words.tolist() == [[word0, word1]]
    assert vk.unpack_bits(words, 3, 12, backend=REF).tolist() == [codes.tolist()[0]]


def test_one_bit_and_eight_bit_layout_by_hand() -> None:
    bits1 = mx.array([[1, 0, 1, 1] + [0] * 28 + [1]], dtype=mx.uint32)
    assert vk.pack_bits(bits1, 1, backend=REF).tolist() == [[0b1101, 1]]
    b8 = mx.array([[0x11, 0x22, 0x33, 0x44, 0x55]], dtype=mx.uint32)
    assert vk.pack_bits(b8, 8, backend=REF).tolist() == [[0x44332211, 0x55]]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 100, 128])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    codes = mx.random.randint(0, 1 << bits, (3, 2, n), key=mx.random.key(bits * 1000 + n))
    words = vk.pack_bits(codes, bits, backend=REF)
    assert words.shape == (3, 2, math.ceil(n * bits / 32))
    assert mx.array_equal(vk.unpack_bits(words, bits, n, backend=REF), codes.astype(mx.uint32))
    # unused high bits of the last word are zero
    used = n * bits - (words.shape[-1] - 1) * 32
    if used < 32:
        assert mx.all((words[..., -1] >> used) == 0).item()


def test_codebook_quantize_by_hand() -> None:
    c = mx.array([-0.6, -0.2, 0.2, 0.6])
    y = mx.array([[3.0, -4.0, 0.0, 0.0]])  # norm 5 -> v = (0.6, -0.8, 0, 0)
    packed, norm = vk.codebook_quantize(y, c, 2, backend=REF)
    # idx = (3, 0, 1 or 2 -> first minimum 1, 1)
    assert packed.tolist() == [[3 | 0 << 2 | 1 << 4 | 1 << 6]]
    assert norm.dtype == mx.float16 and norm.tolist() == [5.0]
    rec = vk.codebook_dequantize(packed, norm, c, 2, 4, backend=REF)
    assert mx.allclose(rec, mx.array([[3.0, -3.0, -1.0, -1.0]])).item()


def test_codebook_zero_vector_has_zero_norm_and_no_nan() -> None:
    c = mx.array([-0.5, -0.1, 0.1, 0.5])
    packed, norm = vk.codebook_quantize(mx.zeros((2, 8)), c, 2, backend=REF)
    assert norm.tolist() == [0.0, 0.0]
    rec = vk.codebook_dequantize(packed, norm, c, 2, 8, backend=REF)
    assert not mx.any(mx.isnan(rec)).item() and mx.all(rec == 0).item()


def _naive_attention(q, k, v, scale):
    """Loop-free but independent: per query head, softmax over tokens with mx.softmax."""
    g = q.shape[1] // k.shape[1]
    k = mx.repeat(k, g, axis=1)
    v = mx.repeat(v, g, axis=1)
    s = scale * (q @ k.swapaxes(-1, -2))
    m = mx.max(s, axis=-1, keepdims=True)
    lse = (m + mx.log(mx.sum(mx.exp(s - m), axis=-1, keepdims=True)))[..., 0]
    return mx.softmax(s, axis=-1) @ v, lse


def _codebook_case(seed: int, d: int, hkv: int, g: int, lq: int, lbuf: int, kb: int, vb: int):
    ks = mx.random.split(mx.random.key(seed), 8)
    ck = mx.sort(mx.random.normal((1 << kb,), key=ks[0]) * 0.1)
    cv = mx.sort(mx.random.normal((1 << vb,), key=ks[1]) * 0.1)
    kp = vk.pack_bits(mx.random.randint(0, 1 << kb, (2, hkv, lbuf, d), key=ks[2]), kb, backend=REF)
    vp = vk.pack_bits(mx.random.randint(0, 1 << vb, (2, hkv, lbuf, d), key=ks[3]), vb, backend=REF)
    kn = (mx.random.uniform(0.5, 2.0, (2, hkv, lbuf), key=ks[4]) * 8).astype(mx.float16)
    vn = mx.random.uniform(0.5, 2.0, (2, hkv, lbuf), key=ks[5]).astype(mx.float16)
    q = mx.random.normal((2, hkv * g, lq, d), key=ks[6])
    return q, kp, kn, ck, vp, vn, cv


@pytest.mark.parametrize(("g", "lq", "length"), [(1, 1, 37), (4, 1, 100), (3, 2, 64)])
def test_codebook_attention_reference_matches_naive(g: int, lq: int, length: int) -> None:
    d, hkv, lbuf = 16, 2, 128
    q, kp, kn, ck, vp, vn, cv = _codebook_case(7, d, hkv, g, lq, lbuf, 3, 2)
    out, lse = vk.codebook_decode_attention(
        q, kp, kn, ck, 3, vp, vn, cv, 2, scale=0.25, length=length, backend=REF
    )
    k = vk.codebook_dequantize(kp[:, :, :length], kn[:, :, :length], ck, 3, d, backend=REF)
    v = vk.codebook_dequantize(vp[:, :, :length], vn[:, :, :length], cv, 2, d, backend=REF)
    want, want_lse = _naive_attention(q, k, v, 0.25)
    assert out.shape == (2, hkv * g, lq, d) and lse.shape == (2, hkv * g, lq)
    assert mx.allclose(out, want, atol=1e-5).item()
    assert mx.allclose(lse, want_lse, atol=1e-5).item()


def test_codebook_attention_per_row_lengths() -> None:
    """lengths [B]: row b attends to its own first lengths[b] tokens; bad lengths are refused."""
    q, kp, kn, ck, vp, vn, cv = _codebook_case(3, 16, 2, 2, 1, 40, 2, 3)
    args = (q, kp, kn, ck, 2, vp, vn, cv, 3)
    out, lse = vk.codebook_decode_attention(
        *args, scale=0.25, lengths=mx.array([5, 40], dtype=mx.int32), backend=REF
    )
    for i, n in enumerate((5, 40)):
        one = (q[i : i + 1], kp[i : i + 1], kn[i : i + 1], ck, 2, vp[i : i + 1], vn[i : i + 1])
        o1, l1 = vk.codebook_decode_attention(*one, cv, 3, scale=0.25, length=n, backend=REF)
        assert (
            mx.array_equal(out[i : i + 1], o1).item() and mx.array_equal(lse[i : i + 1], l1).item()
        )
    with pytest.raises(ValueError, match="lengths must have shape"):
        vk.codebook_decode_attention(*args, scale=0.25, lengths=mx.array([5]), backend=REF)
    with pytest.raises(ValueError, match="not both"):
        vk.codebook_decode_attention(
            *args, scale=0.25, length=3, lengths=mx.array([5, 4]), backend=REF
        )
    with pytest.raises(ValueError, match="integers"):
        vk.codebook_decode_attention(*args, scale=0.25, lengths=mx.array([5.0, 4.0]), backend=REF)


def test_codebook_attention_divisor_and_unit_keys() -> None:
    """k_divisor and k_unit give keys norm / divisor * c[idx] / ||c[idx]||."""
    q, kp, kn, ck, vp, vn, cv = _codebook_case(4, 16, 1, 2, 1, 30, 2, 2)
    div = mx.random.uniform(0.5, 1.0, kn.shape, key=mx.random.key(1)).astype(mx.float16)
    out, lse = vk.codebook_decode_attention(
        q, kp, kn, ck, 2, vp, vn, cv, 2, scale=0.3, k_divisor=div, k_unit=True, backend=REF
    )
    levels = vk.codebook_dequantize(kp, mx.ones(kn.shape), ck, 2, 16, backend=REF)
    w = kn.astype(mx.float32) / div.astype(mx.float32) / mx.linalg.norm(levels, axis=-1)
    v = vk.codebook_dequantize(vp, vn, cv, 2, 16, backend=REF)
    want, want_lse = _naive_attention(q, levels * w[..., None], v, 0.3)
    assert mx.allclose(out, want, atol=1e-5).item() and mx.allclose(lse, want_lse, atol=1e-5).item()
    with pytest.raises(ValueError, match="k_divisor must have"):
        vk.codebook_decode_attention(
            q, kp, kn, ck, 2, vp, vn, cv, 2, scale=0.3, k_divisor=div[:, :, :3], backend=REF
        )


def test_attention_over_zero_tokens_is_empty() -> None:
    q, kp, kn, ck, vp, vn, cv = _codebook_case(1, 16, 1, 2, 1, 8, 2, 2)
    out, lse = vk.codebook_decode_attention(
        q, kp, kn, ck, 2, vp, vn, cv, 2, scale=1.0, length=0, backend=REF
    )
    assert mx.all(out == 0).item() and mx.all(lse == -mx.inf).item()


def test_pq_reference_matches_naive() -> None:
    ks = mx.random.split(mx.random.key(3), 5)
    d, m, kc, hkv, g, lbuf, length = 32, 8, 16, 2, 4, 50, 45
    cent_k = mx.random.normal((m, kc, d // m), key=ks[0])
    cent_v = mx.random.normal((m, kc, d // m), key=ks[1])
    kcodes = mx.random.randint(0, kc, (1, hkv, lbuf, m), key=ks[2]).astype(mx.uint8)
    vcodes = mx.random.randint(0, kc, (1, hkv, lbuf, m), key=ks[3]).astype(mx.uint8)
    q = mx.random.normal((1, hkv * g, 1, d), key=ks[4])
    out, lse = vk.pq_decode_attention(
        q, kcodes, cent_k, vcodes, cent_v, scale=0.2, length=length, backend=REF
    )

    # reconstruct by hand: token i of head h = concat_m cent[m, code[h, i, m]]
    def rec(codes, cent):
        rows = [[mx.concatenate([cent[j, int(codes[0, h, i, j])] for j in range(m)])
                 for i in range(length)] for h in range(hkv)]  # fmt: skip
        return mx.stack([mx.stack(r) for r in rows])[None]

    want, want_lse = _naive_attention(q, rec(kcodes, cent_k), rec(vcodes, cent_v), 0.2)
    assert mx.allclose(out, want, atol=1e-5).item()
    assert mx.allclose(lse, want_lse, atol=1e-5).item()


def test_sign_references_by_hand() -> None:
    k = vk.pack_bits(mx.array([[1, 1, 0], [1, 0, 1]]), 1, backend=REF)[None]  # [1, L=2, W]
    # qint = (5, 2, 7) as planes p0 = (1,0,1), p1 = (0,1,1), p2 = (1,0,1)
    planes = vk.pack_bits(mx.array([[1, 0, 1], [0, 1, 1], [1, 0, 1]]), 1, backend=REF)
    out = vk.sign_dot_planes(planes[None, None], k, 3, backend=REF)
    assert out.tolist() == [[[5 + 2, 5 + 7]]]


def test_affine_attention_matches_naive() -> None:
    ks = mx.random.split(mx.random.key(5), 3)
    k = mx.random.normal((1, 2, 40, 64), key=ks[0])
    v = mx.random.normal((1, 2, 40, 64), key=ks[1])
    q = mx.random.normal((1, 4, 1, 64), key=ks[2])
    kq, vq = mx.quantize(k, group_size=32, bits=4), mx.quantize(v, group_size=32, bits=4)
    out, lse = vk.affine_decode_attention(q, kq, vq, scale=0.125, group_size=32, bits=4, length=33)
    kd = mx.dequantize(*kq, group_size=32, bits=4)[:, :, :33]
    vd = mx.dequantize(*vq, group_size=32, bits=4)[:, :, :33]
    want, want_lse = _naive_attention(q, kd, vd, 0.125)
    assert mx.allclose(out, want, atol=1e-5).item() and mx.allclose(lse, want_lse, atol=1e-5).item()


def test_affine_attention_per_row_lengths_and_bad_input() -> None:
    ks = mx.random.split(mx.random.key(6), 3)
    k = mx.random.normal((2, 1, 20, 64), key=ks[0]).astype(mx.float16)
    q = mx.random.normal((2, 2, 1, 64), key=ks[2])
    kq = mx.quantize(k, group_size=64, bits=4)
    kw = {"scale": 0.125, "group_size": 64, "bits": 4, "backend": REF}
    out, lse = vk.affine_decode_attention(q, kq, kq, lengths=mx.array([7, 20]), **kw)
    for i, n in enumerate((7, 20)):
        one = tuple(a[i : i + 1] for a in kq)
        o1, l1 = vk.affine_decode_attention(q[i : i + 1], one, one, length=n, **kw)
        assert (
            mx.array_equal(out[i : i + 1], o1).item() and mx.array_equal(lse[i : i + 1], l1).item()
        )
    with pytest.raises(ValueError, match="bits in"):
        vk.affine_decode_attention(q, kq, kq, scale=0.1, group_size=48, bits=4)
    with pytest.raises(ValueError, match="do not match"):
        vk.affine_decode_attention(q, kq, kq, scale=0.1, group_size=64, bits=8)


def test_affine_kernel_formats() -> None:
    """The kernel's formats are the reference's, less head dims it is not built for and
    per-channel key blocks shorter than one loop step's token lanes (128 / (d / 8))."""
    assert vk.affine_kernel_format_supported(128, 4, 64)
    assert vk.affine_kernel_format_supported(64, 2, 16, "channel")  # 16 lanes
    assert not vk.affine_kernel_format_supported(32, 2, 16, "channel")  # 32 lanes
    assert vk.affine_format_supported(32, 2, 16, "channel")  # the reference takes it
    assert not vk.affine_kernel_format_supported(96, 4, 32)  # head_dim 96: no kernel
    assert not vk.affine_kernel_format_supported(128, 7, 64)
    with pytest.raises(ValueError, match="token lanes"):
        vk.affine_attention.tokens_per_lane(32, 16, "channel")


def test_backend_choice() -> None:
    assert vk.resolve_backend("reference") == "reference"
    with pytest.raises(ValueError, match="unknown"):
        vk.resolve_backend("opencl")
