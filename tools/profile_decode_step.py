"""Where a decode step's GPU time goes: every kernel of one compiled decode step of a
Llama-3-8B-shaped model, summed per kernel name, for mlx-lm's fp16 cache and vq caches side
by side in one run (not a test; needs ``torch`` with CUDA for its CUPTI profiler, which is
not a vq dependency).

Per config this prints the step's summed kernel time, its kernel count, and the
``--top`` kernels by time with how many times a step launches each. A kernel that takes
longer beside vq's kernels than beside fp16's (the weight GEMVs, say) shows up as the same
name with more time; kernels a vq step adds show up as names fp16 lacks.

    python tools/profile_decode_step.py --context 4096 --configs turboquant_mse:4 kivi:4
"""

# ruff: noqa: E402  (a fast BLAS must be loaded before mlx.core is imported)
from __future__ import annotations

import argparse

import vq_mlxlm

vq_mlxlm.enable_fast_blas()

import mlx.core as mx
from bench_decode_attention import kernel_times
from bench_model_decode import _filled, _with, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096, help="smaller for a smoke test")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--configs", nargs="+", default=["turboquant_mse:4"])
    args = ap.parse_args()
    if args.steps < 1 or args.layers < 1 or args.context < 1:
        raise SystemExit("--steps, --layers and --context must be at least 1")
    model, dtype = build(args.layers, args.hidden)
    kv_heads, head_dim = model.args.num_key_value_heads, model.args.head_dim
    print(f"device {mx.default_device()}, MLX {mx.__version__}, layers {args.layers}")
    for cfg in [None, *args.configs]:
        cache = _filled(_with(model, cfg), args.context, kv_heads, head_dim, dtype)
        times = kernel_times(lambda cache=cache: model(mx.array([[1]]), cache=cache), args.steps)
        us = sum(t for t, _ in times.values())
        count = sum(n for _, n in times.values())
        print(f"== {args.context} {cfg or 'fp16'}: {us / 1e3:.2f} ms, {count:.0f} kernels a step")
        for name, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {t:9.1f} us {n:6.1f}x  {name[:100]}")
        del cache
        mx.clear_cache()
    _with(model, None)


if __name__ == "__main__":
    main()
