// vq-kernels host prelude: runs a kernel body on the CPU, one fiber per GPU thread.
// The body's vocabulary (vq_*) is spelled with plain C++; a thread group's fibers share its
// VQ_SHARED (static) arrays and meet at every barrier and every shuffle (a shuffle is a
// group-wide rendezvous: the bodies only shuffle in group-uniform control flow, as a full
// warp mask requires). Groups run one after another; atomics need no hardware.
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

typedef uint32_t vq_u32;
typedef uint64_t vq_u64;
typedef int vq_i32;
typedef _Float16 vq_half;

#define VQ_SHARED static
#define VQ_BARRIER() vq_emu::sync()
#define VQ_INLINE inline
#define VQ_UNROLL
#define VQ_UNROLL4
#define VQ_DEVICE
#define VQ_TG
#define VQ_THREAD

using std::max;
using std::min;

namespace vq_emu {
struct Fiber {
  ucontext_t ctx;
  bool done;
  bool waiting;
  std::vector<char> stack;
};
inline std::vector<Fiber> fibers;
inline ucontext_t scheduler;
inline int cur = 0;
inline unsigned gx = 0, gy = 0, gz = 0, ngx = 0, tpb = 0;
inline void (*body)() = nullptr;
inline std::vector<float> slot;
inline std::vector<std::array<uint32_t, 6>> mslot;  // a warp's mma fragments (a[4], b[2])

inline void sync() {
  fibers[cur].waiting = true;
  swapcontext(&fibers[cur].ctx, &scheduler);
}

inline void entry() {
  body();
  fibers[cur].done = true;
}

// Runs one thread group of n threads to completion.
inline void run_group(int n) {
  fibers.resize(n);
  slot.assign(n, 0.0f);
  mslot.assign(n, {});
  for (int t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    f.done = false;
    f.waiting = false;
    f.stack.resize(1 << 16);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, entry, 0);
  }
  for (;;) {
    bool live = false;
    for (int t = 0; t < n; ++t) {
      if (fibers[t].done || fibers[t].waiting) continue;
      cur = t;
      swapcontext(&scheduler, &fibers[t].ctx);
    }
    for (int t = 0; t < n; ++t) {
      if (!fibers[t].done) {
        live = true;
        fibers[t].waiting = false;
      }
    }
    if (!live) return;
  }
}
}  // namespace vq_emu

VQ_INLINE int vq_popcount(vq_u32 x) { return __builtin_popcount(x); }
VQ_INLINE float vq_shfl_xor(float v, int m) {
  const int t = vq_emu::cur;
  vq_emu::slot[t] = v;
  vq_emu::sync();
  const float r = vq_emu::slot[(t & ~31) | ((t & 31) ^ m)];
  vq_emu::sync();
  return r;
}
VQ_INLINE float vq_shfl(float v, int lane) {
  const int t = vq_emu::cur;
  vq_emu::slot[t] = v;
  vq_emu::sync();
  const float r = vq_emu::slot[(t & ~31) | (lane & 31)];
  vq_emu::sync();
  return r;
}
VQ_INLINE float vq_exp2(float x) { return std::exp2(x); }
VQ_INLINE float vq_log2(float x) { return std::log2(x); }
VQ_INLINE float vq_sqrt(float x) { return std::sqrt(x); }
VQ_INLINE float vq_abs(float x) { return std::fabs(x); }
VQ_INLINE float vq_max(float a, float b) { return std::fmax(a, b); }
VQ_INLINE float vq_inf() { return INFINITY; }
VQ_INLINE float vq_nan() { return NAN; }
VQ_INLINE float vq_to_float(vq_half x) { return float(x); }
VQ_INLINE float vq_to_float(float x) { return x; }
VQ_INLINE vq_half vq_to_half(float x) { return vq_half(x); }
VQ_INLINE float vq_bits_to_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
VQ_INLINE vq_u32 vq_float_bits(float x) {
  vq_u32 u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
template <typename T, int N>
struct vq_vec {
  T v[N];
};
template <int N, typename T>
VQ_INLINE vq_vec<T, N> vq_fetch(const T* p) {
  vq_vec<T, N> o;
  for (int i = 0; i < N; ++i) o.v[i] = p[i];
  return o;
}
template <int N>
VQ_INLINE void vq_load_words(const vq_u32* p, vq_u32* o) {
  for (int i = 0; i < N; ++i) o[i] = p[i];
}
VQ_INLINE void vq_fence_device() {}
VQ_INLINE int vq_atomic_inc(const int* p) { return (*const_cast<int*>(p))++; }
VQ_INLINE void vq_atomic_clear(const int* p) { *const_cast<int*>(p) = 0; }
VQ_INLINE float vq_load_cg(const float* p) { return *p; }

struct VqShape {
  int v[8];
  int operator[](int i) const { return v[i]; }
};

#define VQ_IDS                                                                \
  const vq_u32 vq_tid = vq_u32(vq_emu::cur);                                  \
  const vq_u32 vq_lane = vq_tid & 31u;                                        \
  const vq_u32 vq_gx = vq_emu::gx;                                            \
  const vq_u32 vq_gy = vq_emu::gy;                                            \
  const vq_u32 vq_gz = vq_emu::gz;                                            \
  const vq_u32 vq_gtid = vq_emu::gx * vq_emu::tpb + vq_tid;                   \
  const vq_u32 vq_ngx = vq_emu::ngx;                                          \
  (void)vq_tid; (void)vq_lane; (void)vq_gx; (void)vq_gy; (void)vq_gz; (void)vq_gtid; \
  (void)vq_ngx;

// Tensor cores (m16n8k16, fp16 A/B as packed half2 words, fp32 C/D, the PTX ISA's layout):
// the warp's fragments meet in mslot; each thread computes its own four outputs.
VQ_INLINE float vq_half_at(uint32_t w, int hi) {
  const uint16_t h = hi ? uint16_t(w >> 16) : uint16_t(w & 0xffffu);
  vq_half f;
  std::memcpy(&f, &h, 2);
  return float(f);
}
VQ_INLINE vq_u32 vq_pack_half2(float lo, float hi) {
  const vq_half l = vq_half(lo), h = vq_half(hi);
  uint16_t a, b;
  std::memcpy(&a, &l, 2);
  std::memcpy(&b, &h, 2);
  return vq_u32(a) | (vq_u32(b) << 16);
}
VQ_INLINE void vq_mma_16816(float* d, const vq_u32* a, const vq_u32* b, const float* c, int) {
  const int t = vq_emu::cur;
  for (int i = 0; i < 4; ++i) vq_emu::mslot[t][i] = a[i];
  vq_emu::mslot[t][4] = b[0];
  vq_emu::mslot[t][5] = b[1];
  vq_emu::sync();
  const int base = t & ~31, lane = t & 31, grp = lane >> 2, tig = lane & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = grp + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) {
      const auto& sa = vq_emu::mslot[base + (row % 8) * 4 + (k % 8) / 2];
      const auto& sb = vq_emu::mslot[base + col * 4 + (k % 8) / 2];
      const float av = vq_half_at(sa[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
      const float bv = vq_half_at(sb[4 + (k >= 8 ? 1 : 0)], k & 1);
      acc += av * bv;
    }
    out[i] = acc;
  }
  vq_emu::sync();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
