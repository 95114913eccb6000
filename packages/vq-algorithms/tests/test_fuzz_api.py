"""Property fuzz of the public API over every registered method: each call ends in a clear vq
error naming the argument, or in a correct result (right shape, finite, within the method's
bound, compressed-domain attention equal to decode-then-matmul). Never an MLX-internal
error, a TypeError/KeyError, or a silent wrong answer. ``tools/fuzz_api.py`` is the
exhaustive, deterministic classifier of the same contract; this suite keeps it in CI with
bounded, derandomized examples.
"""

import dataclasses
import math

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vq_algorithms import METHODS
from vq_core import Codes, VQError, attend, create, get, make_cache

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
SLACK = 1.25
methods = st.sampled_from(METHODS)


def _options(method: str) -> dict:
    fields = {f.name for f in dataclasses.fields(get(method).config_class)}
    return {"untrained": True} if "untrained" in fields else {}


def _make(method: str, **config):
    return create(method, **{**_options(method), **config})


def _gauss(shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


def _outcome(fn, arg: str):
    """``fn()``'s result, or None when it raised a vq error naming ``arg``; anything else
    (another exception, or a vq error not naming the argument) fails the test."""
    try:
        out = fn()
        mx.eval(list(out.values()) if isinstance(out, dict) else out)
        return out
    except VQError as e:
        assert arg.lower() in str(e).lower(), f"{type(e).__name__} does not name {arg!r}: {e}"
        return None


def _round_trip_ok(q, x):
    codes = q.encode(x)
    lead = tuple(x.shape[:-1])
    for name, (trail, dtype) in q.field_layout().items():
        assert codes[name].dtype == dtype and tuple(codes[name].shape) == (*lead, *trail)
    xh = q.decode(codes)
    assert tuple(xh.shape) == tuple(x.shape)
    assert mx.isfinite(xh).all().item()
    n = math.prod(lead)
    if n:
        assert codes.nbytes * 8 == round(q.bits_per_element * n * q.head_dim)
    return xh


def _bound(q) -> float:
    b = type(q).round_trip_bound[q.config.bits] * SLACK
    if q.needs_calibration and q.head_dim != 128:
        return 1.0  # untrained neighbour off its stated size: better than zeros
    return b


bits_values = st.one_of(
    st.integers(-2, 10), st.floats(0, 9), st.booleans(), st.sampled_from(["4", None])
)
head_dims = st.one_of(st.integers(-4, 260), st.sampled_from([1025, 4096, 128.0, True, "128", None]))


@FUZZ
@given(method=methods, bits=bits_values, head_dim=head_dims)
def test_create_refuses_or_round_trips_within_bound(method, bits, head_dim):
    q = _outcome(lambda: _make(method, bits=bits, head_dim=head_dim), "")
    if q is None:
        return
    x = _gauss((256, q.head_dim), seed=3)
    xh = _round_trip_ok(q, x)
    err = (((xh - x) ** 2).sum() / (x**2).sum()).item()
    assert err <= _bound(q), f"{method} head_dim={head_dim} bits={bits}: error {err}"


@FUZZ
@given(method=methods, bits=bits_values, head_dim=head_dims)
def test_create_errors_name_their_argument(method, bits, head_dim):
    """The bad one of two arguments is the one named."""
    try:
        _make(method, bits=bits, head_dim=128)
    except VQError as e:
        assert "bits" in str(e)
    try:
        _make(method, head_dim=head_dim)
    except VQError as e:
        assert "head_dim" in str(e)


SCALES = [0.0, 1e-3, 1.0, 300.0, 1e4, 1e30]


@FUZZ
@given(
    method=methods,
    lead=st.lists(st.integers(0, 5), max_size=3),
    dtype=st.sampled_from([mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.bool_]),
    scale=st.sampled_from(SCALES),
    poison=st.sampled_from([None, mx.nan, mx.inf]),
    last=st.sampled_from([0, 0, 0, -1, 1]),
)
def test_encode_refuses_or_is_correct(method, lead, dtype, scale, poison, last):
    q = _make(method, head_dim=128)
    x = _gauss((*lead, 128 + last)) * scale
    if poison is not None and x.size:
        x = x.reshape(-1)
        x[0] = poison
        x = x.reshape(*lead, 128 + last)
    x = x.astype(dtype)
    codes = _outcome(lambda: q.encode(x), "x")
    if codes is None:
        return
    xh = _round_trip_ok(q, x.astype(mx.float32))
    n = math.prod(lead)
    energy = (x.astype(mx.float32) ** 2).sum().item()
    if n >= 64 and energy > 0 and method != "vecinfer":  # vecinfer's codebooks are unit-scale
        err = (((xh - x.astype(mx.float32)) ** 2).sum()).item() / energy
        assert err <= _bound(q) * 2, f"{method} error {err} at scale {scale}"


TAMPER = {
    "drop field": lambda c, f: Codes({k: v for k, v in c.items() if k != f}),
    "extra field": lambda c, f: Codes({**c, "bogus": c[f]}),
    "one word less": lambda c, f: Codes({**c, f: c[f][..., :-1]}),
    "one word more": lambda c, f: Codes({**c, f: mx.concatenate([c[f], c[f][..., :1]], -1)}),
    "one token less": lambda c, f: Codes({**c, f: c[f][:, :, :-1]}),
    "batch 1": lambda c, f: Codes({**c, f: c[f][:1]}),
    "as float32": lambda c, f: Codes({**c, f: c[f].astype(mx.float32)}),
    "as int32": lambda c, f: Codes({**c, f: c[f].astype(mx.int32)}),
    "as list": lambda c, f: Codes({**c, f: c[f].tolist()}),
    "untouched": lambda c, f: c,
}


@FUZZ
@given(method=methods, tamper=st.sampled_from(sorted(TAMPER)), pick=st.integers(0, 7))
def test_decode_and_attention_check_codes(method, tamper, pick):
    q = _make(method, head_dim=128)
    codes = q.encode(_gauss((2, 3, 9, 128), seed=1))
    field = sorted(codes)[pick % len(codes)]
    bad = TAMPER[tamper](codes, field)
    one_field_reshape = len(codes) == 1 and tamper in ("one token less", "batch 1")
    out = _outcome(lambda: q.decode(bad), "codes" if tamper == "extra field" else field)
    if tamper != "untouched" and not one_field_reshape:
        assert out is None, f"{method}: decode accepted codes with {field} {tamper}"
    queries = _gauss((2, 3, 4, 128), seed=2)
    p = mx.softmax(_gauss((2, 3, 4, 9), seed=3), axis=-1)
    for fn in (lambda: q.scores(queries, bad), lambda: q.weighted_sum(p, bad)):
        res = _outcome(fn, "")
        if tamper == "untouched":
            assert res is not None
    if tamper == "untouched":
        k_hat = q.decode(codes)
        ref = queries @ mx.swapaxes(k_hat, -1, -2)
        assert mx.allclose(q.scores(queries, codes), ref, rtol=1e-3, atol=1e-3).item()
        assert mx.allclose(q.weighted_sum(p, codes), p @ k_hat, rtol=1e-3, atol=1e-3).item()


@FUZZ
@given(
    method=methods,
    q_shape=st.tuples(
        st.sampled_from([0, 1, 2, 3]),
        st.sampled_from([1, 3, 6]),
        st.integers(0, 3),
        st.sampled_from([127, 128, 129]),
    ),
    drop_axis=st.booleans(),
    tokens=st.sampled_from([0, 1, 9]),
    p_len=st.sampled_from([0, 1, 8, 9, 10]),
    poison=st.booleans(),
)
def test_scores_and_weighted_sum_match_shapes(method, q_shape, drop_axis, tokens, p_len, poison):
    q = _make(method, head_dim=128)
    codes = q.encode(_gauss((2, 3, tokens, 128), seed=1))
    queries = _gauss(q_shape[1:] if drop_axis else q_shape, seed=2)
    if poison and queries.size:
        queries = queries.reshape(-1)
        queries[0] = mx.nan
        queries = queries.reshape(q_shape[1:] if drop_axis else q_shape)
    s = _outcome(lambda: q.scores(queries, codes), "q")
    good_q = not drop_axis and q_shape[:2] == (2, 3) and q_shape[3] == 128
    assert (s is not None) == good_q, f"{method}: q {queries.shape} vs codes of {tokens}"
    if s is not None:
        ref = queries @ mx.swapaxes(q.decode(codes), -1, -2)
        assert s.shape == ref.shape
        assert mx.allclose(s, ref, rtol=1e-3, atol=1e-3, equal_nan=True).item()
    p = mx.softmax(_gauss((2, 3, 4, p_len), seed=4), axis=-1)
    w = _outcome(lambda: q.weighted_sum(p, codes), "p")
    assert (w is not None) == (p_len == tokens)
    if w is not None:
        ref = p @ q.decode(codes)
        assert w.shape == (2, 3, 4, 128)
        assert mx.allclose(w, ref, rtol=1e-3, atol=1e-3).item()


@FUZZ
@given(
    method=methods,
    chunks=st.lists(
        st.tuples(
            st.sampled_from([1, 1, 1, 2]),
            st.sampled_from([2, 2, 2, 3]),
            st.sampled_from([0, 1, 5, 40]),
        ),
        min_size=1,
        max_size=3,
    ),
    dtype=st.sampled_from([mx.float32, mx.float16, mx.int32]),
    window=st.sampled_from([0, 4, -1, True]),
)
def test_cache_refuses_or_attends(method, chunks, dtype, window):
    bits = get(method).config_class.bits
    cache = _outcome(
        lambda: make_cache(method, head_dim=128, bits=bits, window=window, **_options(method)),
        "window",
    )
    if cache is None:
        assert window is True or window < 0
        return
    held = None
    for i, (b, h, n) in enumerate(chunks):
        k = _gauss((b, h, n, 128), seed=i).astype(dtype)
        v = _gauss((b, h, n, 128), seed=50 + i).astype(dtype)
        out = _outcome(lambda k=k, v=v: cache.update_and_fetch(k, v), "keys")
        ok = dtype != mx.int32 and (held is None or held == (b, h) or cache.offset == 0)
        assert (out is not None) == ok, f"{method}: chunk {(b, h, n)} after {held}"
        if out is None:
            return
        if n or cache.offset:
            held = (b, h)
        queries = _gauss((b, 2 * h, n, 128), seed=9)
        att = attend(queries, *out, scale=128**-0.5, mask="causal" if n > 1 else None)
        assert att.shape == queries.shape and mx.isfinite(att).all().item()


@pytest.mark.parametrize("method", METHODS)
def test_norms_past_float16_are_refused_when_values_are_checked(method):
    q = _make(method, head_dim=128)
    x = _gauss((4, 128)) * 1e4  # norms ~1.1e5 > 65504
    xh = _outcome(lambda: q.decode(q.encode(x)), "x")
    if xh is not None:  # stored without overflow
        assert mx.isfinite(xh).all().item()
