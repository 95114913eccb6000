"""Time of one layer's decode attention on the CPU (not a test): the codebook op on the
pure-MLX reference and on the native "cpu" backend (1 thread and all), against exact float32
attention (``mx.fast.scaled_dot_product_attention``), for the default model's shapes.

    uv run python tools/bench_cpu_attention.py [--tokens 4096 8192] [--bits 4] [--repeats 50]
"""

# ruff: noqa: E402  (a fast BLAS must be loaded before mlx.core is imported)
from __future__ import annotations

import argparse
import os
import time

import vq_mlxlm

vq_mlxlm.enable_fast_blas()

import mlx.core as mx

import vq_kernels as vk

B, HQ, HKV, D = 1, 9, 3, 64  # SmolLM2-135M: 9 query / 3 KV heads, head_dim 64
SDPA = mx.fast.scaled_dot_product_attention


def per_call_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` evaluated, in ms (after three warm-up calls)."""
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def inputs(n: int, bits: int, rabitq: bool):
    ks = mx.random.split(mx.random.key(0), 6)
    q = mx.random.normal((B, HQ, 1, D), key=ks[0])
    idx = mx.random.randint(0, 1 << bits, (2, B, HKV, n, D), key=ks[1])
    kp, vp = (vk.pack_bits(i, bits, backend="reference") for i in idx)
    norms = mx.random.uniform(0.5, 2.0, (2, B, HKV, n), key=ks[2]).astype(mx.float16)
    c = mx.sort(mx.random.normal((1 << bits,), key=ks[3]))
    extra = {}
    if rabitq:
        c = mx.arange(1 << bits, dtype=mx.float32) - ((1 << bits) - 1) / 2
        div = mx.random.uniform(0.7, 1.0, (B, HKV, n), key=ks[4]).astype(mx.float16)
        extra = {"k_divisor": div, "k_unit": True}
    mx.eval(q, kp, vp, norms, c, *extra.values())
    return (q, kp, norms[0], c, bits, vp, norms[1], c, bits), extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    print(f"MLX {mx.__version__}, {os.cpu_count()} CPUs; ms per layer call (median)")
    print(
        f"{'tokens':>7} {'keys':>8} {'exact':>7} {'reference':>10} {'cpu 1 thr':>10} {'cpu all':>8}"
    )
    for n in args.tokens:
        k = mx.random.normal((B, HKV, n, D))  # float32: the default model's dtype on the CPU
        qe = mx.random.normal((B, HQ, 1, D))
        mx.eval(k, qe)
        exact = per_call_ms(lambda k=k, qe=qe: SDPA(qe, k, k, scale=0.125), args.repeats)
        for rabitq in (False, True):
            a, extra = inputs(n, args.bits, rabitq)

            def op(backend, a=a, extra=extra):
                return vk.codebook_decode_attention(*a, scale=0.125, backend=backend, **extra)

            ref = per_call_ms(lambda: op("reference"), max(5, args.repeats // 10))
            os.environ["VQ_KERNELS_THREADS"] = "1"
            one = per_call_ms(lambda: op("cpu"), args.repeats)
            del os.environ["VQ_KERNELS_THREADS"]
            every = per_call_ms(lambda: op("cpu"), args.repeats)
            name = "rabitq" if rabitq else "codebook"
            print(f"{n:>7} {name:>8} {exact:>7.3f} {ref:>10.3f} {one:>10.3f} {every:>8.3f}")


if __name__ == "__main__":
    main()
