"""GPU probe: custom codebook kernel inside mx.compile; per-layer attention overhead."""
import time, statistics, sys
import mlx.core as mx
import vq_kernels as vk
HQ, HKV, D, L = 32, 8, 128, 4096
SCALE = D ** -0.5
def t(fn, n=30):
    for _ in range(5): mx.eval(fn())
    s = []
    for _ in range(n):
        a = time.perf_counter(); mx.eval(fn()); s.append(time.perf_counter() - a)
    return statistics.median(s) * 1e6
kp = mx.random.randint(0, 2**31, (1, HKV, L, 16)).astype(mx.uint32)
vp = mx.random.randint(0, 2**31, (1, HKV, L, 16)).astype(mx.uint32)
n = mx.random.uniform(0.5, 2, (1, HKV, L)).astype(mx.float16)
cb = mx.sort(mx.random.normal((16,)) * 0.09)
q = mx.random.normal((1, HQ, 1, D))
lens = mx.array([L - 100], mx.int32)
mx.eval(kp, vp, n, cb, q, lens)
def attn(q, kp, n, vp, lens):
    return vk.codebook_decode_attention(q, kp, n, cb, 4, vp, n, cb, 4, scale=SCALE, lengths=lens)
c_attn = mx.compile(attn)
o1, l1 = attn(q, kp, n, vp, lens)
for i in range(3):
    o2, l2 = c_attn(q, kp, n, vp, lens)
    mx.eval(o2, l2)
    print("compiled parity call", i, float(mx.abs(o1 - o2).max()), float(mx.abs(l1 - l2).max()), flush=True)
# changing lengths value under compile (no retrace, device array)
lens2 = mx.array([L - 7], mx.int32)
o3, _ = attn(q, kp, n, vp, lens2); o4, _ = c_attn(q, kp, n, vp, lens2)
print("compiled new lengths", float(mx.abs(o3 - o4).max()), flush=True)
# per-layer overhead: 32 layers of one kernel each, eval once per step
layers = 32
def step_plain():
    return [attn(q, kp, n, vp, lens)[0] for _ in range(layers)]
def step_comp():
    return [c_attn(q, kp, n, vp, lens)[0] for _ in range(layers)]
k16 = mx.random.normal((1, HKV, L, D)).astype(mx.float16); q16 = q.astype(mx.float16)
def step_sdpa():
    return [mx.fast.scaled_dot_product_attention(q16, k16, k16, scale=SCALE) for _ in range(layers)]
print("32 layers us: sdpa", t(step_sdpa), "kernel", t(step_plain), "compiled kernel", t(step_comp), flush=True)
# now the whole current vq attend path at model level shapes
import vq_algorithms, vq_core
from vq_core.cache import CompressedKVCache
from vq_core.registry import create
caches = []
for i in range(layers):
    c = vq_core.make_cache("turboquant_mse", head_dim=D, bits=4, seed=2 * i)
    for _ in range(1):
        c.update_and_fetch(mx.random.normal((1, HKV, L, D)).astype(mx.float16), mx.random.normal((1, HKV, L, D)).astype(mx.float16))
    arrs = [a for a in vars(c).values() if isinstance(a, mx.array)] + [a for v in vars(c).values() if isinstance(v, dict) for a in v.values()]
    mx.eval(arrs)
    caches.append(c)
kn = mx.random.normal((1, HKV, 1, D)).astype(mx.float16)
def step_vq():
    outs = []
    for c in caches:
        kv, vv = c.update_and_fetch(kn, kn)
        outs.append(vq_core.attend(q16, kv, vv, scale=SCALE, mask=None))
    return outs
print("32 layers us: vq attend+update (tq_mse@4, sink, center)", t(step_vq, 60), flush=True)
