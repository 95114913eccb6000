// vq-kernels CUDA prelude: the vocabulary the shared kernel bodies are written in.
// Everything backend-specific lives here or in prelude_metal.h; bodies use only vq_* names.
#include <cuda_fp16.h>

typedef unsigned int vq_u32;
typedef unsigned long long vq_u64;
typedef int vq_i32;
typedef __half vq_half;

#define VQ_SHARED __shared__
#define VQ_BARRIER() __syncthreads()
#define VQ_INLINE __device__ __forceinline__
#define VQ_UNROLL _Pragma("unroll")
#define VQ_UNROLL4 _Pragma("unroll 4")
#define VQ_DEVICE
#define VQ_TG
#define VQ_THREAD

VQ_INLINE int vq_popcount(vq_u32 x) { return __popc(x); }
VQ_INLINE float vq_shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
VQ_INLINE float vq_shfl(float v, int lane) { return __shfl_sync(0xffffffffu, v, lane); }
// ex2.approx.ftz: relative error below 2^-22 (PTX ISA), 2^-inf = +0; exp2f's denormal
// handling cost five more instructions per call.
VQ_INLINE float vq_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
VQ_INLINE float vq_log2(float x) { return log2f(x); }
VQ_INLINE float vq_sqrt(float x) { return sqrtf(x); }
VQ_INLINE float vq_abs(float x) { return fabsf(x); }
VQ_INLINE float vq_max(float a, float b) { return fmaxf(a, b); }
VQ_INLINE float vq_inf() { return __int_as_float(0x7f800000); }
VQ_INLINE float vq_nan() { return __int_as_float(0x7fc00000); }
VQ_INLINE float vq_to_float(vq_half x) { return __half2float(x); }
VQ_INLINE float vq_to_float(float x) { return x; }
VQ_INLINE vq_half vq_to_half(float x) { return __float2half_rn(x); }
VQ_INLINE float vq_bits_to_float(int x) { return __int_as_float(x); }
VQ_INLINE vq_u32 vq_float_bits(float x) { return __float_as_uint(x); }

// N consecutive words from p (aligned to 16 bytes when N % 4 == 0, to 8 when N == 2), in
// vector loads.
// N consecutive elements of p as stored, unconverted: a load whose conversion waits until
// the value is used (a conversion at the load would stall there for it).
template <typename T, int N>
struct vq_vec {
  T v[N];
};
template <int N, typename T>
VQ_INLINE vq_vec<T, N> vq_fetch(const T* p) {
  vq_vec<T, N> o;
  VQ_UNROLL for (int i = 0; i < N; ++i) o.v[i] = p[i];
  return o;
}

template <int N>
VQ_INLINE void vq_load_words(const vq_u32* p, vq_u32* o) {
  if constexpr (N % 4 == 0) {
    VQ_UNROLL for (int i = 0; i < N; i += 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(p + i);
      o[i] = v.x;
      o[i + 1] = v.y;
      o[i + 2] = v.z;
      o[i + 3] = v.w;
    }
  } else if constexpr (N == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    o[0] = v.x;
    o[1] = v.y;
  } else {
    VQ_UNROLL for (int i = 0; i < N; ++i) o[i] = p[i];
  }
}

// Cross-group hand-off (the last group of a launch merges the others' partials).
VQ_INLINE void vq_fence_device() { __threadfence(); }
VQ_INLINE int vq_atomic_inc(const int* p) { return atomicAdd(const_cast<int*>(p), 1); }
VQ_INLINE void vq_atomic_clear(const int* p) { atomicExch(const_cast<int*>(p), 0); }
VQ_INLINE float vq_load_cg(const float* p) { return __ldcg(p); }

// Thread and group ids, spelled out at the top of every body.
#define VQ_IDS                                              \
  const vq_u32 vq_tid = threadIdx.x;                        \
  const vq_u32 vq_lane = threadIdx.x & 31u;                 \
  const vq_u32 vq_gx = blockIdx.x;                          \
  const vq_u32 vq_gy = blockIdx.y;                          \
  const vq_u32 vq_gz = blockIdx.z;                          \
  const vq_u32 vq_gtid = blockIdx.x * blockDim.x + threadIdx.x; \
  const vq_u32 vq_ngx = gridDim.x;                          \
  (void)vq_tid; (void)vq_lane; (void)vq_gx; (void)vq_gy; (void)vq_gz; (void)vq_gtid; \
  (void)vq_ngx;

// Tensor cores: D = A B + C for one warp, m16n8k16, fp16 A [16x16] (row) and B [16x8] (col)
// as packed half2 words, fp32 C/D (the PTX ISA's fragment layout; lane is unused here).
VQ_INLINE void vq_mma_16816(float* d, const vq_u32* a, const vq_u32* b, const float* c,
                            int lane) {
  (void)lane;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
VQ_INLINE vq_u32 vq_pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<vq_u32*>(&h);
}
