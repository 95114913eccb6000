"""Decode-attention timing: fp16 SDPA vs mlx-lm-style quantized attention vs vq's fused kernel.

B=1, 32 query heads, 8 KV heads, head_dim 128, one query token, contexts 4k / 32k / 128k, all
in one run so the ratios compare like with like. Times are medians in microseconds; each
sample calls the op and blocks on ``mx.eval`` (``--per-sync N`` runs N calls per eval and
divides, which hides the per-eval overhead).

    PYTHONPATH=packages/vq-kernels/src python tools/bench_decode_attention.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import mlx.core as mx

import vq_kernels as vk

B, HQ, HKV, D = 1, 32, 8, 128
SCALE = D**-0.5


def mlx_lm_quantized_sdpa(q, qk, qv, *, group_size: int, bits: int) -> mx.array:
    """mlx-lm's quantized_scaled_dot_product_attention (two quantized matmuls), no mask."""
    b, hq, lq, d = q.shape
    hkv = qk[0].shape[-3]
    q = (q * SCALE).reshape(b, hkv, hq // hkv, lq, d)
    qk = [mx.expand_dims(x, -3) for x in qk]
    qv = [mx.expand_dims(x, -3) for x in qv]
    s = mx.quantized_matmul(q, *qk, transpose=True, group_size=group_size, bits=bits)
    p = mx.softmax(s, axis=-1, precise=True)
    out = mx.quantized_matmul(p, *qv, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(b, hq, lq, d)


def time_us(fn: Callable[[], object], iters: int, per_sync: int) -> float:
    for _ in range(5):
        mx.eval(fn())
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        mx.eval([fn() for _ in range(per_sync)])
        samples.append((time.perf_counter() - start) / per_sync * 1e6)
    return statistics.median(samples)


def cases(length: int) -> dict[str, Callable[[], object]]:
    ks = mx.random.split(mx.random.key(length), 4)
    q16 = mx.random.normal((B, HQ, 1, D), key=ks[0]).astype(mx.float16)
    k16 = mx.random.normal((B, HKV, length, D), key=ks[1]).astype(mx.float16)
    v16 = mx.random.normal((B, HKV, length, D), key=ks[2]).astype(mx.float16)
    out: dict[str, Callable[[], object]] = {
        "fp16 sdpa": lambda: mx.fast.scaled_dot_product_attention(q16, k16, v16, scale=SCALE)
    }
    for bits in (4, 8):
        qk = mx.quantize(k16, group_size=64, bits=bits)
        qv = mx.quantize(v16, group_size=64, bits=bits)
        mx.eval(qk, qv)
        out[f"mlx-lm q{bits}"] = lambda qk=qk, qv=qv, bits=bits: mlx_lm_quantized_sdpa(
            q16, qk, qv, group_size=64, bits=bits
        )
    q32 = q16.astype(mx.float32)
    norms = mx.random.uniform(0.5, 2.0, (B, HKV, length), key=ks[3]).astype(mx.float16)
    for bits in (2, 3, 4):
        w = vk.n_words(D, bits)
        kp = mx.random.randint(0, 2**31, (B, HKV, length, w), key=ks[1]).astype(mx.uint32)
        vp = mx.random.randint(0, 2**31, (B, HKV, length, w), key=ks[2]).astype(mx.uint32)
        cb = mx.sort(mx.random.normal((1 << bits,)) * 0.09)
        mx.eval(kp, vp, cb, norms)
        out[f"vq {bits}-bit"] = lambda kp=kp, vp=vp, cb=cb, bits=bits: vk.codebook_decode_attention(
            q32, kp, norms, cb, bits, vp, norms, cb, bits, scale=SCALE
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--per-sync", type=int, default=1)
    args = ap.parse_args()
    print(f"mlx {mx.__version__}, device {mx.default_device()}, backend {vk.available_backend()}")
    print(f"B={B} Hq={HQ} Hkv={HKV} D={D}, median of {args.iters}, {args.per_sync} call(s)/eval")
    results: dict[int, dict[str, float]] = {}
    for length in (int(x) for x in args.contexts.split(",")):
        results[length] = {
            n: time_us(f, args.iters, args.per_sync) for n, f in cases(length).items()
        }
        mx.clear_cache()
    names = list(next(iter(results.values())))
    head = f"{'op':<14}" + "".join(f"{f'{n // 1024}k µs':>10}{'vs fp16':>9}" for n in results)
    print(head)
    for name in names:
        row = f"{name:<14}"
        for r in results.values():
            row += f"{r[name]:>10.1f}{r['fp16 sdpa'] / r[name]:>8.2f}x"
        print(row)
    for length, r in results.items():
        for bits in (4,):
            print(
                f"{length // 1024}k: vq {bits}-bit is {r[f'mlx-lm q{bits}'] / r[f'vq {bits}-bit']:.1f}x "
                f"faster than mlx-lm q{bits}; vq 2-bit {r['fp16 sdpa'] / r['vq 2-bit']:.1f}x fp16"
            )
    for rec in vk.compile_report():
        print(
            f"compiled {rec.kernel} {dict(rec.specialization)} first call {rec.first_call_s:.2f} s"
        )


if __name__ == "__main__":
    main()
