"""Compiled decode steps (vq_mlxlm.compiled_decode): the same logits as mlx-lm's forward
step by step, across block encodes and code-buffer growths, with one trace per layout and
set of shapes, for every zero-calibration family and every full-attention architecture
(on the CPU with ``vq_core.cache.COMPILE_ON_CPU``; on a GPU as they are)."""

import mlx.core as mx
import pytest
from tiny_models import build

import vq_core.cache
import vq_kernels
from vq_core import ConfigError, ShapeError
from vq_mlxlm import patch, unpatch
from vq_mlxlm.compiled_decode import decoder


@pytest.fixture(autouse=True)
def _compile_on_cpu(monkeypatch):
    """Compiled steps and encodes run on a GPU only by default (vq_core.cache.compiles_here);
    these tests run them on the CPU too, over vq-kernels' pure-MLX ops (the native CPU
    codebook attention reads its inputs' values when called, which a trace cannot)."""
    monkeypatch.setattr(vq_core.cache, "COMPILE_ON_CPU", True)
    if vq_kernels.available_backend() == "reference":
        monkeypatch.setenv(vq_kernels.ENV_VAR, "reference")


PROMPT = mx.array([[(7 * i + 3) % 97 for i in range(70)]])
STEPS = 120  # block 8, code step 16: 15 encodes and several growths per layer
METHODS = [
    ("turboquant_mse", 4), ("turboquant_mse", 2), ("turboquant_prod", 4),
    ("turboquant_rvq", 4), ("rabitq", 4), ("rabitq", 2), ("qjl", 1), ("polarquant", 4),
    ("kivi", 4), ("affine", 4),
]  # fmt: skip


def _decode(model, compiled: bool, method="turboquant_mse", bits=4, steps=STEPS):
    """Prefill PROMPT, then ``steps`` one-token forwards of fixed tokens: their logits
    [steps, vocab] and the cache."""
    patch(model, method, bits, block=8, compiled_decode=compiled)
    cache = model.make_cache()
    for c in cache:
        c.step = 16
    logits = model(PROMPT, cache=cache)
    outs = []
    for i in range(steps):
        logits = model(mx.array([[(13 * i + 5) % 97]]), cache=cache)
        outs.append(logits[0, -1])
    return mx.stack(outs), cache


@pytest.mark.parametrize("method,bits", METHODS)
def test_compiled_steps_equal_forward_steps(method, bits):
    model = build("llama", init="fan_in")
    plain, _ = _decode(model, False, method, bits)
    assert decoder(model) is None
    compiled, _ = _decode(model, True, method, bits)
    d = decoder(model)
    assert d.compiled_steps == STEPS - 1  # the first step of the layout runs uncompiled
    assert mx.abs(plain - compiled).max().item() <= 1e-5 * mx.abs(plain).max().item()
    # one trace per set of shapes: the exact buffers keep theirs, every layer's code
    # buffers grow at one step (capacity 16 tokens, grown by steps of 16 as 75 + 120 come)
    assert 1 <= d.traces <= 14


@pytest.mark.parametrize("method,bits", METHODS)
def test_compiled_encode_equals_op_by_op(method, bits, monkeypatch):
    """Decode-time encodes as one compiled graph (vq_core.cache.COMPILED_ENCODE) store the
    codes the op-by-op encode stores."""
    model = build("llama", init="fan_in")
    runs = []
    for compiled in (False, True):
        monkeypatch.setattr(vq_core.cache, "COMPILED_ENCODE", compiled)
        runs.append(_decode(model, False, method, bits))
    (a, ca), (b, cb) = runs
    assert mx.abs(a - b).max().item() <= 1e-5 * mx.abs(a).max().item()
    for x, y in zip(ca, cb, strict=True):
        assert x.compressed_tokens == y.compressed_tokens > PROMPT.shape[1]
        sx, sy = x.state, y.state
        assert sx.keys() == sy.keys()
        assert all(mx.array_equal(sx[k], sy[k]).item() for k in sx if k != "meta")


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "phi3"])
def test_architectures_compile(arch):
    model = build(arch, init="fan_in")
    plain, _ = _decode(model, False, steps=40)
    compiled, _ = _decode(model, True, steps=40)
    assert decoder(model).compiled_steps == 39
    assert mx.abs(plain - compiled).max().item() <= 1e-5 * mx.abs(plain).max().item()


def test_sliding_window_layers_stay_uncompiled():
    model = build("gemma3_text", init="fan_in")
    plain, _ = _decode(model, False, steps=20)
    compiled, _ = _decode(model, True, steps=20)
    assert decoder(model).compiled_steps == 0
    assert mx.array_equal(plain, compiled)


