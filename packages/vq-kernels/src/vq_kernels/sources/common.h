// Helpers shared by every backend, written in the subset Metal and CUDA share.

// Bits [off, off + n) of the 64-bit window hi:lo, n <= 32.
VQ_INLINE vq_u32 vq_window(vq_u32 lo, vq_u32 hi, int off) {
  vq_u64 w = (((vq_u64)hi) << 32) | ((vq_u64)lo);
  return (vq_u32)(w >> off);
}

// 1 / ln(2) and ln(2): scores are kept in base 2 so exp2 can be used.
#define VQ_LN2 0.6931471805599453f
