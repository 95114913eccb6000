"""Every row of vq_mlxlm.architectures.ARCHITECTURES, run on a tiny random model of it.

Supported rows: greedy tokens at 8 bits (turboquant_rvq) equal the exact cache's, and the
4-bit (turboquant_mse) next-token distributions stay within ``KL_BOUND_4BIT`` of the exact
cache's. Refused rows: ``patch`` raises the row's reason, naming the architecture.
"""

import re
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import ARCHS, REFUSED, build

from vq_core import CompressedKVCache, ConfigError
from vq_mlxlm import UnsupportedModelError, patch
from vq_mlxlm.architectures import ARCHITECTURES, markdown_table

ROWS = [(a, t) for a in ARCHITECTURES for t in a.model_types]
SUPPORTED = [t for a, t in ROWS if not a.refused]
REFUSED_ROWS = [(a, t) for a, t in ROWS if a.refused]
PROMPT = mx.array([[(7 * i + 3) % 97 for i in range(40)]])
MARGIN = 0.1  # logits; 8-bit turboquant_rvq moves these models' logits by at most ~0.05
STEPS, SEEDS = 6, 20
# Mean KL over positions at 4 bits; measured 0.002-0.01 on the full-attention layers of
# these models. Sliding-window layers (16 tokens here, all compressed, no sink) measure
# more: gemma3_text 0.18 (its head_dim-256 first layer: the same layer as a plain
# compressed cache without a sink measures 0.25, with one 0.10), gpt_oss 0.047.
KL_BOUND_4BIT = {"gemma3_text": 0.3, "gpt_oss": 0.1}
KL_BOUND_DEFAULT = 0.05
README = Path(__file__).resolve().parents[1] / "README.md"


def _greedy(model, cache, n, chunk=16):
    """Prefill PROMPT in chunks, then ``n`` greedy tokens one at a time; returns the tokens
    and the smallest top-1 over top-2 logit margin of the steps."""
    for i in range(0, PROMPT.shape[1], chunk):
        logits = model(PROMPT[:, i : i + chunk], cache=cache)
    out, margin = [], mx.inf
    for _ in range(n):
        top2 = mx.sort(logits[0, -1])[-2:]
        margin = min(margin, (top2[1] - top2[0]).item())
        tok = logits[:, -1].argmax(-1)
        out.append(tok.item())
        logits = model(tok[:, None], cache=cache)
    return out, margin


def _decisive(arch, **overrides):
    """The first seed whose model's greedy run on the exact cache never has two tokens
    within ``MARGIN`` (chosen from the exact run alone: a near tie would make any error,
    even fp16 rounding, flip a token)."""
    for seed in range(SEEDS):
        model = build(arch, seed=seed, init="fan_in", **overrides)
        tokens, margin = _greedy(model, make_prompt_cache(model), STEPS)
        if margin > MARGIN:
            return model, tokens
    raise AssertionError(f"no seed below {SEEDS} gives {arch} a greedy run with margins > {MARGIN}")


def _logits(model, cache, chunk=8):
    outs = [model(PROMPT[:, i : i + chunk], cache=cache) for i in range(0, PROMPT.shape[1], chunk)]
    return mx.concatenate(outs, axis=1)[0].astype(mx.float32)


def _compressed(cache):
    layers = [c for c in cache if isinstance(c, CompressedKVCache)]
    assert layers and all(c.compressed_tokens > 0 for c in layers)
    return layers


def test_every_model_type_in_the_table_is_built_by_the_tests():
    assert {t for _, t in ROWS if t not in REFUSED} <= set(ARCHS)
    assert {t for _, t in REFUSED_ROWS} <= set(REFUSED)


def test_the_readme_and_vq_methods_print_the_code_table(capsys):

    from argparse import Namespace

    from vq_mlxlm.commands.methods import methods

    assert markdown_table() in README.read_text()
    assert methods(Namespace(json=False)) == 0
    assert markdown_table() in capsys.readouterr().out


