"""`vq serve` on 127.0.0.1 with the default model, driven by the real `openai` client.

A server that reuses its prompt caches (mlx-lm deep-copies a cached prompt cache on every
prefix hit) must answer a multi-turn chat and repeated completions exactly as a fresh
server that keeps no prompt cache (greedy decoding).
"""

import http.client
import json
import subprocess
import sys

import pytest
from openai import OpenAI
from serving import start_server, stop_server

MAX_TOKENS = 8


def _start(*flags):
    proc, port = start_server(*flags)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    return proc, port, client


def _conversation(client):
    """Two chat turns and the same completion twice: every request after the first hits
    the prompt cache of an earlier one. Returns (text, cached prompt tokens) per request."""
    out = []
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for follow_up in ("And of Italy?", None):
        r = client.chat.completions.create(
            model="default_model", messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        answer = r.choices[0].message.content
        out.append((answer, r.usage.prompt_tokens_details.cached_tokens))
        if follow_up:
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": follow_up},
            ]
    for _ in range(2):
        r = client.completions.create(
            model="default_model",
            prompt="The three primary colors are",
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        out.append((r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens))
    return out


def _post(port, body: bytes, length=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json", "Content-Length": str(length or len(body))}
    conn.request("POST", "/v1/completions", body=body, headers=headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_prompt_cache_hits_answer_like_a_fresh_server_and_the_guards_hold():
    cached, port, client = _start("--max-tokens", str(MAX_TOKENS))
    try:
        reused = _conversation(client)
        # a request for 10^9 tokens is cut to the server's cap
        r = client.completions.create(
            model="default_model", prompt="Count: 1, 2,", max_tokens=10**9, temperature=0
        )
        assert r.usage.completion_tokens == MAX_TOKENS and r.choices[0].finish_reason == "length"
        status, reply = _post(port, b'{"prompt": "caf\xe9", "max_tokens": 2}')  # Latin-1
        assert status == 400 and "not UTF-8" in reply["error"]
        status, reply = _post(port, json.dumps({"prompt": "café", "max_tokens": 2}).encode())
        assert status == 200 and reply["usage"]["completion_tokens"] == 2  # still serving
        listed = client.models.list().data
        assert [m.id for m in listed] == ["vq-turboquant_mse-4bit"]
    finally:
        stop_server(cached)
    fresh, _, client = _start("--max-tokens", str(MAX_TOKENS), "--prompt-cache-size", "0")
    try:
        reference = _conversation(client)
    finally:
        stop_server(fresh)
    assert reused[1][1] > 0 and reused[3][1] > 0  # the second turn and the repeat: cache hits
    assert all(hits == 0 for _, hits in reference)
    assert [text for text, _ in reused] == [text for text, _ in reference]
    assert "Paris" in reused[0][0] and "Rome" in reused[1][0]


@pytest.mark.parametrize(
    "flag, value",
    [("--max-tokens", "0"), ("--top-p", "2"), ("--chat-template-args", "[1]"), ("--port", "0")],
)
def test_bad_server_flags_are_refused_before_the_model_loads(flag, value):
    out = subprocess.run(
        [sys.executable, "-m", "vq_mlxlm.cli", "serve", flag, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and flag in out.stderr and "loading" not in out.stderr
