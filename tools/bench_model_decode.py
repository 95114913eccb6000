"""Decode tokens/s of a Llama-3-8B-shaped model (random 4-bit weights) at a long context,
with mlx-lm's fp16 KVCache and with vq caches, in one run (not a test; meant for a GPU).

32 layers, hidden 4096, 32 query / 8 KV heads, head_dim 128, MLP 14336, vocab 128256. The
caches are filled with random keys/values for ``--context`` tokens (prefill cost is not what
is measured), then ``--steps`` single-token decode steps are timed.

    python tools/bench_model_decode.py --context 32768 --configs turboquant_mse:4 turboquant_mse:2
"""

# ruff: noqa: I001  (vq_mlxlm must load a fast BLAS before mlx.core is imported)
from __future__ import annotations

import argparse
import time

import vq_mlxlm
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

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


def fill(cache, context: int, chunk: int = 4096) -> None:
    for c in cache:
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            k = mx.random.normal((1, 8, n, 128)).astype(mx.float16)
            c.update_and_fetch(k, k)
            mx.eval(c.state)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32, help="fewer for a quick smoke test")
    ap.add_argument("--configs", nargs="+", default=["turboquant_mse:4", "turboquant_mse:2"])
    args = ap.parse_args()
    model = llama.Model(llama.ModelArgs(**{**ARGS, "num_hidden_layers": args.layers}))
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    print(f"device {mx.default_device()}, MLX {mx.__version__}, context {args.context}")
    base = decode_tps(model, _filled(model, args.context), args.steps)
    print(f"{'fp16 KVCache':<20} {base:8.2f} tok/s  1.00x", flush=True)
    for cfg in args.configs:
        method, bits = cfg.split(":")
        vq_mlxlm.patch(model, method, int(bits))
        tps = decode_tps(model, _filled(model, args.context), args.steps)
        print(f"{cfg:<20} {tps:8.2f} tok/s  {tps / base:.2f}x", flush=True)
        vq_mlxlm.unpatch(model)
    again = decode_tps(model, _filled(model, args.context), args.steps)
    print(f"{'fp16 KVCache (again)':<20} {again:8.2f} tok/s  {again / base:.2f}x", flush=True)


def _filled(model, context):
    cache = make_prompt_cache(model)
    fill(cache, context)
    return cache


if __name__ == "__main__":
    main()
