"""Compressed caches under mlx-lm's distributed inference: ``vq launch --backend ring`` with
2 and 3 local processes on 127.0.0.1 (loopback only), against the single-process run.

Greedy tokens must be identical to one process with the same vq cache, and the per-rank
cache bytes must add up to its figure: tensor parallelism (a tiny llama whose 4 query / 2 KV
heads split over 2 ranks; the default model's 9 / 3 over 3), pipeline parallelism (the
default model's 30 layers over 2 ranks). Tensor and pipeline combined need ``group.split``,
which the ring backend lacks; its refusal is tested in test_distributed_layout.py.
Failures: ranks with other cache flags are refused at start; a rank killed mid-generation
ends the launch with a non-zero status and a message; a rank that hangs makes the other
stop at ``--rank-timeout``.
"""

import contextlib
import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vq_mlxlm.cli import main as vq

HERE = Path(__file__).parent
PROMPT = "Name three colors."
GENERATE = ["generate", "--prompt", PROMPT, "--json"]
RANK = [sys.executable, "-m", "vq_mlxlm.cli"]  # what each rank runs: vq
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _port(ranks: int) -> int:
    """A starting port with ``ranks`` free ports after it (the ring listens on each)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        if start + ranks < 65535 and all(_free(start + i) for i in range(ranks)):
            return start
    raise RuntimeError("no free loopback ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _launch_cmd(ranks: int, command: list[str]) -> list[str]:
    port = str(_port(ranks))
    return [*RANK, "launch", "--backend", "ring", "-n", str(ranks), "-p", port, "--", *command]


def _launch(ranks: int, command: list[str], timeout: float = 400):
    return subprocess.run(
        _launch_cmd(ranks, command), capture_output=True, text=True, timeout=timeout, env=ENV
    )


def _json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout  # rank 0 alone prints
    return json.loads(lines[0])


@functools.cache
def _single(tokens: int) -> dict:
    """``vq generate --json`` in this process: the reference run."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert vq([*GENERATE, "--max-tokens", str(tokens)]) == 0
    return json.loads(out.getvalue())


# tensor parallelism all_sums twice a layer per token: 3 ranks on 2 busy cores take ~0.1 s
# each (measured), so that run generates fewer tokens
@pytest.mark.parametrize(("parallel", "ranks", "tokens"), [("tensor", 3, 4), ("pipeline", 2, 8)])
def test_default_model_tokens_and_bytes_match_one_process(parallel, ranks, tokens):
    single = _single(tokens)
    run = _launch(ranks, [*RANK, *GENERATE, "--max-tokens", str(tokens), "--parallel", parallel])
    assert run.returncode == 0, run.stderr
    got = _json_line(run.stdout)
    assert len(got["tokens"]) == tokens
    assert got["tokens"] == single["tokens"] and got["text"] == single["text"]
    assert got["world_size"] == ranks and len(got["ranks"]) == ranks
    per_rank = [r["cache_bytes"] for r in got["ranks"]]
    assert got["cache_bytes"] == per_rank[0] < single["cache_bytes"]
    assert sum(per_rank) == got["total_cache_bytes"] == single["cache_bytes"]
    for key in ("used_cache_bytes", "fp16_cache_bytes"):
        assert sum(r[key] for r in got["ranks"]) == single[key]
    layers = [r["compressed_layers"] for r in got["ranks"]]
    assert layers == ([15, 15] if parallel == "pipeline" else [30, 30, 30])
    assert got["compressed_layers"] == layers[0]
    if parallel == "tensor":  # each rank: every layer, one of the 3 KV heads
        assert len(set(per_rank)) == 1
    assert f"{parallel} parallel" in run.stderr


@pytest.mark.parametrize(("parallel", "bits"), [("tensor", 4), ("pipeline", 2)])
def test_tiny_model_from_python_matches_one_process(parallel, bits):
    script = [sys.executable, str(HERE / "distributed_tiny.py")]
    alone = subprocess.run([*script, "none", "turboquant_mse", str(bits)], capture_output=True,
                           text=True, timeout=120, env=ENV)  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    want = _json_line(alone.stdout)
    run = _launch(2, [*script, parallel, "turboquant_mse", str(bits)])
    assert run.returncode == 0, run.stderr
    got = _json_line(run.stdout)
    assert got["tokens"] == want["tokens"]
    assert len(got["cache_bytes"]) == 2 and sum(got["cache_bytes"]) == want["cache_bytes"][0]


