// Helpers shared by every backend, written in the subset Metal and CUDA share.

// Bits [off, off + n) of the 64-bit window hi:lo, n <= 32.
VQ_INLINE vq_u32 vq_window(vq_u32 lo, vq_u32 hi, int off) {
  vq_u64 w = (((vq_u64)hi) << 32) | ((vq_u64)lo);
  return (vq_u32)(w >> off);
}

// 1 / ln(2) and ln(2): scores are kept in base 2 so exp2 can be used.
#define VQ_LN2 0.6931471805599453f

// A base-2 flash-decoding partial: running max m, sum l = sum 2^(s - m), output a.
struct vq_partial {
  float m;
  float l;
  float a;
};

// Merge n partials at stride `stride` (m[i], l[i], a[i * astride]) into one.
VQ_INLINE vq_partial vq_merge_shared(const VQ_TG float* m, const VQ_TG float* l,
                                     const VQ_TG float* a, int n, int stride, int astride) {
  float M = -vq_inf();
  for (int i = 0; i < n; ++i) M = vq_max(M, m[i * stride]);
  const float Mu = (M == -vq_inf()) ? 0.0f : M;
  vq_partial r;
  r.m = M;
  r.l = 0.0f;
  r.a = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float f = vq_exp2(m[i * stride] - Mu);
    r.l += f * l[i * stride];
    r.a += f * a[i * astride];
  }
  return r;
}

// Merge one row's S split partials (pm, pl [S], pacc [S, D] at dim d, read past the cache so
// other thread groups' writes are seen) into out[d] and, for d == 0, the natural lse.
VQ_INLINE void vq_merge_splits(const VQ_DEVICE float* pm, const VQ_DEVICE float* pl,
                               const VQ_DEVICE float* pacc, int S, int D, int d,
                               VQ_DEVICE float* out, VQ_DEVICE float* lse) {
  float M = -vq_inf();
  for (int s = 0; s < S; ++s) M = vq_max(M, vq_load_cg(pm + s));
  const float Mu = (M == -vq_inf()) ? 0.0f : M;
  float L = 0.0f;
  float A = 0.0f;
  for (int s = 0; s < S; ++s) {
    const float f = vq_exp2(vq_load_cg(pm + s) - Mu);
    L += f * vq_load_cg(pl + s);
    A += f * vq_load_cg(pacc + s * D + d);
  }
  out[d] = L > 0.0f ? A / L : 0.0f;
  if (d == 0) lse[0] = L > 0.0f ? (Mu + vq_log2(L)) * VQ_LN2 : -vq_inf();
}

// The 64-bit window hi:lo shifted right by off (bits [off, off + n), n <= 64 - off).
VQ_INLINE vq_u64 vq_window64(vq_u32 lo, vq_u32 hi, int off) {
  return ((((vq_u64)hi) << 32) | ((vq_u64)lo)) >> off;
}

// Store a float as the output's element type.
VQ_INLINE void vq_store(VQ_DEVICE float* p, float v) { *p = v; }
VQ_INLINE void vq_store(VQ_DEVICE vq_half* p, float v) { *p = vq_to_half(v); }

// Table lookups by byte offset: entry (x >> sh) & (n - 1) of a table whose entries lie
// 2^SL bytes apart is at byte ((x >> sh) & (n - 1)) << SL, which one shift and one mask
// give (sh known at compile time once unrolled); vq_lut reads the float there. Three
// instructions a lookup with the lane's copy ORed in, against five through an index.
template <int SL>
VQ_INLINE vq_u32 vq_field_offset(vq_u32 x, int sh, vq_u32 n) {
  const vq_u32 m = (n - 1u) << SL;
  return (sh >= SL ? (x >> (sh - SL)) : (x << (SL - sh))) & m;
}
VQ_INLINE float vq_lut(const VQ_TG float* table, vq_u32 byte_offset) {
  return *(const VQ_TG float*)((const VQ_TG char*)table + byte_offset);
}
