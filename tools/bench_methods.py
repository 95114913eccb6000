"""Benchmark every zero-calibration method on the CPU at head_dim 128 (not a test).

For each method and bit width it prints encode throughput (vectors/s) and decode-attention
time over 4,096 cached tokens (1 query token, 32 query heads on 8 KV heads), each as a ratio
to the baselines measured in the same run: ``mx.quantize`` for encoding and fp16
``mx.fast.scaled_dot_product_attention`` for attention.

    uv run python tools/bench_methods.py [--tokens 4096] [--repeats 20]
"""

# ruff: noqa: I001, E402  (a fast BLAS must be loaded before mlx.core is imported)
from __future__ import annotations

import argparse
import time

import vq_mlxlm

vq_mlxlm.enable_fast_blas()  # before mlx.core is imported (MLX's Linux CPU backend)

import mlx.core as mx
import vq_algorithms  # noqa: F401
from vq_core import attend, available, create, get, make_cache

HEAD_DIM, KV_HEADS, Q_HEADS = 128, 8, 32


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` (evaluated) over ``repeats`` runs, after two warm-ups."""
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    n = args.tokens
    key = mx.random.key(0)
    k16 = mx.random.normal((1, KV_HEADS, n, HEAD_DIM), key=key).astype(mx.float16)
    v16 = mx.random.normal((1, KV_HEADS, n, HEAD_DIM), key=mx.random.key(1)).astype(mx.float16)
    q16 = mx.random.normal((1, Q_HEADS, 1, HEAD_DIM), key=mx.random.key(2)).astype(mx.float16)
    mx.eval(k16, v16, q16)
    vectors = KV_HEADS * n

    t_quant = timed(
        lambda: mx.quantize(k16.reshape(-1, HEAD_DIM), group_size=64, bits=4), args.repeats
    )
    t_sdpa = timed(
        lambda: mx.fast.scaled_dot_product_attention(q16, k16, v16, scale=HEAD_DIM**-0.5),
        args.repeats,
    )
    print(
        f"baselines: mx.quantize(4-bit) {vectors / t_quant:,.0f} vectors/s; "
        f"fp16 sdpa over {n} tokens {t_sdpa * 1e3:.3f} ms"
    )
    print(
        f"{'method':<22} {'bits/el':>7} {'encode vec/s':>14} {'vs quantize':>11} "
        f"{'attend ms':>10} {'vs sdpa':>8}"
    )
    for name in available():
        cls = get(name)
        if cls.needs_calibration:
            continue
        for bits in cls.config_class.allowed_bits:
            quant = create(name, head_dim=HEAD_DIM, bits=bits)
            t_enc = timed(lambda q=quant: q.encode(k16, check_finite=False), args.repeats)
            cache = make_cache(name, head_dim=HEAD_DIM, bits=bits)
            cache.update_and_fetch(k16, v16)
            mx.eval(cache.state)
            k1, v1 = k16[:, :, :1], v16[:, :, :1]
            view = cache.update_and_fetch(k1, v1)  # the decode step's own token is exact
            t_att = timed(lambda w=view: attend(q16, *w, scale=HEAD_DIM**-0.5), args.repeats)
            bpe = (
                cache.key_quantizer.bits_per_element + cache.value_quantizer.bits_per_element
            ) / 2
            print(
                f"{name + '@' + str(bits):<22} {bpe:>7.3f} {vectors / t_enc:>14,.0f} "
                f"{t_quant / t_enc:>10.2f}x {t_att * 1e3:>10.3f} {t_sdpa / t_att:>7.2f}x"
            )


if __name__ == "__main__":
    main()
