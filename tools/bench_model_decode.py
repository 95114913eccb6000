"""Decode and prefill of a Llama-3-8B-shaped model (random 4-bit weights) with mlx-lm's fp16
KVCache and with vq caches, side by side in one run (not a test; meant for a GPU).

32 layers, hidden 4096, 32 query / 8 KV heads, head_dim 128, MLP 14336, vocab 128256.

* Decode: for each ``--contexts`` length one cache per config is filled with random
  keys/values (``update_and_fetch`` in 4,096-token chunks; prefill cost is not measured
  there), then ``--rounds`` rounds each time ``--steps`` single-token steps of every config,
  fp16 first; a cell is the median over the rounds (the spread is printed). fp16 is run once
  before, as a warm-up (a fresh process's first run is several times slower).
* Prefill: ``--prefill`` tokens run through the model in ``--chunk``-token chunks, each
  chunk evaluated; tok/s and the peak memory over the weights (``mx.get_peak_memory``
  after ``mx.reset_peak_memory``, minus the memory held before).

Every cell prints the same-run fp16 baseline and the ratio. ``--json PATH`` writes them all.

    python tools/bench_model_decode.py --contexts 4096 32768 131072 --prefill 8192 32768 \\
        --configs turboquant_mse:4 turboquant_mse:2 rabitq:4 rabitq:2 --json out.json
"""

# ruff: noqa: E402  (a fast BLAS must be loaded before mlx.core is imported)
from __future__ import annotations

import argparse
import json
import statistics
import time

import vq_mlxlm

vq_mlxlm.enable_fast_blas()  # before mlx.core is imported (MLX's Linux CPU backend)

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from vq_mlxlm.layer_caches import CachePlan

ARGS = dict(
    model_type="llama",
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    vocab_size=128256,
    rope_theta=500000.0,
    head_dim=128,
)
GIB = 1024**3
FP32_LOOP = False  # --fp32-loop: every config uses the codebook kernel's fp32 loop
_PLAN_LAG = CachePlan.encode_lag  # restored after a +nolag config


def build(layers: int = 32, hidden: int = 4096):
    """``(model, dtype)``: the Llama-3-8B shape with random 4-bit weights (group 64), fp16
    on a GPU and fp32 on the CPU; ``layers``/``hidden`` smaller for a smoke test (32 heads
    of ``hidden / 32``, 8 KV heads, a small MLP and vocabulary)."""
    shape = {**ARGS, "num_hidden_layers": layers}
    if hidden != 4096:
        shape.update(
            hidden_size=hidden, head_dim=hidden // 32, intermediate_size=256, vocab_size=1024
        )
    model = llama.Model(llama.ModelArgs(**shape))
    dtype = mx.float16 if mx.default_device() == mx.gpu else mx.float32  # CPU: fp32 compute
    model.set_dtype(dtype)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model, dtype


def _arrays(cache) -> list[mx.array]:
    """Every array a cache object holds (to evaluate it without building its state)."""
    out = []
    for value in vars(cache).values():
        if isinstance(value, mx.array):
            out.append(value)
        elif isinstance(value, dict):
            out.extend(a for a in value.values() if isinstance(a, mx.array))
    return out


def fill(cache, context: int, kv_heads: int, head_dim: int, dtype, chunk: int = 4096) -> None:
    for c in cache:
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            k = mx.random.normal((1, kv_heads, n, head_dim)).astype(dtype)
            c.update_and_fetch(k, k)
            mx.eval(_arrays(c))


def decode_tps(model, cache, steps: int) -> float:
    tok = mx.array([[1]])
    for _ in range(3):
        mx.eval(model(tok, cache=cache))
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
        mx.async_eval(tok)
    mx.eval(tok)
    return steps / (time.perf_counter() - t0)


def prefill(model, tokens: int, chunk: int) -> tuple[float, float]:
    """(tok/s, peak GiB over what was held before) of a chunked prefill on a fresh cache."""
    cache = make_prompt_cache(model)
    ids = mx.random.randint(0, model.args.vocab_size, (1, tokens))
    mx.eval(ids)
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for start in range(0, tokens, chunk):
        out = model(ids[:, start : start + chunk], cache=cache)
        mx.eval(out, [_arrays(c) for c in cache])
    dt = time.perf_counter() - t0
    peak = (mx.get_peak_memory() - held) / GIB
    del cache, out
    mx.clear_cache()
    return tokens / dt, peak


