// vq-kernels Metal prelude: the vocabulary the shared kernel bodies are written in.
// Everything backend-specific lives here or in prelude_cuda.cuh; bodies use only vq_* names.
#include <metal_stdlib>
using namespace metal;

typedef uint vq_u32;
typedef ulong vq_u64;
typedef int vq_i32;
typedef half vq_half;

#define VQ_SHARED threadgroup
#define VQ_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define VQ_INLINE inline
#define VQ_UNROLL _Pragma("unroll")
#define VQ_UNROLL4 _Pragma("unroll 4")
#define VQ_DEVICE device
#define VQ_TG threadgroup
#define VQ_THREAD thread

VQ_INLINE int vq_popcount(vq_u32 x) { return int(popcount(x)); }
VQ_INLINE float vq_shfl_xor(float v, int m) { return simd_shuffle_xor(v, ushort(m)); }
VQ_INLINE float vq_shfl(float v, int lane) { return simd_shuffle(v, ushort(lane)); }
VQ_INLINE float vq_exp2(float x) { return metal::exp2(x); }
VQ_INLINE float vq_log2(float x) { return metal::log2(x); }
VQ_INLINE float vq_sqrt(float x) { return metal::sqrt(x); }
VQ_INLINE float vq_abs(float x) { return metal::fabs(x); }
VQ_INLINE float vq_max(float a, float b) { return metal::fmax(a, b); }
VQ_INLINE float vq_inf() { return INFINITY; }
VQ_INLINE float vq_nan() { return NAN; }
VQ_INLINE float vq_to_float(vq_half x) { return float(x); }
VQ_INLINE float vq_to_float(float x) { return x; }
VQ_INLINE vq_half vq_to_half(float x) { return vq_half(x); }
VQ_INLINE float vq_bits_to_float(int x) { return as_type<float>(x); }
VQ_INLINE vq_u32 vq_float_bits(float x) { return as_type<uint>(x); }

// N consecutive words from p (prelude_cuda.cuh loads them as vectors).
// N consecutive elements of p as stored, unconverted: a load whose conversion waits until
// the value is used (a conversion at the load would stall there for it).
template <typename T, int N>
struct vq_vec {
  T v[N];
};
template <int N, typename T>
VQ_INLINE vq_vec<T, N> vq_fetch(const device T* p) {
  vq_vec<T, N> o;
  VQ_UNROLL for (int i = 0; i < N; ++i) o.v[i] = p[i];
  return o;
}

template <int N>
VQ_INLINE void vq_load_words(const device vq_u32* p, thread vq_u32* o) {
  for (int i = 0; i < N; ++i) o[i] = p[i];
}

// Cross-group hand-off. Metal runs the two-launch path (FUSED = 0): these compile, unused.
VQ_INLINE void vq_fence_device() { threadgroup_barrier(mem_flags::mem_device); }
VQ_INLINE int vq_atomic_inc(const device int* p) {
  return atomic_fetch_add_explicit((device atomic_int*)p, 1, memory_order_relaxed);
}
VQ_INLINE void vq_atomic_clear(const device int* p) {
  atomic_store_explicit((device atomic_int*)p, 0, memory_order_relaxed);
}
VQ_INLINE float vq_load_cg(const device float* p) { return *p; }

// Tensor-core stand-in (m16n8k16, the PTX fragment layout, see prelude_cuda.cuh): correct
// but slow, built from simd shuffles; the decode ops pick the MMA loop on CUDA only.
VQ_INLINE vq_u32 vq_pack_half2(float lo, float hi) {
  return vq_u32(as_type<ushort>(half(lo))) | (vq_u32(as_type<ushort>(half(hi))) << 16);
}
VQ_INLINE float vq_half_at(vq_u32 w, int hi) {
  return float(as_type<half>(ushort(hi ? (w >> 16) : (w & 0xffffu))));
}
VQ_INLINE vq_u32 vq_shfl_word(vq_u32 v, int lane) { return simd_shuffle(v, ushort(lane)); }
VQ_INLINE void vq_mma_16816(thread float* d, const thread vq_u32* a, const thread vq_u32* b,
                            const thread float* c, int lane) {
  const int grp = lane >> 2;
  const int tig = lane & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int col = tig * 2 + (i & 1);
    float acc = c[i];
    for (int kk = 0; kk < 8; ++kk) {
      const vq_u32 wa = vq_shfl_word(a[(i >> 1) + 2 * (kk >> 2)], grp * 4 + (kk & 3));
      const vq_u32 wb = vq_shfl_word(b[kk >> 2], col * 4 + (kk & 3));
      acc += vq_half_at(wa, 0) * vq_half_at(wb, 0) + vq_half_at(wa, 1) * vq_half_at(wb, 1);
    }
    out[i] = acc;
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
