// 16-lane float vectors through GCC vector extensions: one zmm register with AVX-512,
// two ymm with AVX2, so the C++ kernels stay portable and the compiler picks the ISA
// from -march. Loads and stores are unaligned (memcpy compiles to vmovups).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>

namespace nanogpt {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));  // half a vf: blocked's 8-key tile
typedef int32_t vi8 __attribute__((vector_size(8 * sizeof(int32_t))));

// The native vector (one zmm with AVX-512, one ymm with AVX2): for loops over one long row, where
// vf's 16 lanes would be two registers that GCC handles poorly on AVX2 (see vmax below).
#ifdef __AVX512F__
constexpr int kW = 16;  // floats per native vector
typedef vf vw;
#else
constexpr int kW = 8;
typedef vf8 vw;
#endif
typedef uint32_t vwu __attribute__((vector_size(kW * sizeof(uint32_t))));  // vw's bits as unsigned lanes

// For small vector helpers whose operands must stay in registers: GCC's inliner declines some
// (a function with a loop, or called from two places), and then passes accumulators through memory.
#define NANOGPT_INLINE __attribute__((always_inline)) inline

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// x in every lane. x - 0 is x for every x, so GCC folds it to one broadcast; x + 0 is not (-0 + 0
// is +0), and `vf{} + x` kept a scalar add on the FP ports before each broadcast.
inline vf vsplat(float x) { return x - vf{}; }

inline vw wload(const float* p) {
  vw v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void wstore(float* p, vw v) { std::memcpy(p, &v, sizeof v); }
inline vw wsplat(float x) { return x - vw{}; }  // as vsplat
// Keeps x in a register for its uses to come: GCC otherwise folds the load that made x into each
// FMA that uses it (a memory operand per FMA), and on a Zen 4 an FMA with a zmm memory operand
// ran at 70% of the FMA rate (a /tmp microbenchmark), a register operand at 100%.
NANOGPT_INLINE void in_register(vw& x) { __asm__("" : "+v"(x)); }
// n < kW floats, the rest zero, without reading past p[n-1] (a masked load: no call, so the
// accumulators of the loops that use it stay in registers).
inline vw wload_part(const float* p, int n) {
#if defined(__AVX512F__)
  return (vw)_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
#elif defined(__AVX2__)
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return (vw)_mm256_maskload_ps(p, mask);
#else
  vw v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

// Functions on AVX-512 BF16 (vdpbf16ps), compiled whatever -march says and called only where
// cpu_has_avx512_bf16(): the bfloat16 flash tiles (bf16.cpp) and the peak they are measured against.
#define NANOGPT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline bool cpu_has_avx512_bf16() { return __builtin_cpu_supports("avx512bf16"); }

// Functions on AMX's tile registers (Sapphire Rapids and later), called only where
// bf16_amx_ready(): the bfloat16 flash tiles (bf16.cpp) and their peak (peak.cpp). Not inlined:
// a caller without the target attribute could not take them.
#define NANOGPT_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16"), noinline))

// This CPU has AMX with bfloat16 and the kernel lets this process use the tile registers (Linux
// asks for that once per process: arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA).
inline bool bf16_amx_ready() {
  static const bool ok = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                         syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

// Tile registers 0-7 as 16 rows × 64 bytes (palette 1). A thread's configuration is its own, and
// other code on the thread (oneDNN's, in SDPA) sets its own: amx_begin before each use.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
NANOGPT_AMX inline void amx_begin() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}
NANOGPT_AMX inline void amx_end() { _tile_release(); }  // no tile state to save on a context switch after this

// kW (or n < kW, the rest zero) bfloat16 values widened to float (exact: a bfloat16 is a
// float's high 16 bits), for kernels that read bfloat16 K and V with float arithmetic.
inline vw wload(const c10::BFloat16* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vw)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#elif defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (vw)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
  vw v;
  for (int i = 0; i < kW; ++i) v[i] = float(p[i]);
  return v;
#endif
}
inline vw wload_part(const c10::BFloat16* p, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  // a masked load: no call in the loops that use it (memcpy's kept their accumulators in memory)
  const __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p);
  return (vw)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#else
  c10::BFloat16 t[kW] = {};  // zero bits: 0.0f
  std::memcpy(t, p, n * sizeof *p);
  return wload(t);
#endif
}

