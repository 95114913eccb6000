// Decode attention over scalar-codebook K/V codes on the CPU (vq_kernels.codebook_decode_attention).
//
// Computes what codebook_decode_attention_reference computes, in one pass over the codes
// (flash-decoding: running max m, sum l and unnormalized output per query row, in base 2):
//   s_i   = scale * (w_i * (q . c_k[kidx_i]) + t_i * (q_t . c_t[tidx_i]))
//   w_i   = k_norm_i [/ k_divisor_i] [/ ||c_k[kidx_i]||]     t_i = t_norm_i * t_scale
//   out   = sum_i p_i v_norm_i c_v[vidx_i] / sum_i p_i,  lse = log sum_i exp(s_i)
// for every batch row b over its first lengths[b] tokens and every query row of kv head h
// (query heads h*g .. h*g+g-1, Lq tokens each: g*Lq rows, contiguous in q).
//
// Codes: b-bit codes along the head dim form one little-endian bit stream per token (code j
// at stream bits [j*b, j*b+b), stream bit s = bit s%32 of uint32 word s/32; 3-bit codes
// straddle words), ceil(D*b/32) words per token (vq_kernels.packing). Norms are IEEE fp16.
//
// Work is cut into items (batch row, kv head, row group, token chunk) run on a small
// persistent thread pool; chunk partials are merged by log-sum-exp. The AVX2/FMA path
// (D % 8 == 0) decodes 8 codes at a time with a register table lookup
// (_mm256_permutevar8x32_ps; 4-bit codes use two tables and a blend on the 4th bit);
// the scalar path is portable and is what the AVX2 path is tested against as well.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

extern "C" {

// The op's arguments; mirrored field by field by vq_kernels/codebook_attention_cpu.py.
struct VqCodebookAttn {
  int32_t batch, hq, hkv, lq, d, lbuf;
  const float* q;              // [B, Hq, Lq, D]
  const uint32_t* k_words;     // [B, Hkv, Lbuf, Wk]
  const uint16_t* k_norm;      // [B, Hkv, Lbuf] fp16
  const uint16_t* k_divisor;   // [B, Hkv, Lbuf] fp16 or null
  const float* k_codebook;     // [2^k_bits]
  int32_t k_bits, k_unit;
  const uint32_t* v_words;     // [B, Hkv, Lbuf, Wv]
  const uint16_t* v_norm;      // [B, Hkv, Lbuf] fp16
  const float* v_codebook;     // [2^v_bits]
  int32_t v_bits, t_bits;      // t_bits 0: no second key term
  const float* t_q;            // [B, Hq, Lq, D]
  const uint32_t* t_words;     // [B, Hkv, Lbuf, Wt]
  const uint16_t* t_norm;      // [B, Hkv, Lbuf] fp16
  const float* t_codebook;     // [2^t_bits]
  float t_scale, scale;        // scale: the natural softmax scale
  const int32_t* lengths;      // [B] valid tokens per batch row (clamped to [0, Lbuf])
  float* out;                  // [B, Hq, Lq, D]
  float* lse;                  // [B, Hq, Lq], natural log
  int32_t threads;             // workers including the caller
  int32_t min_chunk;           // fewest tokens one item takes
  int32_t scalar;              // 1: the portable path even where AVX2 is compiled in
};

int vq_codebook_attn(const VqCodebookAttn* a);
int vq_codebook_attn_simd();

}  // extern "C"

