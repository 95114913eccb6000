"""``vq eval`` end to end on a tiny random llama and a tiny text (CI-sized, CPU, seconds)."""

import json

import pytest
from tiny_models import build

from vq_core.cache import DEFAULT_BLOCK
from vq_mlxlm.cli import build_parser
from vq_mlxlm.commands.eval import grid
from vq_mlxlm.evaluation import Budget, parse_spec, run
from vq_mlxlm.evaluation import report as report_io
from vq_mlxlm.evaluation.text import EvalText

TINY = Budget(
    "tiny",
    prefix=64,
    scored=48,
    chunk=16,
    needle=((150, (0.2, 0.8)),),
    prefill_tokens=32,
    prefill_chunk=16,
    decode_steps=4,
    min_text=0,
    continuations=(40, 65),
    continuation_steps=12,
)


def _compressed(held: int) -> int:
    """Tokens a cache compresses of ``held`` past its exact sink and window: whole blocks."""
    return held - held % DEFAULT_BLOCK


WORDS = "the cache holds packed codes for keys and values of every layer while decode reads"


class CharTokenizer:
    """Printable ASCII and newline as ids 0-95 (the tiny model has 97); no chat template."""

    eos_token_ids = {96}

    def encode(self, text: str) -> list[int]:
        return [95 if c == "\n" else min(max(ord(c) - 32, 0), 94) for c in text]

    def decode(self, ids) -> str:
        return "".join("\n" if i == 95 else "" if i == 96 else chr(i + 32) for i in ids)


