"""The native CPU :func:`~vq_kernels.codebook_decode_attention` (``cpu/codebook_attn.cpp``).

The inputs are evaluated (``mx.eval``: the op needs their values now, so it cannot run
inside ``mx.compile`` or ``mx.vmap``), read in place through MLX's buffer protocol (zero
copy; arrays that are not row-contiguous, and other dtypes, are converted first), and the
C function writes the outputs into host buffers that become the returned arrays. Work is
spread over ``$VQ_KERNELS_THREADS`` threads (default: the CPUs this process may use).
"""

from __future__ import annotations

import ctypes
import functools
import os

import mlx.core as mx

from vq_kernels import _cpu
from vq_kernels._backend import KernelError

THREADS_VAR = "VQ_KERNELS_THREADS"
MIN_CHUNK_TOKENS = 512  # fewest tokens one thread's work item takes (threads pay above it)

_p = ctypes.c_void_p
_i = ctypes.c_int32


class _Args(ctypes.Structure):
    """``struct VqCodebookAttn`` of ``cpu/codebook_attn.cpp``, field by field."""

    _fields_ = [
        *[(n, _i) for n in ("batch", "hq", "hkv", "lq", "d", "lbuf")],
        *[(n, _p) for n in ("q", "k_words", "k_norm", "k_divisor", "k_codebook")],
        ("k_bits", _i), ("k_unit", _i),
        *[(n, _p) for n in ("v_words", "v_norm", "v_codebook")],
        ("v_bits", _i), ("t_bits", _i),
        *[(n, _p) for n in ("t_q", "t_words", "t_norm", "t_codebook")],
        ("t_scale", ctypes.c_float), ("scale", ctypes.c_float),
        *[(n, _p) for n in ("lengths", "out", "lse")],
        ("threads", _i), ("min_chunk", _i), ("scalar", _i),
    ]  # fmt: skip


@functools.cache
def _function(explicit: bool):
    lib = _cpu.library("codebook_attn", explicit=explicit)
    if lib is None:
        return None
    fn = lib.vq_codebook_attn
    fn.argtypes = [ctypes.POINTER(_Args)]
    fn.restype = ctypes.c_int
    return fn


def available(*, explicit: bool) -> bool:
    """Whether the native code is built and loaded (building it now if needed); raises
    KernelError if it cannot be and ``explicit`` (see :func:`vq_kernels._cpu.library`)."""
    return _function(explicit) is not None


def threads() -> int:
    """``$VQ_KERNELS_THREADS``, else the number of CPUs this process may run on."""
    if os.environ.get(THREADS_VAR):
        return max(1, int(os.environ[THREADS_VAR]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def host_pointer(a: mx.array) -> tuple[int, memoryview]:
    """``a``'s data address (an evaluated, row-contiguous array) and the memoryview that
    keeps it exported; MLX's buffer protocol hands out its own buffer, no copy."""
    view = memoryview(a)
    if not view.c_contiguous:
        raise KernelError(f"a {a.shape} array is not row-contiguous on the host")
    if view.nbytes == 0:
        return 0, view
    flat = view.cast("B")
    return ctypes.addressof(ctypes.c_char.from_buffer(flat)), flat


def _prepared(a: mx.array, dtype: mx.Dtype) -> mx.array:
    """``a`` in ``dtype``, row-contiguous (a copy only where it is not already)."""
    a = a if a.dtype == dtype else a.astype(dtype)
    return mx.contiguous(a)


def codebook_attention_cpu(
    q, kp, kn, kc, kb, vp, vn, vc, vb, *, scale, lengths, k_divisor, k_unit, k_term,
    explicit, scalar=False,
) -> tuple[mx.array, mx.array]:  # fmt: skip
    """Run ``codebook_attn.cpp`` on arguments :func:`codebook_decode_attention` checked.

    ``lengths``: an int (every row) or an int32 [B] array. ``scalar``: the portable loop
    even where the AVX2 one is compiled in (tests). Returns out fp32 [B, Hq, Lq, D] and
    natural lse fp32 [B, Hq, Lq].
    """
    fn = _function(explicit)
    if fn is None:
        raise KernelError("vq-kernels' native CPU code is unavailable")
    b, hq, lq, d = q.shape
    _, hkv, lbuf, _ = kp.shape
    if isinstance(lengths, int):
        lengths = mx.full((b,), lengths, mx.int32)
    f16, f32, u32 = mx.float16, mx.float32, mx.uint32
    named = {
        "q": (q, f32), "k_words": (kp, u32), "k_norm": (kn, f16), "k_codebook": (kc, f32),
        "v_words": (vp, u32), "v_norm": (vn, f16), "v_codebook": (vc, f32),
        "lengths": (lengths, mx.int32),
    }  # fmt: skip
    if k_divisor is not None:
        named["k_divisor"] = (k_divisor, f16)
    if k_term is not None:
        named |= {
            "t_q": (k_term.q_term, f32), "t_words": (k_term.codes, u32),
            "t_norm": (k_term.norm, f16), "t_codebook": (k_term.codebook, f32),
        }  # fmt: skip
    arrays = {k: _prepared(a, dt) for k, (a, dt) in named.items()}
    try:
        mx.eval(*arrays.values())
    except ValueError as exc:  # inside mx.compile / mx.vmap: no values to hand to C
        raise KernelError(
            "the native CPU codebook attention needs its inputs' values and cannot run "
            "inside mx.compile or mx.vmap; use backend='reference' there"
        ) from exc
    keep, args = [], _Args()
    for key, a in arrays.items():
        ptr, view = host_pointer(a)
        keep.append(view)
        setattr(args, key, ptr)
    out = (ctypes.c_float * (b * hq * lq * d))()
    lse = (ctypes.c_float * (b * hq * lq))()
    args.out, args.lse = ctypes.addressof(out), ctypes.addressof(lse)
    args.batch, args.hq, args.hkv, args.lq, args.d, args.lbuf = b, hq, hkv, lq, d, lbuf
    args.k_bits, args.k_unit, args.v_bits = kb, int(bool(k_unit)), vb
    args.t_bits = 0 if k_term is None else k_term.bits
    args.t_scale = 0.0 if k_term is None else float(k_term.scale)
    args.scale, args.threads, args.min_chunk = float(scale), threads(), MIN_CHUNK_TOKENS
    args.scalar = int(scalar)
    status = fn(ctypes.byref(args))
    if status != 0:
        raise KernelError(f"codebook_attn.cpp rejected its arguments (status {status})")
    out_a = mx.array(memoryview(out).cast("B")).view(f32).reshape(b, hq, lq, d)
    lse_a = mx.array(memoryview(lse).cast("B")).view(f32).reshape(b, hq, lq)
    return out_a, lse_a