namespace {

constexpr int ROW_GROUP = 4;   // query rows one item scores together
constexpr int BLOCK = 16;      // tokens per online-softmax step
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline int words_for(int d, int bits) { return (d * bits + 31) / 32; }

// Code j of one token's word row.
inline uint32_t code_at(const uint32_t* row, int j, int bits, int n_words) {
  int s = j * bits, w = s >> 5, sh = s & 31;
  uint64_t lo = row[w], hi = (w + 1 < n_words) ? row[w + 1] : 0;
  return uint32_t(((hi << 32) | lo) >> sh) & ((1u << bits) - 1);
}

// The 8 codes j .. j+7 (j % 8 == 0) of one row as the low 8*bits bits of a word.
inline uint32_t eight_codes(const uint32_t* row, int j, int bits, int n_words) {
  int s = j * bits, w = s >> 5, sh = s & 31;
  uint64_t lo = row[w], hi = (sh + 8 * bits > 32 && w + 1 < n_words) ? row[w + 1] : 0;
  return uint32_t(((hi << 32) | lo) >> sh);
}

struct Item {
  int b, h, r0, rows, t0, t1, slot;
};

// Per-item partial: m[rows], l[rows], acc[rows][d], base 2.
struct Partial {
  float* m;
  float* l;
  float* acc;
};

// ---- portable path ---------------------------------------------------------------------

void item_scalar(const VqCodebookAttn& a, const Item& it, Partial p) {
  const int d = a.d, g = a.hq / a.hkv;
  const int wk = words_for(d, a.k_bits), wv = words_for(d, a.v_bits);
  const int wt = a.t_bits ? words_for(d, a.t_bits) : 0;
  const size_t head = size_t(it.b) * a.hkv + it.h;
  const size_t qrow = (size_t(it.b) * a.hq + size_t(it.h) * g) * a.lq + it.r0;
  const float* q = a.q + qrow * d;
  const float* tq = a.t_bits ? a.t_q + qrow * d : nullptr;
  const float s2 = a.scale * LOG2E;
  std::vector<float> kv(d), vv(d), tv(d);
  for (int r = 0; r < it.rows; ++r) {
    p.m[r] = -INFINITY;
    p.l[r] = 0.f;
  }
  std::fill(p.acc, p.acc + size_t(it.rows) * d, 0.f);
  for (int t = it.t0; t < it.t1; ++t) {
    const size_t tok = head * a.lbuf + t;
    const uint32_t* kr = a.k_words + tok * wk;
    float cn2 = 0.f;
    for (int j = 0; j < d; ++j) {
      kv[j] = a.k_codebook[code_at(kr, j, a.k_bits, wk)];
      cn2 += kv[j] * kv[j];
    }
    float w = half_to_float(a.k_norm[tok]);
    if (a.k_divisor) w /= half_to_float(a.k_divisor[tok]);
    if (a.k_unit) w = cn2 > 0.f ? w / std::sqrt(cn2) : 0.f;
    float wt2 = 0.f;
    if (a.t_bits) {
      const uint32_t* tr = a.t_words + tok * wt;
      for (int j = 0; j < d; ++j) tv[j] = a.t_codebook[code_at(tr, j, a.t_bits, wt)];
      wt2 = half_to_float(a.t_norm[tok]) * a.t_scale;
    }
    const uint32_t* vr = a.v_words + tok * wv;
    const float vn = half_to_float(a.v_norm[tok]);
    for (int j = 0; j < d; ++j) vv[j] = vn * a.v_codebook[code_at(vr, j, a.v_bits, wv)];
    for (int r = 0; r < it.rows; ++r) {
      float dot = 0.f, dot2 = 0.f;
      for (int j = 0; j < d; ++j) dot += q[size_t(r) * d + j] * kv[j];
      if (a.t_bits)
        for (int j = 0; j < d; ++j) dot2 += tq[size_t(r) * d + j] * tv[j];
      const float s = s2 * (w * dot + wt2 * dot2);
      const float mn = std::max(p.m[r], s);
      const float alpha = p.m[r] == -INFINITY ? 0.f : std::exp2(p.m[r] - mn);
      const float e = std::exp2(s - mn);
      p.l[r] = p.l[r] * alpha + e;
      float* acc = p.acc + size_t(r) * d;
      for (int j = 0; j < d; ++j) acc[j] = acc[j] * alpha + e * vv[j];
      p.m[r] = mn;
    }
  }
}

// ---- AVX2 / FMA path -------------------------------------------------------------------

#ifdef __AVX2__

struct Table {  // a codebook of 2^bits floats as lookups on 8 codes at a time
  __m256 lo, hi;
  __m256i shifts, mask;
  int bits;
  Table(const float* c, int b) : bits(b) {
    alignas(32) float t[16] = {0};
    for (int i = 0; i < (1 << b); ++i) t[i] = c[i];
    lo = _mm256_load_ps(t);
    hi = _mm256_load_ps(t + 8);
    shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    mask = _mm256_set1_epi32((1 << b) - 1);
  }
};

template <int B>
inline __m256 lookup8(const Table& tb, const uint32_t* row, int j, int n_words) {
  const __m256i idx = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_set1_epi32(int(eight_codes(row, j, B, n_words))), tb.shifts),
      tb.mask);
  const __m256 low = _mm256_permutevar8x32_ps(tb.lo, idx);
  if constexpr (B < 4) {
    return low;
  } else {  // bit 3 of the code picks the upper table: move it to the sign bit for blendv
    const __m256 high = _mm256_permutevar8x32_ps(tb.hi, idx);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
}