def test_the_cpu_decodes_op_by_op_by_default(monkeypatch):
    if mx.default_device() == mx.gpu:
        pytest.skip("the CPU default")
    monkeypatch.setattr(vq_core.cache, "COMPILE_ON_CPU", False)
    model = build("llama", init="fan_in")
    _decode(model, True, steps=20)
    assert decoder(model).compiled_steps == 0 and decoder(model).traces == 0


def test_step_reads_no_host_value():
    """A compiled step is an MLX trace: a host read inside (``.item()``, a Python int from
    an array) raises there. The trace replays with new counts every step, so a value
    baked into it would break the equality above; here: tokens count up as they should."""
    model = build("llama", init="fan_in")
    patch(model, "turboquant_mse", 4, block=8)
    cache = model.make_cache()
    model(PROMPT, cache=cache)
    for i in range(20):
        model(mx.array([[i]]), cache=cache)
    assert decoder(model).compiled_steps == 19
    assert all(c.offset == PROMPT.shape[1] + 20 for c in cache)
    assert all(c.exact_tokens + c.compressed_tokens + c.sink == c.offset for c in cache)


def test_steps_between_encodes_send_no_host_arrays(monkeypatch):
    """Each compiled step computes the next one's counts, masks and offset on the device;
    the host builds them only after a block encode or a buffer growth (a new layout)
    changed them (block 8, code step 16: about two builds per 8 steps, not one per step),
    and the logits stay equal to the uncompiled steps'."""
    from vq_mlxlm import compiled_decode

    builds = []
    real = compiled_decode._write_masks

    def counted(caches, rows):
        builds.append(rows[0][1][0])
        return real(caches, rows)

    monkeypatch.setattr(compiled_decode, "_write_masks", counted)
    monkeypatch.setattr(compiled_decode, "PREDICT_STEP_ARRAYS", True)
    model = build("llama", init="fan_in")
    plain, _ = _decode(model, False, steps=64)
    compiled, _ = _decode(model, True, steps=64)
    assert mx.abs(plain - compiled).max().item() <= 1e-5 * mx.abs(plain).max().item()
    steps = decoder(model).compiled_steps
    assert steps == 63
    assert 0 < len(builds) <= steps // 3, builds


def test_mlx_lm_generate_takes_compiled_steps():
    from mlx_lm.generate import generate_step

    model = build("llama", init="fan_in")
    tokens = {}
    for compiled in (False, True):
        patch(model, "turboquant_mse", 4, block=8, compiled_decode=compiled)
        steps = generate_step(PROMPT[0], model, max_tokens=30, prompt_cache=model.make_cache())
        tokens[compiled] = [t for t, _ in steps]
    assert tokens[True] == tokens[False]
    assert decoder(model).compiled_steps >= 28


def test_bad_inputs():
    model = build("llama")
    own_class = type(model)
    with pytest.raises(ConfigError, match="compiled_decode"):
        patch(model, compiled_decode="yes")
    patch(model, "turboquant_mse", 4, block=8)
    cache = model.make_cache()
    model(PROMPT, cache=cache)
    model(mx.array([[1]]), cache=cache)
    model(mx.array([[2]]), cache=cache)  # compiled from here on
    k = mx.zeros((1, 2, 1, 64), mx.float16)  # float32 buffers: refused while bound
    c = cache[0]
    counts = mx.array(c.decode_counts(), dtype=mx.int32)
    with pytest.raises(ShapeError, match="write mask must be bool"):
        c.bind(c.decode_inputs(), counts, counts[1, :1] - 1, mx.array(c.offset))
    here = mx.arange(c.exact_slots()) == c.decode_counts()[1][0] - 1
    c.bind(c.decode_inputs(), counts, here, mx.array(c.offset))
    try:
        with pytest.raises(ShapeError, match="compiled decode step"):
            cache[0].update_and_fetch(k, k)
    finally:
        cache[0].unbind()
    unpatch(model)
    assert decoder(model) is None and type(model) is own_class


def test_another_seed_is_traced_again():
    """Quantizer matrices are constants of a trace: caches of another seed (same shapes)
    must not replay the first seed's trace."""
    model = build("llama", init="fan_in")
    outs = {}
    for seed in (0, 1):
        patch(model, "turboquant_mse", 4, block=8, seed=seed)  # one decoder for both
        cache = model.make_cache()
        model(PROMPT, cache=cache)
        for i in range(12):
            logits = model(mx.array([[(13 * i + 5) % 97]]), cache=cache)
        outs[seed] = logits
    patch(model, "turboquant_mse", 4, block=8, seed=1, compiled_decode=False)
    cache = model.make_cache()
    model(PROMPT, cache=cache)
    for i in range(12):
        plain = model(mx.array([[(13 * i + 5) % 97]]), cache=cache)
    assert mx.abs(outs[1] - plain).max().item() <= 1e-5 * mx.abs(plain).max().item()
    assert not mx.allclose(outs[0], outs[1]).item()