// 2·kW bfloat16 values widened to float as two vectors, even[i] = p[2i] and odd[i] = p[2i + 1]
// (x86 is little-endian: p[2i] is the low half of the 32-bit lane i, p[2i + 1] the high half):
// a shift for one and a mask for the other, where wload takes a shuffle (vpmovzxwd) and a shift
// per vector. On AVX-512 these run on the two ports that also do the FMAs they feed: a widened
// vector and its FMA take 2 of those slots here against 3 (decode's P·V and dot_rows of bfloat16).
NANOGPT_INLINE void wload_pairs(const c10::BFloat16* p, vw& even, vw& odd) {
  vwu u;  // unsigned lanes: the shift drops the high half, never a sign
  std::memcpy(&u, p, sizeof u);
  even = (vw)(u << 16);
  odd = (vw)(u & 0xffff0000u);
}
// The same split of 2·kW floats: a = x[0:kW], b = x[kW:2kW] → even = x[0, 2, ...], odd = x[1, 3, ...].
NANOGPT_INLINE void split_pairs(vw a, vw b, vw& even, vw& odd) {
#ifdef __AVX512F__
  even = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  odd = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  even = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
  odd = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}
// Its inverse: a = [e0, o0, e1, o1, ...] (features 0..kW), b = the next kW features.
NANOGPT_INLINE void join_pairs(vw even, vw odd, vw& a, vw& b) {
#ifdef __AVX512F__
  a = __builtin_shufflevector(even, odd, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  b = __builtin_shufflevector(even, odd, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#else
  a = __builtin_shufflevector(even, odd, 0, 8, 1, 9, 2, 10, 3, 11);
  b = __builtin_shufflevector(even, odd, 4, 12, 5, 13, 6, 14, 7, 15);
#endif
}

// 2^n for whole n in [-125, 0], from the exponent bits (kernel_common.h's vexp2 needs it).
template <typename F, typename I>
inline F pow2i_bits(F n) {
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  F p;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}
inline vf pow2i(vf n) { return pow2i_bits<vf, vi>(n); }
inline vf8 pow2i(vf8 n) { return pow2i_bits<vf8, vi8>(n); }
#ifdef __AVX512F__
// p·2^n and round to nearest, for kernel_common.h's vexp2_scalef (a vf is one zmm here).
inline vf scalef(vf p, vf n) { return (vf)_mm512_scalef_ps((__m512)p, (__m512)n); }
inline vf round_even(vf x) { return (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#endif

}  // namespace nanogpt

// vmax (NaN-propagating max of floats or vf), vexp2 and the flash tile's constants: shared with
// ispc/flash_tile.ispc.
#include "kernel_common.h"

namespace nanogpt {

static_assert(kLanes == kPad, "the padding of queries and features is one vf");

#ifndef __AVX512F__
// With AVX2 a vf is two ymm registers, and GCC expands comparisons and selects on it lane by
// lane in scalar code (arithmetic it splits in two): a softmax row took 8x longer than on
// 8-lane vectors. So vf's max and exp2, the functions that compare, run on its two halves.
inline vf8 half(vf x, int i) {  // through memory: GCC expands shuffles of a vf piecewise too
  vf8 h;
  std::memcpy(&h, reinterpret_cast<const float*>(&x) + 8 * i, sizeof h);
  return h;
}
inline vf join(vf8 a, vf8 b) {
  vf x;
  std::memcpy(&x, &a, sizeof a);
  std::memcpy(reinterpret_cast<float*>(&x) + 8, &b, sizeof b);
  return x;
}
inline vf vmax(vf x, vf m) { return join(vmax(half(x, 0), half(m, 0)), vmax(half(x, 1), half(m, 1))); }
inline vf vexp2(vf x) { return join(vexp2(half(x, 0)), vexp2(half(x, 1))); }
#else
inline vf vexp2(vf x) { return vexp2_scalef(x); }
#endif

template <typename F>
inline float hmax(F v) {
  float m = kNegInf;
  for (int i = 0; i < int(sizeof v / sizeof(float)); ++i) m = vmax(v[i], m);
  return m;
}
template <typename F>
inline float hsum(F v) {
  float s = 0.f;
  for (int i = 0; i < int(sizeof v / sizeof(float)); ++i) s += v[i];
  return s;
}

// dst (d × nq) = scale · src (rows × d, row stride ld)ᵀ, lanes r ≥ rows zero: a block of queries
// packed for the flash tiles (Qᵀ; the backward's dOᵀ too). 8 × 8 blocks go through registers on
// AVX (3 shuffles per 8 floats); the scalar loop stored each float alone, a stride of nq apart.
inline void pack_transposed(const float* src, int64_t ld, int64_t rows, int64_t d, float scale, float* dst,
                            int64_t nq) {
  int64_t r8 = 0, d8 = 0;  // rows [0, r8) × columns [0, d8) go through registers, the rest alone
#ifdef __AVX__
  r8 = rows / 8 * 8, d8 = d / 8 * 8;
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t r = 0; r < r8; r += 8)
    for (int64_t c = 0; c < d8; c += 8) {
      __m256 x[8], t[8];
      for (int i = 0; i < 8; ++i) x[i] = _mm256_mul_ps(_mm256_loadu_ps(src + (r + i) * ld + c), s);
      for (int i = 0; i < 8; i += 2) {  // t[i], t[i+1]: rows i, i+1 interleaved, low and high pairs
        t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {  // x[i..i+3]: columns (0,4), (1,5), (2,6), (3,7) of rows i..i+3
        x[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        x[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        x[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        x[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int i = 0; i < 4; ++i) {  // column i from the low halves, column i + 4 from the high
        _mm256_storeu_ps(dst + (c + i) * nq + r, _mm256_permute2f128_ps(x[i], x[i + 4], 0x20));
        _mm256_storeu_ps(dst + (c + i + 4) * nq + r, _mm256_permute2f128_ps(x[i], x[i + 4], 0x31));
      }
    }
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < r8 ? d8 : 0; c < d; ++c) dst[c * nq + r] = src[r * ld + c] * scale;
  for (int64_t c = 0; c < d && rows < nq; ++c) std::fill(dst + c * nq + rows, dst + (c + 1) * nq, 0.f);
}

// ---------------------------------------------------------------------------------------
// Row helpers shared by the unfused variants (naive, blocked) and the fused one.

// s[j] = c·Σ_k q[k]·Kt[k·ldk + j] for j in [0, n): one query's scores against n keys, from
// keys transposed (d × ldk). Vectorised over keys, four k per pass over s.
inline void scores_row(const float* q, const float* Kt, int64_t ldk, int64_t d, float c, float* s, int64_t n) {
  std::fill(s, s + n, 0.f);
  int64_t k = 0;
  for (; k + 4 <= d; k += 4) {
    const float q0 = c * q[k], q1 = c * q[k + 1], q2 = c * q[k + 2], q3 = c * q[k + 3];
    const float *k0 = Kt + k * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] += q0 * k0[j] + q1 * k1[j] + q2 * k2[j] + q3 * k3[j];
  }
  for (; k < d; ++k) {
    const float qk = c * q[k];
    const float* kk = Kt + k * ldk;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] += qk * kk[j];
  }
}

// o[c] += Σ_j p[j]·V[j·ldv + c] for j in [0, n), c in [0, d): vectorised over features,
// four value rows per pass over o.
inline void pv_row(const float* p, const float* V, int64_t ldv, int64_t n, int64_t d, float* o) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float *v0 = V + j * ldv, *v1 = v0 + ldv, *v2 = v1 + ldv, *v3 = v2 + ldv;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) o[c] += p[j] * v0[c] + p[j + 1] * v1[c] + p[j + 2] * v2[c] + p[j + 3] * v3[c];
  }
  for (; j < n; ++j) {
    const float* vj = V + j * ldv;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) o[c] += p[j] * vj[c];
  }
}

// In place: s[j] = 2^(s[j] - max s) for a row of n log2-scaled scores; returns Σ s[j] (and
// the max in *max_out, if given). A row with no score above -inf (fully masked) becomes all
// zeros and returns 0, as in SDPA; a NaN score makes the sum NaN.
// Native vectors: on AVX2, 8x faster than on vf (5x faster than on vf's halves below).
inline float softmax2_unnormalised(float* s, int64_t n, float* max_out = nullptr) {
  vw vm = vw{} + kNegInf;
  int64_t j = 0;
  for (; j + kW <= n; j += kW) vm = vmax(wload(s + j), vm);
  float m = hmax(vm);
  for (; j < n; ++j) m = vmax(s[j], m);
  if (max_out) *max_out = m;
  if (m == kNegInf) {
    std::fill(s, s + n, 0.f);
    return 0.f;
  }
  vw vs = {};
  for (j = 0; j + kW <= n; j += kW) {
    const vw e = vexp2(wload(s + j) - m);
    wstore(s + j, e);
    vs += e;
  }
  float sum = hsum(vs);
  for (; j < n; ++j) {
    s[j] = s[j] - m < -125.f ? 0.f : std::exp2(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// A row's log Σ_j e^(s_j) (natural log, as the backward reads it) from its log2-unit running max
// m and sum l = Σ_j 2^(s_j·log2(e) - m); -inf for a row that saw no key (l = 0).
inline float lse_from(float m, float l) { return l == 0.f ? kNegInf : (m + std::log2(l)) * float(M_LN2); }

// o[c] = acc[c] / sum for c in [0, d): every variant's last step (acc may be o itself).
// sum == 0 means the row saw no key (its max stayed -inf; otherwise the max's own term makes
// sum >= 1, or NaN): such a row gets zeros, as SDPA gives for a fully masked row. Zeros are
// written, not scaled in, since acc may hold 0·NaN junk from values behind the mask.
inline void normalise_row(float* o, const float* acc, float sum, int64_t d) {
  if (sum == 0.f) {
    std::fill(o, o + d, 0.f);
    return;
  }
  const float inv = 1.f / sum;  // NaN stays NaN
  for (int64_t c = 0; c < d; ++c) o[c] = acc[c] * inv;
}

}  // namespace nanogpt