def test_ranks_with_other_cache_flags_are_refused_at_start():
    per_rank_bits = '[ "$MLX_RANK" = 1 ] && b=2 || b=4; exec "$@" --bits "$b"'
    cmd = ["bash", "-c", per_rank_bits, "bash", *RANK, *GENERATE, "--max-tokens", "4",
           "--parallel", "pipeline"]  # fmt: skip
    run = _launch(2, cmd)
    assert run.returncode != 0
    assert "vq settings differ across ranks: vq cache (ranks 1 differ from rank 0)" in run.stderr
    assert "vq launch: error: rank" in run.stderr
    assert "{" not in run.stdout  # nothing was generated


def _start_reader(stream, lines: list[str]) -> threading.Thread:
    t = threading.Thread(target=lambda: lines.extend(iter(stream.readline, "")), daemon=True)
    t.start()
    return t


def _wait_for(lines: list[str], needle: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        for line in list(lines):
            if needle in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no line with {needle!r} in time:\n{''.join(lines)}")


def _pid_of_rank(lines, rank, deadline) -> int:
    line = _wait_for(lines, f"rank {rank}/2 (pid ", deadline)
    return int(line.split("(pid ")[1].split(",")[0])


def test_rank_killed_mid_generation_ends_the_launch_with_an_error():
    cmd = _launch_cmd(2, [*RANK, "generate", "--prompt", PROMPT, "--max-tokens", "400",
                          "--parallel", "pipeline", "--rank-timeout", "20"])  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)  # fmt: skip
    out, err = [], []
    _start_reader(proc.stdout, out), _start_reader(proc.stderr, err)
    try:
        victim = _pid_of_rank(err, 1, time.monotonic() + 120)
        deadline = time.monotonic() + 120
        while not "".join(out).strip() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert "".join(out).strip(), "".join(err)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        rc = proc.wait(timeout=30)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.3)
    stderr = "".join(err)
    assert rc != 0 and took < 30, stderr
    assert "vq launch: error: rank 1 was killed by signal 9 (SIGKILL) first" in stderr


def test_a_hung_rank_makes_the_other_stop_at_the_rank_timeout(tmp_path):
    """Two ranks started by hand (no launcher to stop them): rank 1 is frozen (SIGSTOP)
    once sharded, so rank 0 waits on it until its watchdog fires."""
    port = _port(2)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    cmd = [*RANK, *GENERATE, "--max-tokens", "4", "--parallel", "pipeline", "--rank-timeout", "4"]
    procs, errs = [], []
    for rank in (0, 1):
        env = {**ENV, "MLX_HOSTFILE": str(hosts), "MLX_RANK": str(rank)}
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)  # fmt: skip
        procs.append(p)
        errs.append([])
        _start_reader(p.stderr, errs[-1])
    try:
        _wait_for(errs[1], "rank 1/2 (pid ", time.monotonic() + 120)
        procs[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        rc = procs[0].wait(timeout=60)
        took = time.monotonic() - stopped_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    time.sleep(0.3)
    stderr = "".join(errs[0])
    assert rc == 3, stderr  # vq_mlxlm.distributed.EXIT_TIMEOUT
    # rank 1 froze in the settings check or the first prefill collective (a race)
    assert "rank 0: no progress for 4 s while " in stderr
    assert "another rank died, hangs or cannot be reached" in stderr
    assert took < 4 + 30


def test_serve_under_pipeline_parallelism_answers_like_one_process():
    """mlx-lm's server in distributed mode (rank 0 serves HTTP, the other follows), its
    model sharded and patched by vq serve: the greedy answer is the one-process one."""
    import urllib.request

    port = _port(1)
    cmd = _launch_cmd(2, [*RANK, "serve", "--parallel", "pipeline", "--port", str(port),
                          "--max-tokens", "8"])  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)  # fmt: skip
    out, err = [], []
    _start_reader(proc.stdout, out), _start_reader(proc.stderr, err)
    pids = []
    try:
        deadline = time.monotonic() + 240
        pids = [_pid_of_rank(err, r, deadline) for r in (0, 1)]
        _wait_for(err, "Starting httpd", deadline)
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
                "temperature": 0}  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=240) as response:
            answer = json.loads(response.read())
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert answer["choices"][0]["message"]["content"] == _single(8)["text"]
    assert answer["usage"]["completion_tokens"] == 8