inline __m256 lookup8_any(const Table& tb, const uint32_t* row, int j, int n_words) {
  switch (tb.bits) {
    case 1: return lookup8<1>(tb, row, j, n_words);
    case 2: return lookup8<2>(tb, row, j, n_words);
    case 3: return lookup8<3>(tb, row, j, n_words);
    default: return lookup8<4>(tb, row, j, n_words);
  }
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// 2^x for x <= 0 (clamped at -126): 2^round(x) times a degree-6 Taylor polynomial of
// 2^f = e^(f ln 2) on f in [-1/2, 1/2] (relative error about 2e-7).
inline __m256 exp2_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps(LN2));
  __m256 y = _mm256_set1_ps(1.f / 720.f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 120.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 24.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 6.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

template <int KB, int VB, int R>
void item_avx2(const VqCodebookAttn& a, const Item& it, Partial p) {
  const int d = a.d, g = a.hq / a.hkv, nc = d / 8;
  const int wk = words_for(d, KB), wv = words_for(d, VB);
  const int wt = a.t_bits ? words_for(d, a.t_bits) : 0;
  const size_t head = size_t(it.b) * a.hkv + it.h;
  const size_t qrow = (size_t(it.b) * a.hq + size_t(it.h) * g) * a.lq + it.r0;
  const float* q = a.q + qrow * d;
  const float* tq = a.t_bits ? a.t_q + qrow * d : nullptr;
  const float s2 = a.scale * LOG2E;
  const Table kt(a.k_codebook, KB), vt(a.v_codebook, VB);
  const Table tt(a.t_bits ? a.t_codebook : a.k_codebook, a.t_bits ? a.t_bits : KB);
  const size_t base = head * a.lbuf;
  const uint32_t* kw = a.k_words + base * wk;
  const uint32_t* vw = a.v_words + base * wv;
  const uint32_t* tw = a.t_bits ? a.t_words + base * wt : nullptr;
  float m[R], l[R];
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  std::fill(p.acc, p.acc + size_t(R) * d, 0.f);
  alignas(32) float s[R][BLOCK], coef[R][BLOCK];
  for (int t0 = it.t0; t0 < it.t1; t0 += BLOCK) {
    const int nt = std::min(BLOCK, it.t1 - t0);
    for (int t = 0; t < nt; ++t) {  // scores of the block
      const size_t tok = size_t(t0 + t);
      const uint32_t* kr = kw + tok * wk;
      __m256 acc[R], sq = _mm256_setzero_ps();
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
      for (int c = 0; c < nc; ++c) {
        const __m256 kc = lookup8<KB>(kt, kr, 8 * c, wk);
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + size_t(r) * d + 8 * c), kc, acc[r]);
        if (a.k_unit) sq = _mm256_fmadd_ps(kc, kc, sq);
      }
      float w = half_to_float(a.k_norm[base + tok]);
      if (a.k_divisor) w /= half_to_float(a.k_divisor[base + tok]);
      if (a.k_unit) {
        const float cn2 = hsum(sq);
        w = cn2 > 0.f ? w / std::sqrt(cn2) : 0.f;
      }
      for (int r = 0; r < R; ++r) s[r][t] = s2 * w * hsum(acc[r]);
      if (a.t_bits) {
        const uint32_t* tr = tw + tok * wt;
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int c = 0; c < nc; ++c) {
          const __m256 tc = lookup8_any(tt, tr, 8 * c, wt);
          for (int r = 0; r < R; ++r)
            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(tq + size_t(r) * d + 8 * c), tc, acc[r]);
        }
        const float w2 = s2 * half_to_float(a.t_norm[base + tok]) * a.t_scale;
        for (int r = 0; r < R; ++r) s[r][t] += w2 * hsum(acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {  // online softmax: rescale, then this block's weights
      float mb = s[r][0];
      for (int t = 1; t < nt; ++t) mb = std::max(mb, s[r][t]);
      const float mn = std::max(m[r], mb);
      const float alpha = m[r] == -INFINITY ? 0.f : std::exp2(m[r] - mn);
      for (int t = nt; t < BLOCK; ++t) s[r][t] = -INFINITY;
      __m256 sum = _mm256_setzero_ps();
      for (int t = 0; t < BLOCK; t += 8) {
        __m256 e = exp2_neg(_mm256_sub_ps(_mm256_load_ps(&s[r][t]), _mm256_set1_ps(mn)));
        e = _mm256_and_ps(e, _mm256_cmp_ps(_mm256_load_ps(&s[r][t]), _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
        sum = _mm256_add_ps(sum, e);
        _mm256_store_ps(&coef[r][t], e);
      }
      l[r] = l[r] * alpha + hsum(sum);
      m[r] = mn;
      if (alpha != 1.f) {
        const __m256 av = _mm256_set1_ps(alpha);
        float* accr = p.acc + size_t(r) * d;
        for (int c = 0; c < nc; ++c)
          _mm256_storeu_ps(accr + 8 * c, _mm256_mul_ps(_mm256_loadu_ps(accr + 8 * c), av));
      }
      for (int t = 0; t < nt; ++t) coef[r][t] *= half_to_float(a.v_norm[base + t0 + t]);
    }
    for (int c = 0; c < nc; ++c) {  // values of the block, 8 dims at a time
      __m256 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_loadu_ps(p.acc + size_t(r) * d + 8 * c);
      for (int t = 0; t < nt; ++t) {
        const __m256 vc = lookup8<VB>(vt, vw + size_t(t0 + t) * wv, 8 * c, wv);
        for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(coef[r][t]), vc, acc[r]);
      }
      for (int r = 0; r < R; ++r) _mm256_storeu_ps(p.acc + size_t(r) * d + 8 * c, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    p.m[r] = m[r];
    p.l[r] = l[r];
  }
}

using ItemFn = void (*)(const VqCodebookAttn&, const Item&, Partial);

template <int KB, int VB>
ItemFn pick_rows(int rows) {
  switch (rows) {
    case 1: return item_avx2<KB, VB, 1>;
    case 2: return item_avx2<KB, VB, 2>;
    case 3: return item_avx2<KB, VB, 3>;
    default: return item_avx2<KB, VB, 4>;
  }
}

template <int KB>
ItemFn pick_values(int vb, int rows) {
  switch (vb) {
    case 1: return pick_rows<KB, 1>(rows);
    case 2: return pick_rows<KB, 2>(rows);
    case 3: return pick_rows<KB, 3>(rows);
    default: return pick_rows<KB, 4>(rows);
  }
}

ItemFn pick_avx2(int kb, int vb, int rows) {
  switch (kb) {
    case 1: return pick_values<1>(vb, rows);
    case 2: return pick_values<2>(vb, rows);
    case 3: return pick_values<3>(vb, rows);
    default: return pick_values<4>(vb, rows);
  }
}

#endif  // __AVX2__

// ---- thread pool -----------------------------------------------------------------------

// Persistent workers (the caller is one more); a call runs items 0..n-1 on `threads` of
// them. Rebuilt after fork (a child has none of its parent's threads).
class Pool {
 public:
  void run(int threads, int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> call(call_mu_);
    const int helpers = std::max(0, std::min(threads, n) - 1);
    if (helpers == 0) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    grow(helpers);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      active_ = helpers;
      pending_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [&] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void grow(int helpers) {
    if (pid_ != getpid()) {  // forked: the threads are gone; forget them
      workers_.clear();
      pid_ = getpid();
    }
    while (int(workers_.size()) < helpers) {
      const int id = int(workers_.size());
      workers_.push_back(new std::thread([this, id] { loop(id); }));
      workers_.back()->detach();
    }
  }

  void drain() {
    for (int i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
  }

  void loop(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      wake_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;
      lk.unlock();
      drain();
      lk.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread*> workers_;
  pid_t pid_ = getpid();
  const std::function<void(int)>* fn_ = nullptr;
  int n_ = 0, active_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  std::atomic<int> next_{0};
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: detached workers may outlive main
  return *p;
}

}  // namespace

extern "C" int vq_codebook_attn_simd() {
#ifdef __AVX2__
  return 1;
#else
  return 0;
#endif
}

extern "C" int vq_codebook_attn(const VqCodebookAttn* ap) {
  const VqCodebookAttn& a = *ap;
  if (a.hkv <= 0 || a.hq % a.hkv || a.d <= 0 || a.lq <= 0) return 1;
  for (int bits : {a.k_bits, a.v_bits})
    if (bits < 1 || bits > 4) return 2;
  if (a.t_bits < 0 || a.t_bits > 4) return 2;
  const int rows = a.hq / a.hkv * a.lq, d = a.d;
  const int groups = (rows + ROW_GROUP - 1) / ROW_GROUP;
  const int threads = std::max(1, a.threads);
  const int min_chunk = std::max(BLOCK, a.min_chunk);
  // Chunks per (batch row, kv head, row group): enough items to keep every worker busy
  // (four per worker), none shorter than min_chunk tokens.
  const int units = a.batch * a.hkv * groups;
  const int want = threads > 1 ? std::max(1, (4 * threads + units - 1) / units) : 1;
  std::vector<Item> items;
  std::vector<int> first(size_t(a.batch) * a.hkv * groups + 1, 0);
  int slot = 0;
  for (int b = 0; b < a.batch; ++b) {
    const int n = std::clamp(a.lengths[b], 0, a.lbuf);
    const int chunks = std::max(1, std::min(want, (n + min_chunk - 1) / min_chunk));
    const int per = ((n + chunks - 1) / chunks + BLOCK - 1) / BLOCK * BLOCK;
    for (int h = 0; h < a.hkv; ++h)
      for (int gi = 0; gi < groups; ++gi) {
        const int r0 = gi * ROW_GROUP, nr = std::min(ROW_GROUP, rows - r0);
        first[(size_t(b) * a.hkv + h) * groups + gi] = slot;
        for (int t0 = 0; t0 < n; t0 += per)
          items.push_back({b, h, r0, nr, t0, std::min(n, t0 + per), slot++});
      }
  }
  first.back() = slot;
  const size_t stride = size_t(ROW_GROUP) * (d + 2);
  std::vector<float> scratch(size_t(slot) * stride);
  auto partial = [&](int s) {
    float* base = scratch.data() + size_t(s) * stride;
    return Partial{base, base + ROW_GROUP, base + 2 * ROW_GROUP};
  };
  std::function<void(int)> run_item;
#ifdef __AVX2__
  if (!a.scalar && d % 8 == 0) {
    run_item = [&](int i) {
      const Item& it = items[i];
      pick_avx2(a.k_bits, a.v_bits, it.rows)(a, it, partial(it.slot));
    };
  }
#endif
  if (!run_item) run_item = [&](int i) { item_scalar(a, items[i], partial(items[i].slot)); };
  pool().run(threads, int(items.size()), run_item);
  // Merge each (batch row, kv head, row group)'s chunks by log-sum-exp (base 2).
  for (int b = 0; b < a.batch; ++b)
    for (int h = 0; h < a.hkv; ++h)
      for (int gi = 0; gi < groups; ++gi) {
        const size_t u = (size_t(b) * a.hkv + h) * groups + gi;
        const int s0 = first[u], s1 = first[u + 1];
        const int r0 = gi * ROW_GROUP, nr = std::min(ROW_GROUP, rows - r0);
        for (int r = 0; r < nr; ++r) {
          const size_t row = (size_t(b) * a.hq + size_t(h) * (a.hq / a.hkv)) * a.lq + r0 + r;
          float* o = a.out + row * d;
          float top = -INFINITY;
          for (int s = s0; s < s1; ++s) top = std::max(top, partial(s).m[r]);
          if (top == -INFINITY) {  // no valid token
            std::fill(o, o + d, 0.f);
            a.lse[row] = -INFINITY;
            continue;
          }
          std::fill(o, o + d, 0.f);
          float total = 0.f;
          for (int s = s0; s < s1; ++s) {
            const Partial p = partial(s);
            const float w = std::exp2(p.m[r] - top);
            total += p.l[r] * w;
            const float* acc = p.acc + size_t(r) * d;
            for (int j = 0; j < d; ++j) o[j] += w * acc[j];
          }
          for (int j = 0; j < d; ++j) o[j] /= total;
          a.lse[row] = (top + std::log2(total)) * LN2;
        }
      }
  return 0;
}
