"""Deterministic fuzz classifier of vq's public API, over every registered method.

Every case calls one public entry point with one argument made good or bad and is put in
one of four classes:

* ``clear``: a vq error (a :class:`vq_core.VQError`) whose message names the argument;
* ``correct``: a result of the right shape, finite (or, for a non-finite query or
  probability, NaN exactly where exact math puts it), within the method's error bound;
* ``silent``: a result that is wrong-shaped, non-finite or beyond its bound;
* ``crash``: any other exception (MLX-internal messages, TypeError, KeyError, ...), or a vq
  error that does not name the argument.

"Within the bound": round trips of Gaussian vectors reach at most ``SLACK`` times the
method's stated ``round_trip_bound`` (stated at head_dim 128); all-zero input decodes to at
most the bound times a unit-variance vector's energy; compressed-domain ``scores`` and
``weighted_sum`` equal decode-then-matmul to float32 accuracy. Config variants other than
bits/head_dim (whose bound the method does not state) must round-trip finite, shaped and
exactly as many bytes as ``bits_per_element`` says; so must a calibrated method's untrained
neighbour at a head_dim other than 128 (its bound is stated there only), which must also beat
decoding zeros (relative error < 1). With ``check_finite=False`` encode checks no values (its
documented contract): then only the codes' layout is checked. A valid input refused with a vq error
counts as clear and is listed again as ``refused_valid``.

    uv run --frozen python tools/fuzz_api.py [--json] [--method NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

import vq_algorithms  # noqa: F401  (registers every method)
from vq_core import Codes, VQError, attend, available, create, get, make_cache

SLACK = 1.25
N_VECTORS = 256
CLASSES = ("clear", "correct", "silent", "crash")


@dataclass
class Case:
    method: str
    entry: str
    name: str
    arg: str  # what a clear error must name
    run: Callable[[], Any]
    check: Callable[[Any], str | None]  # None when the result is correct, else why not
    valid: bool = False


def gauss(shape, seed=0, dtype=mx.float32):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def rel_err(x, xh) -> float:
    x, xh = x.astype(mx.float32), xh.astype(mx.float32)
    return (((xh - x) ** 2).sum() / (x**2).sum()).item()


def finite(a) -> bool:
    return bool(mx.isfinite(a).all().item())


def bound_of(q, bits=None) -> float:
    return type(q).round_trip_bound.get(bits if bits is not None else q.config.bits, math.inf)


def scale_free(q) -> bool:
    """Whether the method codes a vector's scale (a norm or per-group scales); VecInfer's
    product codebooks are fixed-scale, documented as suited to unit-variance input."""
    return q.method != "vecinfer"


def layout_problem(q, codes, lead) -> str | None:
    if not isinstance(codes, dict):
        return f"encode returned {type(codes).__name__}"
    layout = q.field_layout()
    if set(codes) != set(layout):
        return f"fields {sorted(codes)} != layout {sorted(layout)}"
    for name, (trail, dtype) in layout.items():
        a = codes[name]
        want = (*lead, *trail)
        if tuple(a.shape) != want or a.dtype != dtype:
            return f"{name} is {a.dtype}{tuple(a.shape)}, layout says {dtype}{want}"
    return None


def round_trip_check(q, x, *, bits=None, bounded=True, limit=None):
    """Check for ``encode(x)``: codes laid out as declared, exact bytes, decode in bound."""

    def check(codes):
        lead = tuple(x.shape[:-1])
        bad = layout_problem(q, codes, lead)
        if bad:
            return bad
        n = math.prod(lead)
        if n and codes.nbytes * 8 != round(q.bits_per_element * n * q.head_dim):
            return f"nbytes {codes.nbytes} != bits_per_element {q.bits_per_element}"
        xh = q.decode(codes)
        if tuple(xh.shape) != tuple(x.shape):
            return f"decode shape {tuple(xh.shape)} != {tuple(x.shape)}"
        if not finite(xh):
            return "decode is not finite"
        if n == 0 or not bounded:
            return None
        energy = (x.astype(mx.float32) ** 2).sum().item()
        if energy == 0:
            most = bound_of(q, bits) * SLACK * n * q.head_dim
            got = (xh**2).sum().item()
            return None if got <= most else f"zero input decodes to energy {got:.3g}"
        err = rel_err(x, xh)
        most = bound_of(q, bits) * SLACK if limit is None else limit
        return None if err <= most else f"relative error {err:.4g} > {most:.4g}"

    return check


def quantizer_check(bits=None, bounded=True):
    """Check for ``create``: the quantizer round-trips Gaussian vectors."""

    def check(q):
        x = gauss((N_VECTORS, q.head_dim), seed=3)
        limit = None
        if q.needs_calibration and q.head_dim != 128 and bounded:
            limit = 1.0  # untrained neighbour off its stated size: better than zeros
        return round_trip_check(q, x, bits=bits, bounded=bounded, limit=limit)(q.encode(x))

    return check


def expect_raise(_result) -> str:
    return "returned a result for an invalid input"


def close_to(ref_fn, shape):
    """Check a compressed-domain result against decode-then-matmul (NaN where ref is)."""

    def check(out):
        if not isinstance(out, mx.array):
            return f"returned {type(out).__name__}"
        if tuple(out.shape) != tuple(shape):
            return f"shape {tuple(out.shape)} != {tuple(shape)}"
        ref = ref_fn()
        if out.size == 0:
            return None
        if not mx.array_equal(mx.isnan(out), mx.isnan(ref)).item():
            return "NaN pattern differs from decode-then-matmul"
        ok = mx.isfinite(ref)
        if not mx.array_equal(mx.isfinite(out), ok).item():
            return "non-finite where decode-then-matmul is finite"
        o, r = mx.where(ok, out, 0), mx.where(ok, ref, 0)
        tol = 1e-3 * mx.abs(r).max().item() + 1e-5
        diff = mx.abs(o - r).max().item()
        return None if diff <= tol else f"differs from decode-then-matmul by {diff:.3g}"

    return check


# -- case generators ---------------------------------------------------------------------


def base_options(method: str) -> dict:
    """Options every case of ``method`` starts from: a calibrated method without an artifact
    runs only when its untrained codebooks are asked for."""
    fields = {f.name for f in dataclasses.fields(get(method).config_class)}
    return {"untrained": True} if "untrained" in fields else {}


def make(method: str, **config):
    """``create(method, ...)`` from :func:`base_options`, ``config`` taking precedence."""
    return create(method, **{**base_options(method), **config})


def default_head_dim(method: str) -> int:
    return 128


def create_cases(method: str):
    cls = get(method)
    allowed = cls.config_class.allowed_bits
    for b in allowed:
        yield Case(method, "create", f"bits={b}", "bits",
                   lambda b=b: make(method, bits=b), quantizer_check(bits=b), valid=True)  # fmt: skip
    bad_bits = [0, -1, max(allowed) + 1, 16, 7, float(allowed[0]), 2.0, 4.5, True, False,
                "4", None]  # fmt: skip
    bad_bits = [b for i, b in enumerate(bad_bits) if repr(b) not in map(repr, bad_bits[:i])]
    for b in bad_bits:
        if isinstance(b, int) and not isinstance(b, bool) and b in allowed:
            continue
        yield Case(method, "create", f"bits={b!r}", "bits",
                   lambda b=b: make(method, bits=b), quantizer_check())  # fmt: skip
    min_bits = min(allowed)
    for d in [-8, 0, 1, 2, 3, 4, 5, 7, 8, 12, 16, 20, 24, 30, 32, 48, 63, 64, 65, 80, 96,
              100, 112, 120, 127, 129, 160, 192, 256, 384, 512, 1024, 4096]:  # fmt: skip
        b = min_bits if d > 1024 else cls.config_class.bits
        yield Case(method, "create", f"head_dim={d}", "head_dim",
                   lambda d=d, b=b: make(method, head_dim=d, bits=b),
                   quantizer_check(bits=b))  # fmt: skip
    for d in [128.0, True, "128", None]:
        yield Case(method, "create", f"head_dim={d!r}", "head_dim",
                   lambda d=d: make(method, head_dim=d), quantizer_check())  # fmt: skip
    for s in [-1, 1.5, True, "0", None, 2**70]:
        yield Case(method, "create", f"seed={s!r}", "seed",
                   lambda s=s: make(method, seed=s), quantizer_check())  # fmt: skip
    yield Case(method, "create", "unknown option", "nonexistent",
               lambda: make(method, nonexistent=1), quantizer_check())  # fmt: skip
    for f in dataclasses.fields(cls.config_class):
        if f.name in ("head_dim", "bits", "seed"):
            continue
        for v in field_values(f.default):
            yield Case(method, "create", f"{f.name}={v!r}", f.name,
                       lambda f=f, v=v: make(method, **{f.name: v}),
                       quantizer_check(bounded=False))  # fmt: skip


def field_values(default):
    if isinstance(default, bool):
        return [True, False, 1, "yes", None]
    if isinstance(default, int):
        return [default, 0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, -1, 1.5, True,
                "x", None, 10**9]  # fmt: skip
    if isinstance(default, str):
        return [default, "channel", "token", "k", "v", "hadamard", "orthogonal", "identity",
                "auto", "bogus", "/nonexistent/artifact.safetensors", 1, None]  # fmt: skip
    if default is None:  # optional ints (e.g. qjl's sketch_dim)
        return [None, 32, 64, 128, 100, 256, 0, -1, 1.5, True, "x"]
    return [default, None]


def encode_cases(method: str):
    d = default_head_dim(method)
    q = make(method, head_dim=d)
    scaled = scale_free(q)

    def enc(x, **kw):
        return lambda: q.encode(x, **kw)

    for shape in [(2, 3, 17, d), (1, 2, 0, d), (0, d), (d,), (3, 5, d), (2, 2, 2, 2, d)]:
        x = gauss(shape)
        yield Case(method, "encode", f"shape={shape}", "x", enc(x),
                   round_trip_check(q, x, bounded=len(shape) > 1), valid=True)  # fmt: skip
    for shape in [(), (4, d - 1), (4, d + 1), (4, 2 * d), (4, 1)]:
        x = gauss(shape)
        yield Case(method, "encode", f"shape={shape}", "x", enc(x), expect_raise)
    for dt in [mx.int32, mx.uint32, mx.bool_, mx.float64, mx.complex64, mx.int8]:
        x = gauss((4, d)).astype(dt)
        yield Case(method, "encode", f"dtype={dt}", "x", enc(x), expect_raise)
    for dt in [mx.float16, mx.bfloat16]:
        x = gauss((64, d)).astype(dt)
        yield Case(method, "encode", f"dtype={dt}", "x", enc(x),
                   round_trip_check(q, x), valid=True)  # fmt: skip
    for obj in [[0.0] * d, None, "x", 3.0]:
        yield Case(method, "encode", f"x={type(obj).__name__}", "x", enc(obj), expect_raise)
    zeros = mx.zeros((8, d))
    yield Case(method, "encode", "all zeros", "x", enc(zeros),
               round_trip_check(q, zeros), valid=True)  # fmt: skip
    one_zero = mx.concatenate([gauss((7, d)), mx.zeros((1, d))])
    yield Case(method, "encode", "one zero vector", "x", enc(one_zero),
               round_trip_check(q, one_zero), valid=True)  # fmt: skip
    for s, valid in [(300.0, True), (1e-3, True), (1e4, False), (1e6, False), (1e30, False)]:
        x = gauss((N_VECTORS, d)) * s
        yield Case(method, "encode", f"x*{s:g}", "x", enc(x),
                   round_trip_check(q, x, bounded=scaled), valid=valid)  # fmt: skip
    big = gauss((N_VECTORS, d)) * 1e4  # norms ~1.1e5 > 65504 (float16's largest)
    yield Case(method, "encode", "norm>65504 check_finite=False", "x",
               enc(big, check_finite=False),
               lambda c: layout_problem(q, c, tuple(big.shape[:-1])))  # fmt: skip
    for bad in [mx.nan, mx.inf, -mx.inf]:
        x = gauss((4, d))
        x[1, 3] = bad
        yield Case(method, "encode", f"x holds {bad}", "x", enc(x), expect_raise)
        yield Case(method, "encode", f"x holds {bad} check_finite=False", "x",
                   enc(x, check_finite=False),
                   lambda c, x=x: layout_problem(q, c, tuple(x.shape[:-1])))  # fmt: skip
    if q.position_aware or method == "comm_vq":
        for s in [-1, 1.5, True, "0"]:
            yield Case(method, "encode", f"start={s!r}", "start",
                       enc(gauss((1, 1, 4, d)), start=s), expect_raise)  # fmt: skip


def _tamper(codes: Codes, name: str, fn) -> Codes:
    out = Codes(codes)
    out[name] = fn(codes[name])
    return out


def decode_cases(method: str):
    d = default_head_dim(method)
    q = make(method, head_dim=d)
    x = gauss((2, 3, 17, d))
    codes = q.encode(x)
    mx.eval(codes)
    lead_nd = 3

    def dec(c, **kw):
        return lambda: q.decode(c, **kw)

    yield Case(method, "decode", "valid", "codes", dec(codes),
               lambda xh: round_trip_check(q, x)(codes), valid=True)  # fmt: skip
    yield Case(method, "decode", "plain dict", "codes", dec(dict(codes)),
               lambda xh: None if tuple(xh.shape) == tuple(x.shape) else "shape",
               valid=True)  # fmt: skip
    empty = codes.map(lambda _, a: a[:, :, :0])
    yield Case(method, "decode", "0 tokens", "codes", dec(empty),
               lambda xh: None if tuple(xh.shape) == (2, 3, 0, d) else f"shape {xh.shape}",
               valid=True)  # fmt: skip
    for obj in [None, [1, 2], "codes", Codes()]:
        yield Case(method, "decode", f"codes={type(obj).__name__}", "codes", dec(obj),
                   expect_raise)  # fmt: skip
    extra = Codes(codes)
    extra["bogus"] = mx.zeros((2, 3, 17), dtype=mx.uint8)
    yield Case(method, "decode", "extra field", "bogus", dec(extra), expect_raise)
    for name, arr in codes.items():
        missing = Codes({k: v for k, v in codes.items() if k != name})
        yield Case(method, "decode", f"missing {name}", name, dec(missing), expect_raise)
        if arr.ndim > lead_nd:
            cut = _tamper(codes, name, lambda a: a[..., :-1])
            yield Case(method, "decode", f"{name} truncated by one word", name, dec(cut),
                       expect_raise)  # fmt: skip
            longer = _tamper(codes, name, lambda a: mx.concatenate([a, a[..., :1]], -1))
            yield Case(method, "decode", f"{name} one word longer", name, dec(longer),
                       expect_raise)  # fmt: skip
        for what, cut in [
            ("holds 16 of 17 tokens", lambda a: a[:, :, :16]),
            ("batch 1 of 2", lambda a: a[:1]),
            ("one rank less", lambda a: a[0]),
        ]:
            bad = _tamper(codes, name, cut)
            if len(codes) > 1:  # the fields now disagree
                yield Case(method, "decode", f"{name} {what}", name, dec(bad), expect_raise)
            else:  # one field: consistent codes of another shape
                want = (*bad[name].shape[: lead_nd + bad[name].ndim - arr.ndim], d)
                yield Case(method, "decode", f"{name} {what}", name, dec(bad),
                           lambda xh, w=want: None if tuple(xh.shape) == w else "shape",
                           valid=True)  # fmt: skip
        wrong_dt = mx.float32 if arr.dtype != mx.float32 else mx.int32
        cast = _tamper(codes, name, lambda a, t=wrong_dt: a.astype(t))
        yield Case(method, "decode", f"{name} as {wrong_dt}", name, dec(cast), expect_raise)
        listed = _tamper(codes, name, lambda a: a.tolist())
        yield Case(method, "decode", f"{name} as a list", name, dec(listed), expect_raise)
    if q.position_aware or method == "comm_vq":
        for s in [-1, 1.5, True]:
            yield Case(method, "decode", f"start={s!r}", "start", dec(codes, start=s),
                       expect_raise)  # fmt: skip


def attention_cases(method: str):
    d = default_head_dim(method)
    q = make(method, head_dim=d)
    codes = q.encode(gauss((2, 3, 17, d), seed=1))
    mx.eval(codes)
    k_hat = q.decode(codes)
    empty = codes.map(lambda _, a: a[:, :, :0])

    def sc(qq, c=codes):
        return lambda: q.scores(qq, c)

    def ws(pp, c=codes):
        return lambda: q.weighted_sum(pp, c)

    def ref_s(qq, kh=k_hat):
        return lambda: qq.astype(mx.float32) @ mx.swapaxes(kh, -1, -2)

    def ref_w(pp, kh=k_hat):
        return lambda: pp.astype(mx.float32) @ kh

    qv = gauss((2, 3, 5, d), seed=2)
    yield Case(method, "scores", "valid", "q", sc(qv), close_to(ref_s(qv), (2, 3, 5, 17)), True)
    q16 = qv.astype(mx.float16)
    yield Case(method, "scores", "q float16", "q", sc(q16),
               close_to(ref_s(q16), (2, 3, 5, 17)), True)  # fmt: skip
    q0 = gauss((2, 3, 0, d))
    yield Case(method, "scores", "0 queries", "q", sc(q0), close_to(ref_s(q0), (2, 3, 0, 17)),
               True)  # fmt: skip
    yield Case(method, "scores", "0 tokens", "q", sc(qv, empty),
               close_to(lambda: mx.zeros((2, 3, 5, 0)), (2, 3, 5, 0)), True)  # fmt: skip
    qn = mx.array(qv)
    qn[0, 1, 2, 3] = mx.nan
    yield Case(method, "scores", "q holds NaN", "q", sc(qn), close_to(ref_s(qn), (2, 3, 5, 17)),
               True)  # fmt: skip
    for shape in [(2, 3, 5, d - 1), (2, 3, 5, d + 1), (3, 5, d), (2, 3, 5, 1, d), (1, 3, 5, d),
                  (2, 1, 5, d), (4, 3, 5, d), (2, 6, 5, d), (d,)]:  # fmt: skip
        yield Case(method, "scores", f"q shape={shape}", "q", sc(gauss(shape)), expect_raise)
    for dt in [mx.int32, mx.bool_, mx.complex64]:
        yield Case(method, "scores", f"q dtype={dt}", "q", sc(qv.astype(dt)), expect_raise)
    yield Case(method, "scores", "q=list", "q", sc(qv.tolist()), expect_raise)
    first = next(iter(codes))
    cut = _tamper(codes, first, lambda a: a[:, :, :16])
    multi = len(codes) > 1  # with one field, ``cut`` is consistent codes of 16 tokens
    yield Case(method, "scores", f"{first} holds 16 of 17 tokens", first, sc(qv, cut),
               expect_raise if multi else close_to(ref_s(qv, q.decode(cut)), (2, 3, 5, 16)),
               valid=not multi)  # fmt: skip
    for name, arr in codes.items():
        if arr.ndim > 3:
            short = _tamper(codes, name, lambda a: a[..., :-1])
            yield Case(method, "scores", f"{name} truncated by one word", name, sc(qv, short),
                       expect_raise)  # fmt: skip
    yield Case(method, "scores", "codes missing a field", first,
               sc(qv, Codes({k: v for k, v in codes.items() if k != first})),
               expect_raise)  # fmt: skip

    p = mx.softmax(gauss((2, 3, 5, 17), seed=4), axis=-1)
    yield Case(method, "weighted_sum", "valid", "p", ws(p), close_to(ref_w(p), (2, 3, 5, d)),
               True)  # fmt: skip
    p0 = mx.zeros((2, 3, 0, 17))
    yield Case(method, "weighted_sum", "0 queries", "p", ws(p0),
               close_to(ref_w(p0), (2, 3, 0, d)), True)  # fmt: skip
    pe = mx.zeros((2, 3, 5, 0))
    yield Case(method, "weighted_sum", "0 tokens", "p", ws(pe, empty),
               close_to(lambda: mx.zeros((2, 3, 5, d)), (2, 3, 5, d)), True)  # fmt: skip
    pn = mx.array(p)
    pn[1, 0, 0, 4] = mx.nan
    yield Case(method, "weighted_sum", "p holds NaN", "p", ws(pn),
               close_to(ref_w(pn), (2, 3, 5, d)), True)  # fmt: skip
    for shape in [(2, 3, 5, 16), (2, 3, 5, 18), (3, 5, 17), (1, 3, 5, 17), (2, 1, 5, 17),
                  (2, 3, 5, 1, 17), (17,)]:  # fmt: skip
        pp = mx.softmax(gauss(shape), axis=-1)
        yield Case(method, "weighted_sum", f"p shape={shape}", "p", ws(pp), expect_raise)
    yield Case(method, "weighted_sum", "p dtype=int32", "p", ws(p.astype(mx.int32)),
               expect_raise)  # fmt: skip
    yield Case(method, "weighted_sum", "p=None", "p", ws(None), expect_raise)
    cut = _tamper(codes, first, lambda a: a[:, :, :16])
    yield Case(method, "weighted_sum", f"{first} holds 16 of 17 tokens",
               first if multi else "p", ws(p, cut), expect_raise)  # fmt: skip

    n_ok = lambda n: None if n == 17 else f"tokens_in = {n}"  # noqa: E731
    yield Case(method, "tokens_in", "valid", "codes", lambda: q.tokens_in(codes), n_ok, True)
    yield Case(method, "tokens_in", "plain dict", "codes", lambda: q.tokens_in(dict(codes)),
               n_ok, True)  # fmt: skip
    yield Case(method, "tokens_in", "empty codes", "codes", lambda: q.tokens_in(Codes()),
               expect_raise)  # fmt: skip
    yield Case(method, "tokens_in", "codes=None", "codes", lambda: q.tokens_in(None),
               expect_raise)  # fmt: skip
    for axis in [7, -9, "2", 1.5]:
        yield Case(method, "tokens_in", f"axis={axis!r}", "axis",
                   lambda a=axis: q.tokens_in(codes, axis=a), expect_raise)  # fmt: skip
    yield Case(method, "tokens_in", f"{first} holds 16 of 17 tokens", first,
               lambda: q.tokens_in(cut),
               expect_raise if multi else lambda n: None if n == 16 else f"{n}",
               valid=not multi)  # fmt: skip

    def bpe_check(bpe):
        x = gauss((3, 5, d))
        got = q.encode(x).nbytes * 8 / x.size
        return None if bpe == got else f"bits_per_element {bpe} != measured {got}"

    yield Case(method, "bits_per_element", "measured", "bits_per_element",
               lambda: q.bits_per_element, bpe_check, True)  # fmt: skip


def cache_cases(method: str):
    d = default_head_dim(method)
    bits = get(method).config_class.bits

    def cache(**kw):
        return make_cache(
            method, head_dim=d, bits=kw.pop("bits", bits), **{**base_options(method), **kw}
        )

    def feed(shapes, dtype=mx.float32, vshape=None, scale=1.0, poison=None, **kw):
        def run():
            c = cache(**kw)
            out = None
            for i, s in enumerate(shapes):
                k = (gauss(s, seed=i) * scale).astype(dtype)
                if poison is not None and i == 0:
                    k[0, 0, 5, 7] = poison
                v = gauss(vshape or s, seed=100 + i).astype(dtype)
                out = c.update_and_fetch(k, v)
            return c, shapes, out

        return run

    def attends(result):
        c, shapes, views = result
        total = sum(s[2] for s in shapes)
        if c.offset != total:
            return f"offset {c.offset} != {total}"
        b, h, lq, dd = shapes[-1]
        qq = gauss((b, 2 * h, lq, dd), seed=9)
        out = attend(qq, *views, scale=dd**-0.5, mask="causal" if lq > 1 else None)
        if tuple(out.shape) != (b, 2 * h, lq, dd):
            return f"attend shape {tuple(out.shape)}"
        return None if finite(out) else "attend output is not finite"

    yield Case(method, "make_cache", "valid", "keys", feed([(1, 2, 40, d), (1, 2, 1, d)]),
               attends, True)  # fmt: skip
    yield Case(method, "make_cache", "0 tokens first", "keys",
               feed([(1, 2, 0, d), (1, 2, 3, d)]), attends, True)  # fmt: skip
    yield Case(method, "make_cache", "0 tokens later", "keys",
               feed([(1, 2, 40, d), (1, 2, 0, d), (1, 2, 1, d)]), attends, True)  # fmt: skip
    yield Case(method, "make_cache", "float16 keys", "keys", feed([(1, 2, 40, d)], mx.float16),
               attends, True)  # fmt: skip
    for bad, arg in [(dict(window=-1), "window"), (dict(sink=1.5), "sink"),
                     (dict(step=0), "step"), (dict(value_method="nope"), "nope"),
                     (dict(value_bits=True), "bits"), (dict(value_bits=2.0), "bits"),
                     (dict(bits=2.0), "bits"), (dict(window=True), "window"),
                     (dict(center="yes"), "center")]:  # fmt: skip
        yield Case(method, "make_cache", f"{bad}", arg, feed([(1, 2, 40, d)], **bad),
                   expect_raise)  # fmt: skip
    yield Case(method, "make_cache", "head_dim=2.0", "head_dim",
               lambda: make_cache(method, head_dim=128.0, bits=bits, **base_options(method)), expect_raise)  # fmt: skip
    for shapes, name in [([(2, 40, d)], "keys rank 3"), ([(1, 2, 40, d - 1)], "keys last dim"),
                         ([(1, 2, 40, d), (2, 2, 1, d)], "batch changes"),
                         ([(1, 2, 40, d), (1, 3, 1, d)], "heads change")]:  # fmt: skip
        yield Case(method, "update_and_fetch", name, "keys", feed(shapes), expect_raise)
    yield Case(method, "update_and_fetch", "values shape differs", "values",
               feed([(1, 2, 40, d)], vshape=(1, 2, 39, d)), expect_raise)  # fmt: skip
    yield Case(method, "update_and_fetch", "keys int32", "keys",
               feed([(1, 2, 40, d)], mx.int32), expect_raise)  # fmt: skip
    for bad in [mx.nan, mx.inf]:
        yield Case(method, "update_and_fetch", f"keys hold {bad}, then a chunk", "keys",
                   feed([(1, 2, 40, d), (1, 2, 2, d)], poison=bad), expect_raise)  # fmt: skip
    yield Case(method, "update_and_fetch", "key norms > 65504, then a chunk", "keys",
               feed([(1, 2, 40, d), (1, 2, 2, d)], scale=1e4), attends)  # fmt: skip
    yield Case(method, "update_and_fetch", "keys float16 then float32", "keys",
               _dtype_switch(cache, d), attends, True)  # fmt: skip


def _dtype_switch(cache, d):
    def run():
        c = cache()
        c.update_and_fetch(gauss((1, 2, 40, d)).astype(mx.float16), gauss((1, 2, 40, d)))
        shapes = [(1, 2, 40, d), (1, 2, 1, d)]
        views = c.update_and_fetch(gauss((1, 2, 1, d)), gauss((1, 2, 1, d)))
        return c, shapes, views

    return run


GENERATORS = (create_cases, encode_cases, decode_cases, attention_cases, cache_cases)


# -- classification ----------------------------------------------------------------------


def classify(case: Case) -> tuple[str, str]:
    try:
        result = case.run()
        if isinstance(result, dict):
            mx.eval(list(result.values()))
        elif isinstance(result, mx.array):
            mx.eval(result)
    except VQError as e:
        msg = str(e)
        if case.arg.lower() in msg.lower():
            return "clear", msg
        return "crash", f"vq error not naming {case.arg!r}: {type(e).__name__}: {msg}"
    except Exception as e:
        return "crash", f"{type(e).__name__}: {str(e)[:200]}"
    try:
        why = case.check(result)
    except Exception as e:  # the bad input was accepted and failed later
        return "crash", f"accepted, later {type(e).__name__}: {str(e)[:200]}"
    return ("correct", "") if why is None else ("silent", why)


def run_child(method: str, skip: int) -> None:
    """Classify ``method``'s cases from number ``skip`` on, one JSON line each; the line
    ``start`` goes out before a case runs, so a parent sees which case killed the process."""
    i = 0
    for gen in GENERATORS:
        for case in gen(method):
            if i >= skip:
                print(json.dumps({"start": i, "entry": case.entry, "case": case.name,
                                  "valid": case.valid}), flush=True)  # fmt: skip
                t0 = time.perf_counter()
                cls, detail = classify(case)
                dt = round(time.perf_counter() - t0, 3)
                print(json.dumps({"done": i, "class": cls, "detail": detail, "s": dt}), flush=True)
            i += 1


def classify_method(method: str) -> list[dict]:
    """Every case of ``method``, each in a child process that a hard crash (a signal) of
    MLX ends: that case is a crash and the next child resumes after it."""
    results, skip = [], 0
    while True:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", method, str(skip)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        pending = None
        for line in proc.stdout.splitlines():
            msg = json.loads(line)
            if "start" in msg:
                pending = msg
            else:
                results.append({"method": method, "entry": pending["entry"],
                                "case": pending["case"], "valid": pending["valid"],
                                "class": msg["class"], "detail": msg["detail"],
                                "seconds": msg["s"]})  # fmt: skip
                pending = None
        if proc.returncode == 0:
            return results
        if pending is None:  # died while building cases
            raise RuntimeError(f"{method}: case generation failed:\n{proc.stderr[-2000:]}")
        why = f"process died (exit {proc.returncode}): {proc.stderr.strip()[-200:]}"
        results.append({"method": method, "entry": pending["entry"], "case": pending["case"],
                        "valid": pending["valid"], "class": "crash", "detail": why})  # fmt: skip
        skip = pending["start"] + 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print every case as JSON")
    ap.add_argument("--method", action="append", help="only these methods (repeatable)")
    ap.add_argument("--show", choices=CLASSES, action="append", help="list cases of a class")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "SKIP"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child[0], int(args.child[1]))
        return 0
    methods = args.method or available()
    results = [r for m in methods for r in classify_method(m)]
    counts = Counter(r["class"] for r in results)
    refused = [r for r in results if r["valid"] and r["class"] == "clear"]
    if args.json:
        print(json.dumps({"counts": {c: counts[c] for c in CLASSES}, "total": len(results),
                          "refused_valid": len(refused), "cases": results}, indent=1))  # fmt: skip
        return 0
    per = defaultdict(Counter)
    for r in results:
        per[r["method"]][r["class"]] += 1
    print(f"{'method':<16}" + "".join(f"{c:>9}" for c in CLASSES) + f"{'total':>8}")
    for m in methods:
        row = per[m]
        print(f"{m:<16}" + "".join(f"{row[c]:>9}" for c in CLASSES) + f"{sum(row.values()):>8}")
    print(f"{'all':<16}" + "".join(f"{counts[c]:>9}" for c in CLASSES) + f"{len(results):>8}")
    print(f"valid inputs refused with a vq error: {len(refused)}")
    show = set(args.show or ())
    for r in results:
        if r["class"] in show or (r in refused and "clear" in show):
            print(f"  [{r['class']}] {r['method']}.{r['entry']} {r['case']}: {r['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