@pytest.mark.parametrize("arch", SUPPORTED)
def test_greedy_tokens_at_8_bits_equal_the_exact_cache(arch):
    model, exact = _decisive(arch)
    patch(model, "turboquant_rvq", bits=8, block=8)
    cache = make_prompt_cache(model)
    assert _greedy(model, cache, STEPS)[0] == exact
    _compressed(cache)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_four_bit_kl_to_the_exact_cache_is_bounded(arch):
    model = build(arch, init="fan_in")
    ref = _logits(model, make_prompt_cache(model))
    patch(model, "turboquant_mse", bits=4, block=8)
    cache = make_prompt_cache(model)
    out = _logits(model, cache)
    _compressed(cache)
    lp, lq = (x - mx.logsumexp(x, axis=-1, keepdims=True) for x in (ref, out))
    kl = (mx.exp(lp) * (lp - lq)).sum(-1)[16:]  # positions with compressed history
    assert 0 < kl.mean().item() < KL_BOUND_4BIT.get(arch, KL_BOUND_DEFAULT)


@pytest.mark.parametrize("head_dim", [80, 100])  # not powers of two; 100 not even 16k
def test_head_dims_beyond_powers_of_two(head_dim):
    """Methods whose math takes any head_dim run at 8 bits with the exact cache's greedy
    tokens; the others refuse at patch time, naming the method and what they take."""
    model, exact = _decisive("llama", head_dim=head_dim)
    patch(model, "turboquant_rvq", bits=8, block=8)
    cache = make_prompt_cache(model)
    assert _greedy(model, cache, STEPS)[0] == exact
    assert all(c.key_quantizer.head_dim == head_dim for c in _compressed(cache))
    refused = {"affine": "group_size", "kivi": "group_size"}
    if head_dim % 16:
        refused |= {"polarquant": "multiple of 16", "vecinfer": "m*2**k"}
    for method, allowed in refused.items():
        with pytest.raises(ConfigError, match=f"{method}: head_dim={head_dim}") as err:
            untrained = {"untrained": True} if method == "vecinfer" else {}
            patch(build("llama", head_dim=head_dim), method, bits=4, **untrained)
        assert allowed in str(err.value)


@pytest.mark.parametrize(("row", "arch"), REFUSED_ROWS, ids=[t for _, t in REFUSED_ROWS])
def test_refused_architectures_say_which_and_why(row, arch):
    model = build(arch)
    with pytest.raises(UnsupportedModelError, match=f"architecture '{arch}'") as err:
        patch(model, "turboquant_mse", bits=4)
    for reason in row.refused.split("; and "):
        assert reason in str(err.value)
    assert not hasattr(model, "_vq_config")  # nothing was patched


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5"])
def test_vq_generate_memory_line_says_what_a_hybrid_leaves_untouched(arch, monkeypatch, capsys):
    """qwen3_next, and qwen3_5 under its multimodal wrapper (layer 0 is linear attention,
    Model.args holds only text_config): the gated-delta layer's ArraysCache is not
    compressed, and the memory line says so with its bytes; the ratio compares the
    compressed layer with fp16."""
    import importlib
    from types import SimpleNamespace

    import mlx_lm

    command = importlib.import_module("vq_mlxlm.commands.generate")

    model = patch(build(arch, init="fan_in"), "turboquant_mse", bits=4, block=8)

    def fake_stream(model, tokenizer, prompt, *, prompt_cache, **_):
        model(PROMPT, cache=prompt_cache)
        yield SimpleNamespace(
            text="x",
            token=1,
            prompt_tokens=40,
            generation_tokens=1,
            prompt_tps=1.0,
            generation_tps=1.0,
        )

    monkeypatch.setattr(command, "load_patched", lambda *a, **k: (model, SimpleNamespace()))
    monkeypatch.setattr(mlx_lm, "stream_generate", fake_stream)
    from vq_mlxlm.cli import build_parser

    args = build_parser().parse_args(
        ["generate", "--prompt", "p", "--max-tokens", "1", "--no-chat-template"]
    )
    assert command.generate(args) == 0
    out = capsys.readouterr().out
    assert "in 1 of 2 layers" in out
    state = re.search(r"1 recurrent-state layers untouched \(([\d,]+) bytes\)", out)
    assert state and int(state.group(1).replace(",", "")) > 0
    args.json = True
    assert command.generate(args) == 0
    r = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["compressed_layers"], r["state_layers"], r["exact_kv_layers"]) == (1, 1, 0)
    assert r["fp16_cache_bytes"] == 2 * 40 * 2 * 64 * 2  # K and V, 40 tokens, 2 heads, fp16
    assert r["used_cache_bytes"] == r["compressed_used_bytes"] + r["state_bytes"]
