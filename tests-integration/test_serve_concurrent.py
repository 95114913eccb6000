"""`vq serve` batching concurrent requests over compressed caches, driven by the real
`openai` client on 127.0.0.1 (default model, greedy, short completions).

The server keeps no prompt cache here (``--prompt-cache-size 0``) so a request sent alone
and the same request sent among others start from the same empty cache; test_serve.py
checks the prompt cache.
"""

import http.client
import json
import re
import socket
import threading
import time

import pytest
from openai import BadRequestError, OpenAI
from serving import start_server, stop_server

CAP = 40
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What animal says moo?",
    "Name a planet.",
    "What is the opposite of hot?",
    "Which season comes after winter?",
]
COUNTING = ", ".join(str(i) for i in range(1, 30)) + ","  # continues for as long as asked


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = open(log_path, "w")  # noqa: SIM115  (closed below; a pipe could fill and block)
    flags = ("--max-tokens", str(CAP), "--prompt-cache-size", "0")
    proc, port = start_server(*flags, output=log)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    yield port, client, log_path
    stop_server(proc)
    log.close()


def _chat(client, question, model="default_model", max_tokens=6):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def _concurrently(fn, args):
    out = [None] * len(args)

    def run(i):
        out[i] = fn(*args[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def _active_sessions(log_path) -> list[int]:
    return [int(n) for n in re.findall(r"vq serve: KV (\d+) active sessions", log_path.read_text())]


def test_eight_concurrent_streams_answer_as_one_at_a_time(server):
    _, client, log_path = server
    together = _concurrently(_chat, [(client, q) for q in QUESTIONS])
    alone = [_chat(client, q) for q in QUESTIONS]
    assert together == alone
    assert all(together) and "Paris" in together[0]
    assert max(_active_sessions(log_path)) >= 4  # they really were batched together
    assert re.search(r"MB/session \([\d,]+ B/token; fp16 23,040 B/token\)", log_path.read_text())


def test_one_long_request_does_not_hold_up_the_others(server):
    _, client, _ = server
    done = {}

    def long():
        r = client.completions.create(
            model="default_model", prompt=COUNTING, max_tokens=CAP, temperature=0
        )
        done["long"] = (time.time(), r.usage.completion_tokens)

    t = threading.Thread(target=long)
    t.start()
    time.sleep(1.0)
    shorts = _concurrently(_chat, [(client, q, "default_model", 3) for q in QUESTIONS[:3]])
    short_done = time.time()
    t.join(timeout=300)
    assert all(shorts)
    assert done["long"][1] == CAP  # the long one ran to its length while the others finished
    assert short_done < done["long"][0]


def test_the_server_survives_bad_requests_and_a_client_that_goes_away(server):
    port, client, log_path = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=b'{"messages": [', headers={
        "Content-Type": "application/json", "Content-Length": "14"})  # fmt: skip
    r = conn.getresponse()
    assert r.status == 400 and "Invalid JSON" in json.loads(r.read())["error"]
    # an unknown model name gets the one model served (and batches with the others)
    named = client.chat.completions.create(
        model="no-such-model",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=6,
        temperature=0,
    )
    assert named.model == "vq-turboquant_mse-4bit"
    assert named.choices[0].message.content == _chat(client, QUESTIONS[0])
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(
            model="default_model", prompt="x", max_tokens=2, extra_body={"draft_model": "x"}
        )
    assert "draft_model is not supported" in refused.value.response.json()["error"]
    # a prompt past the model's 8,192-token context: a clear 400, nothing crashes
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(model="default_model", prompt="hello " * 9000, max_tokens=2)
    error = refused.value.response.json()["error"]
    assert re.fullmatch(r"the prompt has 900\d tokens; this model's context holds 8192 .*", error)
    # a client that disconnects mid-stream: its generation stops and its cache is freed
    stopped = log_path.read_text().count("whose client went away")
    body = json.dumps({"prompt": COUNTING, "max_tokens": CAP, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while b"data: " not in received:  # wait for the first streamed token
        chunk = sock.recv(4096)
        assert chunk, "the stream ended before its first token"
        received += chunk
    sock.close()
    deadline = time.time() + 60
    while log_path.read_text().count("whose client went away") == stopped:
        assert time.time() < deadline, "the abandoned generation was never stopped"
        time.sleep(0.2)
    assert _chat(client, QUESTIONS[1]) == _chat(client, QUESTIONS[1])  # still serving
