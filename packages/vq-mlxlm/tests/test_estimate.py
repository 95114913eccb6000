"""`vq estimate` counts only the layers patch() compresses (full-attention KVCache layers)."""

import json

import pytest

from vq_mlxlm.commands.estimate import estimate_rows
from vq_mlxlm.model_shape import layer_windows

LAYERS, PATTERN, WINDOW, KV_HEADS, HEAD_DIM = 12, 6, 64, 1, 32


@pytest.fixture
def gemma3_dir(tmp_path):
    """A tiny gemma3_text config: every 6th layer global, the others a 64-token window."""
    config = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": LAYERS,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": 97,
        "rms_norm_eps": 1e-6,
        "sliding_window": WINDOW,
        "sliding_window_pattern": PATTERN,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_layer_windows_follow_mlx_lm_make_cache(gemma3_dir):
    windows = layer_windows(gemma3_dir)
    assert windows == [None if i % PATTERN == PATTERN - 1 else WINDOW for i in range(LAYERS)]


@pytest.mark.parametrize("context", [16, 4096])
def test_sliding_window_layers_exact_on_request(gemma3_dir, context):
    info, rows = estimate_rows(gemma3_dir, context, sliding="exact")
    full = LAYERS // PATTERN
    assert (info["compressed_layers"], info["exact_layers"]) == (full, LAYERS - full)
    per_token = 2 * KV_HEADS * HEAD_DIM * 2  # K and V in fp16, one layer
    exact = (LAYERS - full) * per_token * min(context, WINDOW)
    assert info["exact_bytes"] == exact
    assert info["fp16_bytes"] == full * per_token * context + exact
    row = next(r for r in rows if r["method"] == "turboquant_mse" and r["bits"] == 4)
    bpe = 4 + 16 / HEAD_DIM  # 4-bit codes and an fp16 norm per vector, keys and values
    assert row["bytes"] == round(full * 2 * KV_HEADS * HEAD_DIM * context * bpe / 8) + exact
    assert row["ratio"] == round(info["fp16_bytes"] / row["bytes"], 2)
    assert row["ratio"] < 16 / bpe  # what counting every layer as compressed would claim


@pytest.mark.parametrize("context", [16, 4096])
def test_sliding_window_layers_compressed_by_default(gemma3_dir, context):
    info, rows = estimate_rows(gemma3_dir, context)
    full = LAYERS // PATTERN
    assert (info["compressed_layers"], info["exact_layers"], info["exact_bytes"]) == (
        LAYERS,
        0,
        0,
    )
    tokens = full * context + (LAYERS - full) * min(context, WINDOW)
    assert info["fp16_bytes"] == 2 * KV_HEADS * HEAD_DIM * 2 * tokens
    row = next(r for r in rows if r["method"] == "turboquant_mse" and r["bits"] == 4)
    bpe = 4 + 16 / HEAD_DIM
    assert row["bytes"] == round(2 * KV_HEADS * HEAD_DIM * tokens * bpe / 8)
    assert row["ratio"] == round(16 / bpe, 2)