def _with(model, cfg: str | None):
    """Patch ``model`` with ``cfg`` (``method:bits``; ``+fp32loop`` appended for the codebook
    kernel's fp32 loop instead of its tensor-core loop, ``+nolag`` for no decode-time encode
    lag in any layer, ``+nocompile`` for mlx-lm's forward on every decode step instead of
    vq_mlxlm.compiled_decode) or unpatch it (``None``)."""
    from vq_kernels import _attention

    vq_mlxlm.unpatch(model)
    CachePlan.encode_lag = _PLAN_LAG
    if cfg is not None:
        spec, *variants = cfg.split("+")
        unknown = set(variants) - {"fp32loop", "nolag", "nocompile"}
        if unknown:
            raise SystemExit(
                f"unknown config variant(s) {sorted(unknown)} in {cfg!r} "
                "(known: fp32loop, nolag, nocompile)"
            )
        if "nolag" in variants:
            CachePlan.encode_lag = lambda self, i: 0
        _attention.USE_MMA = not (FP32_LOOP or "fp32loop" in variants)  # keys the traces
        method, bits = spec.split(":")
        vq_mlxlm.patch(model, method, int(bits), compiled_decode="nocompile" not in variants)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768, 131072])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="decode: every config (fp16 first) is timed once per round on caches filled "
        "once; each cell is the median over the rounds",
    )
    ap.add_argument(
        "--fp32-loop",
        action="store_true",
        help="every config uses the codebook kernel's fp32 loop (USE_MMA off) instead of "
        "its tensor-core loop; or append +fp32loop to one config, e.g. turboquant_mse:4+fp32loop",
    )
    ap.add_argument("--prefill", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32, help="fewer for a quick smoke test")
    ap.add_argument("--hidden", type=int, default=4096, help="smaller for a smoke test")
    ap.add_argument("--configs", nargs="+", default=["turboquant_mse:4", "turboquant_mse:2"])
    ap.add_argument(
        "--other-configs",
        nargs="*",
        default=[],
        help="configs measured only at the contexts in --other-contexts",
    )
    ap.add_argument("--other-contexts", type=int, nargs="*", default=[32768])
    ap.add_argument("--json", help="write every cell here")
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    global FP32_LOOP
    FP32_LOOP = args.fp32_loop
    model, dtype = build(args.layers, args.hidden)
    kv_heads, head_dim = model.args.num_key_value_heads, model.args.head_dim
    print(f"device {mx.default_device()}, MLX {mx.__version__}, layers {args.layers}", flush=True)
    cells = []

    def save():
        if args.json:  # after every cell, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                meta = {"device": str(mx.default_device()), "mlx": mx.__version__}
                json.dump({**meta, "cells": cells}, f)

    def row(kind, n, cfg, value, base, unit, extra=""):
        ratio = value / base if base else float("nan")
        cells.append(dict(kind=kind, tokens=n, cache=cfg, value=value, fp16=base, ratio=ratio))
        save()
        print(
            f"{kind:<8} {n:>7} {cfg:<22} {value:10.2f} {unit:<6} fp16 {base:10.2f}  "
            f"{ratio:5.2f}x {extra}",
            flush=True,
        )

    for n in args.contexts:
        configs = list(args.configs) + (args.other_configs if n in args.other_contexts else [])
        warm = decode_tps(
            _with(model, None), _filled(model, n, kv_heads, head_dim, dtype), args.steps
        )
        caches = {None: _filled(model, n, kv_heads, head_dim, dtype)}
        for cfg in configs:
            caches[cfg] = _filled(_with(model, cfg), n, kv_heads, head_dim, dtype)
        samples: dict = {cfg: [] for cfg in caches}
        for _ in range(args.rounds):  # every config once per round, fp16 first
            for cfg, cache in caches.items():
                samples[cfg].append(decode_tps(_with(model, cfg), cache, args.steps))
        base = statistics.median(samples[None])
        row("decode", n, "fp16 (1st, warm-up)", warm, base, "tok/s")
        for cfg, got in samples.items():
            spread = f"(rounds {min(got):.1f}-{max(got):.1f})" if len(got) > 1 else ""
            name = "fp16 (baseline)" if cfg is None else cfg
            row("decode", n, name, statistics.median(got), base, "tok/s", spread)
            cells[-1].update(samples=got)
        save()
        del caches
        mx.clear_cache()
    for n in args.prefill:
        prefill(_with(model, None), min(n, 2 * args.chunk), args.chunk)  # warm-up
        base, base_peak = prefill(model, n, args.chunk)
        row("prefill", n, "fp16", base, base, "tok/s", f"peak {base_peak:6.2f} GiB")
        cells[-1].update(peak_gib=base_peak, fp16_peak_gib=base_peak)
        save()
        for cfg in args.configs + args.other_configs:
            prefill(_with(model, cfg), min(n, 2 * args.chunk), args.chunk)  # warm-up (compiles)
            tps, peak = prefill(model, n, args.chunk)
            row(
                "prefill",
                n,
                cfg,
                tps,
                base,
                "tok/s",
                f"peak {peak:6.2f} GiB (fp16 {base_peak:.2f})",
            )
            cells[-1].update(peak_gib=peak, fp16_peak_gib=base_peak)
            save()
    _with(model, None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(mx.default_device()), "mlx": mx.__version__, "cells": cells}, f
            )


def _filled(model, context, kv_heads, head_dim, dtype):
    cache = make_prompt_cache(model)
    fill(cache, context, kv_heads, head_dim, dtype)
    return cache


if __name__ == "__main__":
    main()
