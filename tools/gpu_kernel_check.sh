#!/usr/bin/env bash
# One call on a lent GPU machine: the kernels' GPU parity tests, the decode-attention benchmark
# (every family and width, with the tunings), nvcc's register report and one ncu profile of
# the codebook kernel at 128k. MLX's CUDA build must be importable (PYTHONPATH); results go
# to $OUT (or ./gpu_out). Each step has its own time limit so one stuck step keeps the rest.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/packages/vq-kernels/src:$PWD/packages/vq-core/src:$PWD/packages/vq-algorithms/src
export MLX_ENABLE_TF32=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/smi.txt"
P=packages/vq-kernels/tests/test_gpu_parity.py
timeout 120 python3 -m pytest -q -p no:cacheprovider "$P" -k "ragged or rabitq or long_and_empty" 2>&1 | tail -8 | tee "$OUT/parity_quick.txt"
timeout 240 python3 tools/bench_decode_attention.py --per-sync 20 --iters 30 --variants 2>&1 | tee "$OUT/bench.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider "$P" 2>&1 | tail -15 | tee "$OUT/parity_full.txt"
python3 tools/kernel_registers.py codebook_attn codebook_attn:KB=2,VB=2 affine_attn pq_attn_partial 2>&1 | tee "$OUT/regs.txt"
timeout 60 ncu --clock-control none -k regex:codebook_attn -s 2 -c 1 --section SpeedOfLight \
  --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis python3 -c "
import mlx.core as mx, vq_kernels as vk
L = 131072
kp = mx.random.randint(0, 2**31, (1, 8, L, 16)).astype(mx.uint32)
n = mx.ones((1, 8, L), mx.float16)
cb = mx.sort(mx.random.normal((16,)) * 0.09)
q, lens = mx.random.normal((1, 32, 1, 128)), mx.array([L], mx.int32)
for _ in range(4):
    mx.eval(vk.codebook_decode_attention(q, kp, n, cb, 4, kp, n, cb, 4, scale=0.088, lengths=lens))
" 2>&1 | grep -v "^==PROF==" | tail -60 | tee "$OUT/ncu.txt"
