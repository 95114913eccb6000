"""The `vq` command line on the embedded default model (offline)."""

import json
import subprocess
import sys
import time
import urllib.request

import pytest
from serving import free_port

from vq_core.cache import DEFAULT_BLOCK
from vq_mlxlm.cli import DEFAULT_PROMPT

VQ = [sys.executable, "-m", "vq_mlxlm.cli"]


def _vq(*args, timeout=300):
    return subprocess.run([*VQ, *args], capture_output=True, text=True, timeout=timeout)


def test_generate_json_answers_paris_with_measured_compression():
    out = _vq("generate", "--json", "--max-tokens", "12", "--bits", "4")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Paris" in r["text"]
    for field in (
        "prompt_tokens",
        "generated_tokens",
        "cache_bytes",
        "fp16_cache_bytes",
        "prompt_tps",
        "generation_tps",
        "method",
        "bits",
    ):
        assert field in r
    assert r["method"] == "turboquant_mse" and r["bits"] == 4
    assert r["compressed_layers"] == 30
    # packed codes (4.25 bits) for the compressed tokens; the sink and at most a block of
    # recent tokens stay exact, in the CPU model's float32 (twice fp16)
    per_token = r["fp16_cache_bytes"] / r["cache_tokens"]
    exact = (1 + DEFAULT_BLOCK) * 2 * per_token
    assert r["used_cache_bytes"] < r["fp16_cache_bytes"] / 3.5 + exact


def test_generate_prints_text_then_memory_line():
    out = _vq("generate", "--max-tokens", "8", "--method", "turboquant_mse", "--bits", "3")
    assert out.returncode == 0, out.stderr
    assert "[vq] cache:" in out.stdout and "fp16" in out.stdout and "tok/s" in out.stdout


def test_methods_and_estimate_json():
    rows = json.loads(_vq("methods", "--json").stdout)
    names = {r["method"] for r in rows}
    assert {"turboquant_mse", "qjl", "rabitq", "polarquant", "kivi", "affine"} <= names
    est = json.loads(_vq("estimate", "--model", "default", "--context", "4096", "--json").stdout)
    assert est["fp16_bytes"] == 2 * 30 * 3 * 64 * 2 * 4096
    row = next(r for r in est["methods"] if r["method"] == "turboquant_mse" and r["bits"] == 4)
    assert row["ratio"] == pytest.approx(16 / (4 + 16 / 64), abs=0.01)
    cvq = next(r for r in est["methods"] if r["method"] == "comm_vq" and r["bits"] == 2)
    assert cvq["needs_calibration"] and cvq["values"] == "turboquant_mse@2"
    assert cvq["bits_per_element"] == pytest.approx((2 + 2 + 16 / 64) / 2)


def test_serve_answers_an_openai_request():
    port = free_port()
    proc = subprocess.Popen(
        [*VQ, "serve", "--port", str(port), "--bits", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": DEFAULT_PROMPT}],
                "max_tokens": 12,
                "temperature": 0,
            }
        ).encode()
        deadline = time.time() + 120
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
        assert "Paris" in reply["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_calibrate_comm_vq_then_generate_with_the_artifact(tmp_path):
    """`vq calibrate --method comm_vq` on the default model (tiny settings), then `vq
    generate --artifacts`: RoPE-commuting 2-bit keys still answer the question."""
    out = _vq("calibrate", "--method", "comm_vq", "--bits", "2", "--out", str(tmp_path),
              "--sequences", "2", "--seq-len", "128", "--table-bits", "3",
              "--head-samples", "128", "--quiet")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["artifact"].endswith("comm_vq.safetensors")
    gen = _vq("generate", "--json", "--max-tokens", "8", "--method", "comm_vq", "--bits", "2",
              "--artifacts", str(tmp_path))  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    r = json.loads(gen.stdout.strip().splitlines()[-1])
    assert r["method"] == "comm_vq" and r["compressed_layers"] == 30
    bad = _vq("generate", "--method", "comm_vq", "--bits", "3", "--artifacts", str(tmp_path))
    assert bad.returncode != 0 and "calibrate with these settings" in bad.stderr