@pytest.fixture(scope="module")
def result():
    tok = CharTokenizer()
    vocab = WORDS.split()
    words = [vocab[(i * 7 + i // 5) % len(vocab)] for i in range(120)]
    lines = [" ".join(words[i : i + 8]) + "." for i in range(0, 120, 8)]
    text = "\n".join(lines * 3)
    specs = [parse_spec(s) for s in ("turboquant_mse@4", "turboquant_mse@2+window=16", "mlx_lm@4")]
    return run(build("llama"), tok, EvalText("tiny", "0" * 64, tok.encode(text)), specs, TINY)


def test_rows_and_fields(result):
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["exact", "turboquant_mse@4", "turboquant_mse@2+window=16", "mlx_lm@4"]
    exact, tq4, _, mlx4 = result["rows"]
    assert exact["kl"] == 0 and exact["top1"] == 1 and exact["delta_ppl_pct"] == 0
    assert exact["tokens"] == TINY.scored and exact["cache_tokens"] == TINY.context
    for row in result["rows"]:
        assert len(row["layer_cosine"]) == 2 and len(row["needle_trials"]) == 2
        assert row["decode_ratio"] > 0 and row["prefill_ratio"] > 0
        assert row["ppl"] > 1
    n = TINY.context  # one sink token and a partial block stay exact (counted at 16 bits)
    c = _compressed(n - 1)
    assert tq4["bits_per_element"] == pytest.approx((c * (4.25) + (n - c) * 16) / n, abs=1e-4)
    assert mlx4["bits_per_element"] == pytest.approx(4.5)


def test_compressed_caches_were_used(result):
    exact, tq4, tq2w, mlx4 = result["rows"]
    assert tq4["compressed_layers"] == 2 and tq4["compressed_tokens"] == _compressed(
        TINY.context - 1
    )
    assert tq2w["compressed_tokens"] == _compressed(TINY.context - 16 - 1)  # window, sink exact
    assert exact["compressed_layers"] == mlx4["compressed_layers"] == 0
    # the compressed history changed the outputs, 2-bit more than 4-bit
    assert 0 < tq4["kl"] < tq2w["kl"]
    assert max(tq4["layer_cosine"]) < 1 - 1e-6 and min(tq4["layer_cosine"]) > 0.9
    assert mlx4["kl"] > 0
    # measured bytes: packed codes are smaller than the exact (float32 on CPU) cache
    assert tq4["cache_bytes"] < exact["cache_bytes"] / 3
    window_bytes = 2 * 2 * 2 * 16 * 64 * 4  # K and V, 2 layers, 2 heads, 16 tokens, fp32
    assert tq2w["cache_bytes"] > window_bytes


def test_intervals_and_continuations(result):
    exact, tq4, tq2w, mlx4 = result["rows"]
    assert exact["delta_ppl_ci"] == [0.0, 0.0] and exact["kl_ci"] == [0.0, 0.0]
    for row in (tq4, tq2w, mlx4):
        low, high = row["kl_ci"]
        assert 0 <= low <= row["kl"] <= high, (row["label"], row["kl"], row["kl_ci"], row["tokens"])
        low, high = row["delta_ppl_ci"]
        assert low <= row["delta_ppl_pct"] <= high and low < high
    assert [c["prompt"] for c in exact["continuations"]] == [40, 65]
    for c in exact["continuations"]:  # the exact cache's continuation is the reference
        assert c["agree_len"] == c["steps"] == 12 and c["match"] == 1.0
    for row in (tq4, tq2w, mlx4):
        for c in row["continuations"]:
            assert 0 <= c["agree_len"] <= 12 and c["agree_len"] / 12 <= c["match"] <= 1
        assert row["agree_len_min"] == min(c["agree_len"] for c in row["continuations"])


def test_greedy_continuation_is_the_models_argmax():
    """Each token ``continuation.greedy`` returns through an exact cache is the argmax of
    one forward pass over the prompt and the tokens before it (teacher forcing)."""
    import mlx.core as mx

    from vq_mlxlm.evaluation import continuation
    from vq_mlxlm.evaluation.prefix import exact_kv

    model, tok = build("llama"), CharTokenizer()
    prompt = tok.encode("the cache holds packed codes for keys")
    kv = exact_kv(model, mx.array(prompt[:-1])[None])
    out = continuation.greedy(model, parse_spec("exact").make_caches(model), kv, prompt[-1], 6)
    logits = model(mx.array(prompt + out[:-1])[None])[0, len(prompt) - 1 :]
    assert mx.argmax(logits, axis=-1).tolist() == out
    assert continuation.compare([1, 2, 3, 4], [1, 2, 5, 4]) == {
        "agree_len": 2,
        "match": 0.75,
        "steps": 4,
    }
    with pytest.raises(ValueError, match="continuations of 2 and 3"):
        continuation.compare([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="exact prefix holds"):
        continuation.run(model, lambda: None, kv, prompt, [len(prompt) + 5], 2)


def test_report_files(result, tmp_path):
    table = report_io.markdown(result)
    header = table.splitlines()[2]
    for column in ("bits/el", "cache MiB", "vs fp16", "ΔPPL %", "KL", "top-1", "needle", "gen"):
        assert column in header
    tq4 = result["rows"][1]
    low, high = tq4["kl_ci"]
    assert f"{tq4['kl']:.4f} [{low:.4f}, {high:.4f}]" in table
    assert "/12 |" in table  # continuation agreement of 12 generated tokens
    assert table.count("\n| ") == 1 + len(result["rows"])
    report_io.write_json(result, str(tmp_path / "r.json"))
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["rows"][1]["label"] == "turboquant_mse@4"
    for key in ("bits_per_element", "cache_bytes", "ratio_vs_fp16", "ppl", "delta_ppl_pct"):
        assert key in loaded["rows"][1]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"vq-mlxlm\[plot\]"):
            report_io.write_plot(result, str(tmp_path / "rd.png"))
    else:
        report_io.write_plot(result, str(tmp_path / "rd.png"))
        assert (tmp_path / "rd.png").stat().st_size > 1000


def test_cli_grid():
    args = build_parser().parse_args(
        ["eval", "--methods", "turboquant_mse,qjl", "--bits", "3", "--add", "rabitq@2+window=8"]
    )
    labels = [s.label for s in grid(args)]
    assert labels == [
        "turboquant_mse@3",
        "qjl@3",
        "mlx_lm@8",
        "mlx_lm@4",
        "mlx_lm@2",
        "rabitq@2+window=8",
    ]


def test_artifact_rows_run_in_the_harness(tmp_path):
    """``vq eval --artifacts``: each calibrated method at its trained bits, and RateQuant
    next to the uniform split of the same mean, all scored in one run."""
    from vq_mlxlm.calibration import calibrate

    tok, model = CharTokenizer(), build("llama")
    text = " ".join(WORDS.split() * 40)
    common = dict(text=text, out=tmp_path, progress=False, n_sequences=2, seq_len=64)
    calibrate((model, tok), "spectral", 2, **common)
    calibrate((model, tok), "comm_vq", 2, head_samples=128, table_bits=2, **common)
    calibrate((model, tok), "ratequant", 2.5, probe_sequences=1, **common)
    args = build_parser().parse_args(
        ["eval", "--methods", "turboquant_mse", "--bits", "2", "--no-baselines",
         "--artifacts", str(tmp_path)]
    )  # fmt: skip
    specs = grid(args)
    d = str(tmp_path)
    assert [s.label for s in specs] == [
        "turboquant_mse@2",
        f"comm_vq@2+artifacts={d}",
        f"spectral@2+artifacts={d}",
        "turboquant_mse@2.5+split=uniform",
        f"turboquant_mse@2.5+artifacts={d}+split=ratequant",
    ]
    rows = run(model, tok, EvalText("tiny", "0" * 64, tok.encode(text * 2)), specs, TINY)["rows"]
    by_label = {r["label"]: r for r in rows}
    uniform = by_label["turboquant_mse@2.5+split=uniform"]
    rq = by_label[f"turboquant_mse@2.5+artifacts={d}+split=ratequant"]
    n = TINY.context  # exact tokens at 16 bits; mean 2.5 bits + 16/64 for the norm
    c = _compressed(n - 1)
    expected = (c * (2.5 + 16 / 64) + (n - c) * 16) / n
    assert uniform["bits_per_element"] == pytest.approx(expected, abs=1e-4)
    assert rq["bits_per_element"] == pytest.approx(expected, abs=1e-4)
    cvq = by_label[f"comm_vq@2+artifacts={d}"]
    assert cvq["compressed_tokens"] == c and cvq["value_method"] == "turboquant_mse"
    keys_at_most_2 = (c * (2 + 2 + 16 / 64) / 2 + (n - c) * 16) / n
    assert cvq["bits_per_element"] <= keys_at_most_2 + 1e-4
    assert all(r["kl"] > 0 for r in rows[1:])
    with pytest.raises(ValueError, match=r"mean 2\.5 bits, not 3\.5"):
        parse_spec(f"turboquant_mse@3.5+split=ratequant+artifacts={d}").make_caches(model)
    with pytest.raises(ValueError, match="fractional bits need split"):
        parse_spec("turboquant_mse@2.5")
