"""Decode-attention timing: fp16 SDPA and mlx-lm-style quantized attention against vq's kernels.

32 query heads, 8 KV heads, head_dim 128, one query token, contexts 4k / 32k / 128k, all in
one run so the ratios compare like with like. Rows: fp16
``mx.fast.scaled_dot_product_attention``; mlx-lm's two-``quantized_matmul`` path at 2/4/8
bits; vq's scalar-codebook kernel (turboquant_mse; QJL keys are its 1-bit case) at 1-4 bits,
with per-row lengths on the device (``lengths=``, what a cache passes), with an int
``length`` (a host array per call), and with the splits merged by a second launch; RaBitQ
1-bit keys over 4-bit codebook values; vq's product-VQ lookup-table kernel (vecinfer /
comm_vq); vq's affine kernel over mlx-lm-format codes (affine, KIVI's values) at 2/4/8 bits.
Times are medians in microseconds; each sample runs ``--per-sync`` calls and blocks on one
``mx.eval``, so below ~40 µs a row measures the host building and launching the graph, not
the GPU. ``--device-time`` instead sums the GPU time of every kernel a call launches, read
through CUPTI by PyTorch's profiler (needs ``torch`` with CUDA; not a vq dependency).
``GB/s`` counts the bytes an op must read (codes, norms, scales) over its time.

    PYTHONPATH=packages/vq-kernels/src python tools/bench_decode_attention.py --per-sync 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import mlx.core as mx

import vq_kernels as vk
from vq_kernels import _attention

HQ, HKV, D = 32, 8, 128
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


def kernel_times(fn: Callable[[], object], iters: int) -> dict[str, tuple[float, float]]:
    """``{kernel name: (µs per call, launches per call)}`` over ``iters`` calls of ``fn``,
    after five warm-up calls (CUPTI through PyTorch's profiler)."""
    import collections

    import torch  # optional: only for --device-time
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        mx.eval(fn())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            mx.eval(fn())
    cuda = torch.autograd.DeviceType.CUDA
    total: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if e.device_type == cuda:
            total[e.name][0] += e.device_time_total
            total[e.name][1] += 1
    if not total:
        raise RuntimeError("the profiler saw no CUDA kernels: is this MLX's CUDA build?")
    return {k: (t / iters, n / iters) for k, (t, n) in total.items()}


def device_time_us(fn: Callable[[], object], iters: int, per_sync: int) -> float:
    """GPU time per call: every kernel the calls launch, summed, over ``iters`` calls."""
    del per_sync
    total = sum(t for t, _ in kernel_times(fn, iters).values())
    if total == 0:
        raise RuntimeError("the profiler saw no CUDA kernel time: is this MLX's CUDA build?")
    return total


def _with(fn: Callable[[], object], **settings: object) -> Callable[[], object]:
    """``fn`` run with some of the decode kernels' launch settings changed (restored after)."""

    def run() -> object:
        saved = {k: getattr(_attention, k) for k in settings}
        for k, v in settings.items():
            setattr(_attention, k, v)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                setattr(_attention, k, v)

    return run


Case = tuple[Callable[[], object], int]  # (op, bytes it must read)


def cases(b: int, length: int, variants: bool) -> dict[str, Case]:
    ks = mx.random.split(mx.random.key(length), 8)
    q16 = mx.random.normal((b, HQ, 1, D), key=ks[0]).astype(mx.float16)
    k16 = mx.random.normal((b, HKV, length, D), key=ks[1]).astype(mx.float16)
    v16 = mx.random.normal((b, HKV, length, D), key=ks[2]).astype(mx.float16)
    tokens = b * HKV * length
    q32 = q16.astype(mx.float32)
    norms = mx.random.uniform(0.5, 2.0, (b, HKV, length), key=ks[3]).astype(mx.float16)
    lens = mx.array([length] * b, dtype=mx.int32)
    out: dict[str, Case] = {
        "fp16 sdpa": (
            lambda: mx.fast.scaled_dot_product_attention(q16, k16, v16, scale=SCALE),
            tokens * D * 4,
        )
    }
    for bits in (2, 4, 8):
        qk = mx.quantize(k16, group_size=64, bits=bits)
        qv = mx.quantize(v16, group_size=64, bits=bits)
        mx.eval(qk, qv)
        out[f"mlx-lm q{bits}"] = (
            lambda qk=qk, qv=qv, bits=bits: mlx_lm_quantized_sdpa(
                q16, qk, qv, group_size=64, bits=bits
            ),
            tokens * 2 * (D * bits // 8 + 2 * 2 * D // 64),
        )
        out[f"vq affine q{bits}"] = (
            lambda qk=qk, qv=qv, bits=bits: vk.affine_decode_attention(
                q32, qk, qv, scale=SCALE, group_size=64, bits=bits, lengths=lens
            ),
            tokens * 2 * (D * bits // 8 + 2 * 2 * D // 64),
        )
    rot, _ = mx.linalg.qr(mx.random.normal((D, D), key=ks[7]), stream=mx.cpu)
    ek = mx.random.normal((b, HKV, 40, D), key=ks[6]).astype(mx.float16)
    mean = mx.random.normal((b, HKV, 1, D), key=ks[5]) * 0.1
    mx.eval(rot, ek, mean)
    counts = mx.array([[length] * b, [33] * b], dtype=mx.int32)
    for bits in (4,):  # affine's whole decode step (no rotation): 33 exact tokens
        qk, qv = (
            mx.quantize(k16, group_size=64, bits=bits),
            mx.quantize(v16, group_size=64, bits=bits),
        )
        affine_tail = vk.DecodeTail(None, None, ek, ek, counts)
        out[f"vq affine q{bits} tail"] = (
            lambda qk=qk, qv=qv, bits=bits, t=affine_tail: vk.affine_decode_attention(
                q16, qk, qv, scale=SCALE, group_size=64, bits=bits, tail=t
            ),
            tokens * 2 * (D * bits // 8 + 2 * 2 * D // 64),
        )
    for bits in (1, 2, 3, 4):
        w = vk.n_words(D, bits)
        kp = mx.random.randint(0, 2**31, (b, HKV, length, w), key=ks[4]).astype(mx.uint32)
        vp = mx.random.randint(0, 2**31, (b, HKV, length, w), key=ks[5]).astype(mx.uint32)
        cb = mx.sort(mx.random.normal((1 << bits,)) * 0.09)
        mx.eval(kp, vp, cb, norms, lens)
        args = (q32, kp, norms, cb, bits, vp, norms, cb, bits)
        nbytes = tokens * 2 * (w * 4 + 2)

        def dev(args=args):
            return vk.codebook_decode_attention(*args, scale=SCALE, lengths=lens)

        def host(args=args):
            return vk.codebook_decode_attention(*args, scale=SCALE, length=length)

        out[f"vq cb{bits}"] = (dev, nbytes)
        if bits in (2, 4):  # the whole decode step: rotations, 33 exact tokens, means
            tail = vk.DecodeTail(
                rot.astype(mx.float16), rot.T, ek, ek, mx.array([[length] * b, [33] * b], dtype=mx.int32),
                mean, mean, mx.array(True),
            )  # fmt: skip
            out[f"vq cb{bits} tail"] = (
                lambda args=args, tail=tail: vk.codebook_decode_attention(
                    q16, *args[1:], scale=SCALE, tail=tail
                ),
                nbytes,
            )
            # RaBitQ@bits keys (grid levels, norm / <o_bar, o>, unit code vectors), same values
            grid = mx.arange(1 << bits, dtype=mx.float32) - ((1 << bits) - 1) / 2
            ipb = mx.random.uniform(0.7, 0.9, norms.shape, key=ks[6]).astype(mx.float16)
            out[f"vq rabitq{bits} tail"] = (
                lambda args=args, tail=tail, grid=grid, ipb=ipb: vk.codebook_decode_attention(
                    q16, args[1], args[2], grid, *args[4:], scale=SCALE, tail=tail,
                    k_divisor=ipb, k_unit=True,
                ),
                nbytes + tokens * 2,
            )  # fmt: skip
            if bits == 4:  # TurboQuant-prod@4: 3-bit codes + the residual's 1-bit sketch
                k3 = mx.random.randint(0, 2**31, (b, HKV, length, vk.n_words(D, 3)), key=ks[4])
                sg = mx.random.randint(0, 2**31, (b, HKV, length, vk.n_words(D, 1)), key=ks[6])
                k3, sg = k3.astype(mx.uint32), sg.astype(mx.uint32)
                cb3 = mx.sort(mx.random.normal((8,)) * 0.09)
                mx.eval(k3, sg, cb3)
                pm_one = mx.array([-1.0, 1.0])  # q16 stands in for q @ M_k S^T
                sketch = vk.KeyTerm(q16, sg, norms, pm_one, 1, 0.01)
                out["vq prod4 tail"] = (
                    lambda k3=k3, cb3=cb3, sketch=sketch, args=args, tail=tail: (
                        vk.codebook_decode_attention(
                            q16, k3, norms, cb3, 3, *args[5:], scale=SCALE, tail=tail,
                            k_term=sketch,
                        )
                    ),
                    tokens * (4 * vk.n_words(D, 3) + 4 * vk.n_words(D, 1) + 4 + w * 4 + 2),
                )  # fmt: skip
            if variants:  # the fp32 loop (USE_MMA off); one-wave grids of other sizes
                tail_op = out[f"vq cb{bits} tail"][0]
                out[f"vq cb{bits} tail fp32 loop"] = (_with(tail_op, USE_MMA=False), nbytes)
                for groups in (132, 264, 528):
                    pinned = {"TARGET_GROUPS": groups, "LONG_GROUPS": groups}
                    out[f"vq cb{bits} tail TG={groups}"] = (_with(tail_op, **pinned), nbytes)
        if bits in (2, 4):
            out[f"vq cb{bits} int len"] = (host, nbytes)
            out[f"vq cb{bits} 2 launches"] = (_with(dev, MERGE_IN_KERNEL=False), nbytes)
            if variants:
                out[f"vq cb{bits} NT=2"] = (_with(dev, TOKENS_PER_LANE=2), nbytes)
                out[f"vq cb{bits} NT=8"] = (_with(dev, TOKENS_PER_LANE=8), nbytes)
                out[f"vq cb{bits} GT=2"] = (_with(dev, MAX_ROW_TILE=2), nbytes)
                out[f"vq cb{bits} GT=1"] = (_with(dev, MAX_ROW_TILE=1), nbytes)
    # RaBitQ 1-bit keys (grid ±1/2, norm / <ō,o>, unit codes) with 4-bit codebook values;
    # QJL keys are the plain 1-bit case (codebook ±1, norm), timed as "vq cb1".
    kp1 = mx.random.randint(0, 2**31, (b, HKV, length, vk.n_words(D, 1)), key=ks[4])
    vp4 = mx.random.randint(0, 2**31, (b, HKV, length, vk.n_words(D, 4)), key=ks[5])
    kp1, vp4 = kp1.astype(mx.uint32), vp4.astype(mx.uint32)
    grid, cb4 = mx.array([-0.5, 0.5]), mx.sort(mx.random.normal((16,)) * 0.09)
    ip = mx.random.uniform(0.7, 0.9, norms.shape, key=ks[6]).astype(mx.float16)
    mx.eval(kp1, vp4, grid, cb4, ip)
    out["vq rabitq1 k / cb4 v"] = (
        lambda: vk.codebook_decode_attention(
            q32,
            kp1,
            norms,
            grid,
            1,
            vp4,
            norms,
            cb4,
            4,
            scale=SCALE,
            lengths=lens,
            k_divisor=ip,
            k_unit=True,
        ),
        tokens * (16 + 4 + 64 + 2),
    )
    for m, kc in ((16, 256), (32, 256)):
        cent = mx.random.normal((m, kc, D // m), key=ks[6]) * 0.3
        codes = mx.random.randint(0, kc, (b, HKV, length, m), key=ks[7]).astype(mx.uint8)
        mx.eval(cent, codes)
        out[f"vq pq M{m}"] = (
            lambda cent=cent, codes=codes: vk.pq_decode_attention(
                q32, codes, cent, codes, cent, scale=SCALE
            ),
            tokens * 2 * m,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--per-sync", type=int, default=20)
    ap.add_argument("--variants", action="store_true", help="also time kernel tunings")
    ap.add_argument(
        "--device-time",
        action="store_true",
        help="GPU time per call from CUPTI (PyTorch's profiler) instead of wall time",
    )
    ap.add_argument(
        "--only",
        default="",
        help="time only the cases whose name contains this (fp16 sdpa always runs); "
        "e.g. 'vq cb' skips mlx-lm's cases, whose first call JIT-compiles for ~50 s",
    )
    args = ap.parse_args()
    print(f"mlx {mx.__version__}, device {mx.default_device()}, backend {vk.available_backend()}")
    print(
        f"B={args.batch} Hq={HQ} Hkv={HKV} D={D}, median of {args.iters}, "
        f"{args.per_sync} call(s)/eval"
    )
    results: dict[int, dict[str, tuple[float, int]]] = {}
    for length in (int(x) for x in args.contexts.split(",")):
        results[length] = {}
        for n, (f, nbytes) in cases(args.batch, length, args.variants).items():
            if args.only not in n and n != "fp16 sdpa":
                continue
            t0 = time.perf_counter()
            timer = device_time_us if args.device_time else time_us
            results[length][n] = (timer(f, args.iters, args.per_sync), nbytes)
            # one line per case as it finishes, so a slow or stuck case is named
            print(
                f"  {length // 1024}k {n}: {results[length][n][0]:.1f} µs "
                f"({time.perf_counter() - t0:.1f} s wall)",
                flush=True,
            )
        mx.clear_cache()
    names = list(next(iter(results.values())))
    head = f"{'op':<22}" + "".join(
        f"{f'{n // 1024}k µs':>10}{'vs fp16':>9}{'GB/s':>7}" for n in results
    )
    print(head)
    for name in names:
        row = f"{name:<22}"
        for r in results.values():
            us, nbytes = r[name]
            row += f"{us:>10.1f}{r['fp16 sdpa'][0] / us:>8.2f}x{nbytes / us / 1e3:>7.0f}"
        print(row)
    for length, r in results.items():
        for bits in (2, 4):
            if f"vq cb{bits}" not in r or f"mlx-lm q{bits}" not in r:
                continue
            print(
                f"{length // 1024}k: vq cb{bits} {r['fp16 sdpa'][0] / r[f'vq cb{bits}'][0]:.2f}x "
                f"fp16, {r[f'mlx-lm q{bits}'][0] / r[f'vq cb{bits}'][0]:.1f}x mlx-lm q{bits}"
            )
    for rec in vk.compile_report():
        print(
            f"compiled {rec.kernel} {dict(rec.specialization)} first call {rec.first_call_s:.2f} s"
        )


if __name__ == "__main__":
    main()
