// The dot products of one vector against many rows, on native vectors (simd.h's vw), vectorised
// along the rows' length and reduced kW rows at a time: the decode path's scores (a query against
// keys) and nanogpt::linear (an input against weight rows) are the same product.
#pragma once

#include "simd.h"

#include <type_traits>

namespace nanogpt {

// out[i] = Σ lanes of a[i] for the kW vectors a[0..kW): a transpose-and-add tree, log2(kW)
// levels of pairwise shuffles instead of kW separate horizontal sums. Inlined always: GCC
// called it out of line from dot_rows, its kW accumulators passing through memory.
NANOGPT_INLINE vw lane_sums(vw* a) {
#if defined(__AVX512F__)
  for (int i = 0; i < 8; ++i) {  // 16 vectors → 8: lane pairs
    const vw x = a[2 * i], y = a[2 * i + 1];
    a[i] = __builtin_shufflevector(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           __builtin_shufflevector(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
  for (int i = 0; i < 4; ++i) {
    const vw x = a[2 * i], y = a[2 * i + 1];
    a[i] = __builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    const vw x = a[2 * i], y = a[2 * i + 1];
    a[i] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  // a[0] holds halves of the sums of vectors 0-7 (lanes 0-7 and 8-15), a[1] of vectors 8-15
  return __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a[0], a[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
#else
  for (int i = 0; i < 4; ++i) {  // 8 vectors → 4: lane pairs
    const vw x = a[2 * i], y = a[2 * i + 1];
    a[i] = __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) + __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {
    const vw x = a[2 * i], y = a[2 * i + 1];
    a[i] = __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(a[0], a[1], 4, 5, 6, 7, 12, 13, 14, 15);
#endif
}

// Pairs of vectors that a row of T, of `whole` whole vectors, is read in (wload_pairs: vectors
// 2m and 2m + 1 hold the even and the odd features of [2m·kW, (2m + 2)·kW)); the rest, a last odd
// vector and a partial one, are read alone. A float32 row has none.
template <class T>
constexpr int pairs_of(int whole) { return std::is_same_v<T, float> ? 0 : whole / 2; }

// a + the pair of vectors at k times q's pair (qe, qo: split_pairs), the even features first
NANOGPT_INLINE vw add_pair_products(vw a, const c10::BFloat16* k, vw qe, vw qo) {
  vw e, o;
  wload_pairs(k, e, o);
  a += e * qe;
  return a + o * qo;
}

// dot_rows for rows of at most NQ·kW elements, the last vector partial (Tail: d % kW elements,
// decided once by the caller, not per row): q's NQ vectors stay in registers and each row is
// taken whole in turn, one row pointer stepping by ldk (the general loop below walks kW row
// pointers, which spill at small d: half its time went to reloading them). The same products
// in the same order, so the same sums.
// A bfloat16 row's whole vectors go in pairs (wload_pairs: even features, then odd), q's split the
// same way; the partial last vector, or a last odd one, alone.
template <int NQ, bool Tail, class T>
inline void dot_rows_short(const float* q, const T* K, int64_t ldk, int d, float* s, int64_t n) {
  const int rem = d - (NQ - 1) * kW;  // elements of a row's last vector
  constexpr int P = pairs_of<T>(NQ - Tail);
  vw qv[NQ];
#pragma GCC unroll 8
  for (int i = 0; i < NQ; ++i) qv[i] = wload(q + i * kW);
#pragma GCC unroll 8
  for (int m = 0; m < P; ++m) {
    if constexpr (P > 0) split_pairs(qv[2 * m], qv[2 * m + 1], qv[2 * m], qv[2 * m + 1]);
  }
  const auto row = [&](const T* k) {
    vw a = {};
#pragma GCC unroll 8
    for (int m = 0; m < P; ++m) {
      if constexpr (P > 0) a = add_pair_products(a, k + 2 * m * kW, qv[2 * m], qv[2 * m + 1]);
    }
#pragma GCC unroll 8
    for (int i = 2 * P; i < NQ - 1; ++i) a += wload(k + i * kW) * qv[i];
    if constexpr (2 * P < NQ) a += (Tail ? wload_part(k + (NQ - 1) * kW, rem) : wload(k + (NQ - 1) * kW)) * qv[NQ - 1];
    return a;
  };
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    vw acc[kW];
    const T* k = K + j * ldk;
#pragma GCC unroll 16
    for (int r = 0; r < kW; ++r, k += ldk) acc[r] = row(k);
    wstore(s + j, lane_sums(acc));
  }
  for (; j < n; ++j) {  // the last n % kW rows, one horizontal sum each
    const vw a = row(K + j * ldk);
    float t = 0.f;
    for (int i = 0; i < kW; ++i) t += a[i];
    s[j] = t;
  }
}

// s[j] = Σ_c q[c]·K[j, c] for j in [0, n): one vector against n rows (a query against keys, or
// a weight matrix against an input). q is zero-padded to a multiple of kW, K rows have stride
// ldk and d valid elements (the tail vector of a row is loaded partially: no over-read); T is
// float, or c10::BFloat16 (a bfloat16 KV cache, widened as it is read).
template <class T>
inline void dot_rows(const float* q, const T* K, int64_t ldk, int d, float* s, int64_t n) {
  // rows of up to 4 vectors (d <= 32 on AVX2), or 8 on AVX-512 (d <= 128: q's 8 vectors and the
  // kW rows' sums fit its 32 registers): q in registers, each row read whole in turn. A decode
  // step of one query per head at d = 80–128 then took 0.67–0.90× the time of the loop below
  // (float32 and bfloat16 caches, a Zen 4, in one process, order rotated); linear's rows of
  // 80–128 inputs did not move
  const auto short_rows = [&](auto nq) {
    constexpr int NQ = decltype(nq)::value;
    d % kW ? dot_rows_short<NQ, true>(q, K, ldk, d, s, n) : dot_rows_short<NQ, false>(q, K, ldk, d, s, n);
  };
  switch ((d + kW - 1) / kW) {
    case 1: return short_rows(std::integral_constant<int, 1>{});
    case 2: return short_rows(std::integral_constant<int, 2>{});
    case 3: return short_rows(std::integral_constant<int, 3>{});
    case 4: return short_rows(std::integral_constant<int, 4>{});
#if defined(__AVX512F__)
    case 5: return short_rows(std::integral_constant<int, 5>{});
    case 6: return short_rows(std::integral_constant<int, 6>{});
    case 7: return short_rows(std::integral_constant<int, 7>{});
    case 8: return short_rows(std::integral_constant<int, 8>{});
#endif
    default: break;
  }
  const int full = d / kW * kW, rem = d - full;
  const int paired = pairs_of<T>(full / kW) * 2 * kW;  // features read in pairs of vectors
  const auto q_pair = [&](int c, vw& e, vw& o) { split_pairs(wload(q + c), wload(q + c + kW), e, o); };
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    // kW rows at once, c outermost: kW independent accumulators, one q vector (or pair) per step
    const T* k0 = K + j * ldk;
    vw acc[kW] = {};
    if constexpr (!std::is_same_v<T, float>)
      for (int c = 0; c < paired; c += 2 * kW) {
        vw qe, qo;
        q_pair(c, qe, qo);
#pragma GCC unroll 16
        for (int r = 0; r < kW; ++r) acc[r] = add_pair_products(acc[r], k0 + r * ldk + c, qe, qo);
      }
    for (int c = paired; c < full; c += kW) {
      const vw qv = wload(q + c);
#pragma GCC unroll 16
      for (int r = 0; r < kW; ++r) acc[r] += wload(k0 + r * ldk + c) * qv;
    }
    if (rem) {
      const vw qv = wload(q + full);
#pragma GCC unroll 16
      for (int r = 0; r < kW; ++r) acc[r] += wload_part(k0 + r * ldk + full, rem) * qv;
    }
    wstore(s + j, lane_sums(acc));
  }
  for (; j < n; ++j) {  // the last n % kW rows, one horizontal sum each
    const T* k = K + j * ldk;
    vw a = {};
    if constexpr (!std::is_same_v<T, float>)
      for (int c = 0; c < paired; c += 2 * kW) {
        vw qe, qo;
        q_pair(c, qe, qo);
        a = add_pair_products(a, k + c, qe, qo);
      }
    for (int c = paired; c < full; c += kW) a += wload(k + c) * wload(q + c);
    if (rem) a += wload_part(k + full, rem) * wload(q + full);
    float t = 0.f;
    for (int i = 0; i < kW; ++i) t += a[i];
    s[j] = t;
  }
}

}  // namespace nanogpt
