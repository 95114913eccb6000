"""Starting and stopping a ``vq serve`` process for the server tests."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str, output=subprocess.DEVNULL, timeout: float = 180):
    """``vq serve --port P *flags`` in a subprocess, once ``/health`` answers 200: returns
    ``(process, P)``. ``output``: where its stdout and stderr go (a file, or DEVNULL: then
    stderr is kept for the error). Raises RuntimeError with the server's last output if it
    exits or does not answer within ``timeout`` seconds."""
    port = free_port()
    cmd = [sys.executable, "-m", "vq_mlxlm.cli", "serve", "--port", str(port), *flags]
    err = subprocess.PIPE if output is subprocess.DEVNULL else subprocess.STDOUT
    proc = subprocess.Popen(cmd, stdout=output, stderr=err, text=True)
    deadline = time.time() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            said = proc.stderr.read() if proc.stderr else _tail(output)
            raise RuntimeError(f"vq serve did not start: {said[-2000:]}")
        time.sleep(0.5)


def stop_server(proc) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def _tail(output) -> str:
    try:
        output.flush()
        with open(output.name) as f:
            return f.read()
    except (AttributeError, OSError):
        return ""
