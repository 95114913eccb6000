"""Host time of a decode step: building the graph and handing it to the device, for mlx-lm's
fp16 KVCache and vq caches side by side in one run (not a test).

A decode step of a Llama-3-8B-shaped model (``bench_model_decode.build``) costs host time
twice: Python building the lazy graph (``model(tok, cache)``), then ``mx.async_eval`` walking
it and encoding every kernel launch. When the sum exceeds the device time of a step, decode
is host bound and a faster kernel changes nothing. Per config and context this prints the
median over ``--steps`` steps, each run alone (the device idle when it starts):

* ``build``: the forward call; ``dispatch``: ``mx.async_eval`` of its output;
* ``synced``: build + dispatch + waiting for the result (host and device in series);
* ``pipelined``: tok/s of steps chained as mlx-lm generates, the next step built while the
  device runs the last (``bench_model_decode.decode_tps``); and the graph's node count
  (``mx.export_to_dot``);
* ``device`` (with ``--device-time``): the GPU time of one step, every kernel it launches
  summed (CUPTI through PyTorch's profiler; needs ``torch`` with CUDA, not a vq dependency).
  A step whose ``device`` is well under its pipelined time is host bound.

    python tools/bench_decode_host.py --contexts 4096 --configs turboquant_mse:4 rabitq:4
"""

# ruff: noqa: E402  (a fast BLAS must be loaded before mlx.core is imported)
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import vq_mlxlm

vq_mlxlm.enable_fast_blas()

import mlx.core as mx
from bench_decode_attention import device_time_us
from bench_model_decode import _filled, _with, build, decode_tps


def graph_nodes(out: mx.array) -> int:
    """Nodes (arrays and primitives) of ``out``'s lazy graph, read from MLX's dot export."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g.dot")
        mx.export_to_dot(path, out)
        with open(path) as f:
            return sum(1 for line in f if "label" in line and "->" not in line)


def host_times(model, cache, steps: int, device_time: bool = False) -> dict[str, float]:
    tok = mx.array([[1]])
    for _ in range(5):
        tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
        mx.eval(tok)
    nodes = graph_nodes(model(tok, cache=cache))
    build_s, dispatch_s, synced_s = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(tok, cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        build_s.append(t1 - t0)
        dispatch_s.append(t2 - t1)
        synced_s.append(t3 - t0)
    tps = decode_tps(model, cache, steps)
    ms = {k: 1e3 * statistics.median(v) for k, v in
          (("build", build_s), ("dispatch", dispatch_s), ("synced", synced_s))}  # fmt: skip
    if device_time:
        ms["device"] = device_time_us(lambda: model(tok, cache=cache), steps, 1) / 1e3
    return {**ms, "pipelined_tps": tps, "nodes": nodes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096, help="smaller for a smoke test")
    ap.add_argument("--configs", nargs="+", default=["turboquant_mse:4", "rabitq:4"])
    ap.add_argument(
        "--device-time", action="store_true", help="also the GPU time of a step (CUPTI via torch)"
    )
    args = ap.parse_args()
    if args.steps < 1 or args.layers < 1:
        raise SystemExit("--steps and --layers must be at least 1")
    model, dtype = build(args.layers, args.hidden)
    kv_heads, head_dim = model.args.num_key_value_heads, model.args.head_dim
    print(f"device {mx.default_device()}, MLX {mx.__version__}, layers {args.layers}")
    print(f"{'context':>7} {'cache':<24} {'build':>8} {'dispatch':>9} {'synced':>8} "
          f"{'pipelined':>10} {'nodes':>6} {'device':>7}  (ms per step; tok/s)")  # fmt: skip
    for n in args.contexts:
        for cfg in [None, None, *args.configs]:  # fp16 twice: the first run warms up
            cache = _filled(_with(model, cfg), n, kv_heads, head_dim, dtype)
            t = host_times(model, cache, args.steps, args.device_time)
            dev = f"{t['device']:7.2f}" if "device" in t else f"{'-':>7}"
            print(
                f"{n:>7} {cfg or 'fp16':<24} {t['build']:8.2f} {t['dispatch']:9.2f} "
                f"{t['synced']:8.2f} {t['pipelined_tps']:10.1f} {t['nodes']:6d} {dev}",
                flush=True,
            )
            del cache
            mx.clear_cache()
    _with(model, None)


if __name__ == "__main__":
    main()
