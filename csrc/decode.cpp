// flash's decode path: a few queries (a KV-cache step: Nq <= kDecodeRows) against many keys.
// The tile path packs queries into vector lanes, so one query would fill 1 lane of 16; here
// each query's scores are dot products vectorised over d (native-width vectors, reduced
// kW keys at a time by a transpose-and-add tree; several queries share vectors instead, see
// dot_rows_group), and P·V is vectorised over d too, each load of V shared by the queries.
//
// Keys are split into fixed spans of kSplitKeys: work item (head, span) computes, for each of
// the head's queries, the span's max m, sum l = Σ 2^(s - m) and unnormalised O = Σ 2^(s - m)·v;
// the spans are then merged exactly (log-sum-exp). The span length depends on nothing but the
// constant, so a query's result is the same for any thread count, batch or head count, and any
// number of queries in the call from 3 to kDecodeRows (2 on AVX2; 1 where every query takes
// dot_rows: a bfloat16 cache, or d > 64 on AVX-512). Fewer float32 queries sum their dot
// products in another order (dot_rows), as the tile path does for more queries: the same within
// float32 rounding, not bitwise. K and V are read in place, any row stride, as float32 or
// bfloat16 (widened as they are read, whole vectors two at a time: simd.h's wload_pairs; a
// bfloat16 cache is half the bytes). A bfloat16 cache's scores run on vdpbf16ps where the tiles
// do (bf16.cpp's dot_rows_bf16_dot: no widening, half the multiplies; 1.02–1.21× as fast a step
// on a Zen 4): a query's result then depends on the CPU's path, still not on its company.
#include "attention.h"
#include "parallel.h"
#include "simd.h"
#include "vector_dot.h"

#include <type_traits>
#include <vector>

namespace nanogpt {

namespace {

constexpr int64_t kDecodeRows = 8;    // queries per head up to which this path serves
constexpr int64_t kSplitKeys = 512;   // keys per work item (scores of one span stay in L1)
constexpr int64_t kPvKeys = 64;       // V rows per chunk that every query of a step takes in turn
// Decoding streams K and V from memory at a few ns per key and head, so a second thread pays
// for its wake-up (1–8 µs measured on a shared 2-core host) from ~2^16 multiply-adds on: a
// 256-key step of 4 heads at d = 32 already runs on both cores.
constexpr int64_t kDecodeSerialBelow = int64_t(1) << 16;
constexpr int64_t kAheadRows = 64;    // rows of K or V requested this far ahead of their use

// Asks for rows [r0, r1) of X (stride ld, d elements each) to be brought into the caches.
template <class T>
inline void prefetch_rows(const T* X, int64_t ld, int64_t r0, int64_t r1, int d) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t off = 0; off < int64_t(d * sizeof(T)); off += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(X + r * ld) + off);
}

// Accumulator sets per query in pv_slice: keys alternate between two where the registers hold
// them (2·NV <= half the vector registers); with one set, few vectors (NV = 2 at d = 32 on
// AVX-512) left the loop waiting on the FMA's latency.
constexpr int kHalfRegs = kW == 16 ? 16 : 8;
template <int NV>
constexpr int kSets = 2 * NV <= kHalfRegs ? 2 : 1;
// Queries that share each load of V in pv_slice: as many (a power of two, at most 8) as half the
// registers hold accumulators for. A query's sums do not depend on its group: each query's FMAs
// are the same, in the same order, in a group of any size.
template <int NV>
constexpr int kGroup = [] {
  int g = 1;
  while (g < 8 && 2 * g * kSets<NV> * NV <= kHalfRegs) g *= 2;
  return g;
}();

// a[g][0:NV] += p[g][j]·V[j, 0:NV·kW] for key j and the G queries g, V's row loaded once (the
// last vector's rem elements only, where Tail; a bfloat16 row's whole vectors in pairs: pairs_of)
template <int G, bool Tail, int NV, class T>
NANOGPT_INLINE void pv_key(vw (&a)[G][NV], const float* const* p, int64_t j, const T* v, int rem) {
  constexpr int P = pairs_of<T>(NV - Tail);
  vw x[NV];
#pragma GCC unroll 8
  for (int m = 0; m < P; ++m) {
    if constexpr (P > 0) wload_pairs(v + 2 * m * kW, x[2 * m], x[2 * m + 1]);
  }
#pragma GCC unroll 8
  for (int i = 2 * P; i < NV - 1; ++i) x[i] = wload(v + i * kW);
  if constexpr (2 * P < NV) x[NV - 1] = Tail ? wload_part(v + (NV - 1) * kW, rem) : wload(v + (NV - 1) * kW);
  // V's row is loaded once, not once per query's FMA (in_register): 4-query steps at d = 32–48
  // then ran 1.01–1.29× as fast (a Zen 4, old and new builds in processes alternated three times)
  if constexpr (G > 1)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) in_register(x[i]);
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    const vw pj = wsplat(p[g][j]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) a[g][i] += pj * x[i];
  }
}

// Keys [j0, j1) of pv_slice, j0 even: key j goes to set j % 2 (where there are two), whichever
// call takes it. Tail is decided once, outside the loop (a test per key kept GCC from holding
// the accumulators in registers across it). Inlined always, as the functions below: left out of
// line (GCC did so for a group's second call site), the accumulators were loaded and stored at
// every key.
template <int G, bool Tail, int NV, class T>
NANOGPT_INLINE void pv_keys(const float* const* p, const T* v, int64_t ldv, int64_t j0, int64_t j1, int rem,
                            vw (&acc0)[G][NV], vw (&acc1)[G][NV]) {
  int64_t j = j0;
  if constexpr (kSets<NV> == 2)
    for (; j + 2 <= j1; j += 2) {
      pv_key<G, Tail>(acc0, p, j, v + j * ldv, rem);
      pv_key<G, Tail>(acc1, p, j + 1, v + (j + 1) * ldv, rem);
    }
  for (; j < j1; ++j) pv_key<G, Tail>(acc0, p, j, v + j * ldv, rem);
}

// The keys of pv_slice: those all G queries see, together, then each query's own rest (from an
// even key, so on the sets a call of its own would use).
template <int G, bool Tail, int NV, class T>
NANOGPT_INLINE void pv_group_keys(const float* const* p, const int64_t* n, int64_t shared, const T* v, int64_t ldv,
                                  int rem, vw (&acc0)[G][NV], vw (&acc1)[G][NV]) {
  pv_keys<G, Tail>(p, v, ldv, 0, shared, rem, acc0, acc1);
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    vw a0[1][NV], a1[1][NV];
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) a0[0][i] = acc0[g][i], a1[0][i] = acc1[g][i];
    pv_keys<1, Tail>(p + g, v, ldv, shared, n[g], rem, a0, a1);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc0[g][i] = a0[0][i], acc1[g][i] = a1[0][i];
  }
}

// o[g][c0:c0 + NV·kW) += Σ_{j<n[g]} p[g][j]·V[j, c0:c0 + NV·kW) (clipped to d) for G queries,
// NV vectors of features each held in registers; V's elements T are float or c10::BFloat16.
template <int G, int NV, class T>
void pv_slice(const float* const* p, const int64_t* n, const T* V, int64_t ldv, int c0, int d, float* const* o) {
  vw acc0[G][NV] = {}, acc1[G][NV] = {};
  const int rem = d - (c0 + (NV - 1) * kW);  // the last vector's elements: partial, loaded without over-read
  int64_t shared = n[0];
  for (int g = 1; g < G; ++g) shared = std::min(shared, n[g]);
  shared &= ~int64_t(1);  // even: each query's rest starts on set 0, as a call of its own would
  const bool tail = rem < kW;
  if (tail)
    pv_group_keys<G, true>(p, n, shared, V + c0, ldv, rem, acc0, acc1);
  else
    pv_group_keys<G, false>(p, n, shared, V + c0, ldv, rem, acc0, acc1);
  const int pairs = pairs_of<T>(NV - tail);  // their sums are put back in feature order here
  for (int g = 0; g < G; ++g) {
    vw sum[NV];
    for (int i = 0; i < NV; ++i) sum[i] = acc0[g][i] + acc1[g][i];
    for (int m = 0; m < pairs; ++m) join_pairs(sum[2 * m], sum[2 * m + 1], sum[2 * m], sum[2 * m + 1]);
    for (int i = 0; i < NV; ++i) {
      const int n_out = std::min(kW, d - (c0 + i * kW));
      if (n_out == kW)
        sum[i] += wload(o[g] + c0 + i * kW);
      else
        sum[i] += wload_part(o[g] + c0 + i * kW, n_out);
      std::memcpy(o[g] + c0 + i * kW, &sum[i], n_out * sizeof(float));
    }
  }
}

// o[g][0:d] += Σ_{j<n[g]} p[g][j]·V[j, 0:d] for ng queries g: groups of G while ng allows, then
// of G/2, ... (called with G = kGroup<NV>, so 7 queries go as 4 + 2 + 1 where 8 fit).
template <int G, int NV, class T>
void pv_groups(const float* const* p, const int64_t* n, int64_t ng, const T* V, int64_t ldv, int c0, int d, float* const* o) {
  for (; ng >= G; ng -= G, p += G, n += G, o += G) pv_slice<G, NV>(p, n, V, ldv, c0, d, o);
  if constexpr (G > 1)
    if (ng) pv_groups<G / 2, NV>(p, n, ng, V, ldv, c0, d, o);
}

// o[g][0:d] += Σ_{j<n[g]} p[g][j]·V[j, 0:d] for ng queries: slices of up to 8 feature vectors
// (a group's accumulators fill at most half the registers: see kGroup)
template <class T>
void pv(const float* const* p, const int64_t* n, int64_t ng, const T* V, int64_t ldv, int d, float* const* o) {
  constexpr int kMaxNV = 8;
  for (int c0 = 0; c0 < d; c0 += kMaxNV * kW) {
    switch (std::min<int>(kMaxNV, (d - c0 + kW - 1) / kW)) {
      case 1: pv_groups<kGroup<1>, 1, T>(p, n, ng, V, ldv, c0, d, o); break;
      case 2: pv_groups<kGroup<2>, 2, T>(p, n, ng, V, ldv, c0, d, o); break;
      case 3: pv_groups<kGroup<3>, 3, T>(p, n, ng, V, ldv, c0, d, o); break;
      case 4: pv_groups<kGroup<4>, 4, T>(p, n, ng, V, ldv, c0, d, o); break;
      case 5: pv_groups<kGroup<5>, 5, T>(p, n, ng, V, ldv, c0, d, o); break;
      case 6: pv_groups<kGroup<6>, 6, T>(p, n, ng, V, ldv, c0, d, o); break;
      case 7: pv_groups<kGroup<7>, 7, T>(p, n, ng, V, ldv, c0, d, o); break;
      default: pv_groups<kGroup<8>, 8, T>(p, n, ng, V, ldv, c0, d, o); break;
    }
  }
}

// The scores of several queries at once. One query's dot products against keys are reduced kW
// keys at a time by a transpose-and-add tree (dot_rows): log2(kW) levels of shuffles per key and
// query. Here a group of kQG queries shares each vector instead: lanes [4g + t] hold query g's
// partial sum over the features c ≡ t (mod 4), each key's four features at a time broadcast to
// every 128-bit lane (a load, no shuffle), so two in-lane levels finish four keys of every query
// of the group. Each key's sum is the same wherever the key falls in a call: features in order,
// then (t0 + t1) + (t2 + t3); and query g's sums use only its own lanes, whatever shares them.
constexpr int kQG = kW / 4;  // queries per group: 4 with AVX-512, 2 with AVX2
constexpr int kMaxGroups = (kDecodeRows + kQG - 1) / kQG;

inline vw bcast4(const float* p) {  // p[0:4] in every 128-bit lane
#ifdef __AVX512F__
  return (vw)_mm512_broadcast_f32x4(_mm_loadu_ps(p));
#else
  return (vw)_mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
#endif
}
inline vw bcast4_part(const float* p, int n) {  // p[0:n], n < 4, the rest zero, in every 128-bit lane
#ifdef __AVX512F__
  return (vw)_mm512_broadcast_f32x4(_mm_maskz_loadu_ps(__mmask8((1u << n) - 1), p));
#else
  const __m128 x = _mm_maskload_ps(p, _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3)));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(x), x, 1);
#endif
}
// per 128-bit lane: [x0 + x1, x2 + x3, y0 + y1, y2 + y3]
inline vw pair_sums(vw x, vw y) {
#ifdef __AVX512F__
  return __builtin_shufflevector(x, y, 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30) +
         __builtin_shufflevector(x, y, 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15, 29, 31);
#else
  return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) + __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
#endif
}
// s[g][j0 + 0:4] = 128-bit lane g of v (four keys' scores of query g)
inline void store_lanes(vw v, float* const* s, int64_t j0) {
#ifdef __AVX512F__
  _mm_storeu_ps(s[0] + j0, _mm512_castps512_ps128((__m512)v));
  _mm_storeu_ps(s[1] + j0, _mm512_extractf32x4_ps((__m512)v, 1));
  _mm_storeu_ps(s[2] + j0, _mm512_extractf32x4_ps((__m512)v, 2));
  _mm_storeu_ps(s[3] + j0, _mm512_extractf32x4_ps((__m512)v, 3));
#else
  _mm_storeu_ps(s[0] + j0, _mm256_castps256_ps128((__m256)v));
  _mm_storeu_ps(s[1] + j0, _mm256_extractf128_ps((__m256)v, 1));
#endif
}

// acc[r] = the R keys' sums from row K, stride ldk, for dot_rows_group: R chains, features in order
template <int R>
NANOGPT_INLINE void group_keys(const float* X, const float* K, int64_t ldk, int full, int rem, vw (&acc)[R]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = vw{};
  for (int m = 0; m < full; ++m) {
    const vw x = wload(X + m * kW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] += x * bcast4(K + r * ldk + 4 * m);
  }
  if (rem) {
    const vw x = wload(X + full * kW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] += x * bcast4_part(K + r * ldk + 4 * full, rem);
  }
}

// s[g][j] = Σ_c q_g[c]·K[j, c] for j < n and the group's queries g < kQG; X[m] (m < ceil(d / 4))
// (kW floats each) holds lanes [4g + t] = q_g[4m + t], zero past d (and for a group's missing queries).
inline void dot_rows_group(const float* X, const float* K, int64_t ldk, int d, float* const* s, int64_t n) {
  const int full = d / 4, rem = d % 4;  // whole four-feature chunks; the last one's features
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {  // eight chains keep both FMA ports busy
    vw a[8];
    group_keys(X, K + j * ldk, ldk, full, rem, a);
    store_lanes(pair_sums(pair_sums(a[0], a[1]), pair_sums(a[2], a[3])), s, j);
    store_lanes(pair_sums(pair_sums(a[4], a[5]), pair_sums(a[6], a[7])), s, j + 4);
  }
  for (; j + 4 <= n; j += 4) {
    vw a[4];
    group_keys(X, K + j * ldk, ldk, full, rem, a);
    store_lanes(pair_sums(pair_sums(a[0], a[1]), pair_sums(a[2], a[3])), s, j);
  }
  for (; j < n; ++j) {  // the same sums, one key at a time
    vw a[1];
    group_keys(X, K + j * ldk, ldk, full, rem, a);
    for (int g = 0; g < kQG; ++g) s[g][j] = (a[0][4 * g] + a[0][4 * g + 1]) + (a[0][4 * g + 2] + a[0][4 * g + 3]);
  }
}

// X for dot_rows_group, kQG queries at a time: X[(group·d4 + m)·kW + 4g + t] = query
// (group·kQG + g)'s feature 4m + t from q (nq rows of stride dq, zero past d), zero for a last
// group's missing queries.
inline void interleave_queries(const float* q, int64_t dq, int64_t nq, int d4, float* X) {
  for (int64_t gi = 0; gi < (nq + kQG - 1) / kQG; ++gi)
    for (int g = 0; g < kQG; ++g) {
      const int64_t i = gi * kQG + g;
      for (int m = 0; m < d4; ++m)
        for (int t = 0; t < 4; ++t) X[(gi * d4 + m) * kW + 4 * g + t] = i < nq ? q[i * dq + 4 * m + t] : 0.f;
    }
}

}  // namespace

const char* flash_path(int64_t Nq, int64_t br, int64_t bc) {
  return Nq <= kDecodeRows && br == 0 && bc == 0 ? "decode" : "tiles";
}

// T: the element type of q, k, v and o (float, or c10::BFloat16 in a bfloat16 Problem).
template <class T>
void decode(const Problem& p) {
  const int d = int(p.d), dq = int(round_up(p.d, kW));
  const int64_t BH = p.B * p.H, spans = (p.Nk + kSplitKeys - 1) / kSplitKeys, nq = p.Nq;
  // Per (head, span, query): the span's max, sum and unnormalised output (d floats).
  const int64_t part = d + 2;
  at::Tensor parts_t = at::empty({BH, spans, nq, part}, at::kFloat);
  float* parts = parts_t.data_ptr<float>();
  const float qscale = p.scale * kLog2e;  // exp2 below, as the tile path
  // A bfloat16 cache's scores on vdpbf16ps where the tiles use it (bf16.cpp's dot_rows_bf16_dot,
  // 16 keys at a time: a build for 8-lane vectors hands it 8), else on the FMA, K widened as read.
  const bool bf16_dot = kW == 16 && p.bf16 && d <= kBf16DotMaxD && has_bf16_dot();

  // an item's cost: a span's keys, fewer than kSplitKeys in a short cache (there, counting the whole
  // span woke the second thread for 64–128 keys of 4 heads at d = 32: 0.86–0.95× one thread's speed)
  const int64_t item_cost = 2 * nq * std::min(kSplitKeys, p.Nk) * p.d;
  parallel_items(BH * spans, at::get_num_threads(), item_cost, [&](int64_t t, int64_t) {
    const int64_t bh = t / spans, span = t % spans, b = bh / p.H, h = bh % p.H;
    const int64_t j0 = span * kSplitKeys, j1 = std::min(p.Nk, j0 + kSplitKeys);
    // This thread's padded queries and scores: kept across calls (an allocation per call
    // costs as much as a short step's keys).
    static thread_local std::vector<float> scratch;
    // (and, for query groups, a spare row of scores and the groups' interleaved queries)
    scratch.resize(std::max<size_t>(scratch.size(), nq * (dq + kSplitKeys) + kSplitKeys + kMaxGroups * ((d + 3) / 4) * kW));
    float* qpad = scratch.data();
    float* scores = qpad + nq * dq;  // query i's: scores + i·kSplitKeys
    int64_t n[kDecodeRows], n_max = 0;  // keys [j0, j0 + n[i]) visible to query i
    const auto part_of = [&](int64_t i) { return parts + ((bh * spans + span) * nq + i) * part; };  // m, l, O[0:d]
    for (int64_t i = 0; i < nq; ++i) {
      n[i] = std::max<int64_t>(0, std::min(j1, p.key_end(i)) - j0);
      n_max = std::max(n_max, n[i]);
      if (bf16_dot) continue;  // its scores read q as it is, scaled after (dot_rows_bf16_dot)
      const T* q = p.q.row<T>(b, h, i);
      float* qi = qpad + i * dq;  // zero past d: dot_rows multiplies it by K's masked-off tail
      for (int c = 0; c < d; ++c) qi[c] = float(q[c]) * qscale;
      std::fill(qi + d, qi + dq, 0.f);
    }
    // The queries share each read of K and V: a block of kW keys (a chunk of kPvKeys for V)
    // stays in L1 while every query takes it, so the span comes from memory once, not nq times.
    // The blocks depend on nothing but j0, and no query's sums on the others' (see
    // dot_rows_group and pv_slice), so a query's result is the same in any company of two or more.
    const T* K = p.k.row<T>(b, h, j0);
    const T* V = p.v.row<T>(b, h, j0);
    // The span streams K's rows, then V's: each step asks for the rows kAheadRows further along
    // that stream, so memory is read while the queries compute (−2 to +8% on the bench's rows in
    // one interleaved run; 64 to 512 rows ahead, into L1 or L2, measured alike).
    const auto ahead = [&](int64_t at, int64_t rows) {
      const int64_t a0 = at + kAheadRows, a1 = a0 + rows;
      prefetch_rows(K, p.k.sn, std::min(a0, n_max), std::min(a1, n_max), d);
      prefetch_rows(V, p.v.sn, std::max<int64_t>(a0 - n_max, 0), std::clamp<int64_t>(a1 - n_max, 0, n_max), d);
    };
    // Several float32 queries take their scores in groups of kQG (dot_rows_group, the last group
    // padded with zero queries whose scores go to `spare`); one query, or a bfloat16 cache, by
    // dot_rows. A group's shuffles are fewer per query, but for one query it wastes three
    // quarters of its FMAs: measured slower at d >= 64. On AVX-512, where dot_rows keeps q in
    // registers up to d = 128, dot_rows query by query also beat the groups for 2 queries at
    // d = 32–64 (1.12–1.27×) and for 2–8 queries at d = 80–128 (1.10–1.20×), not for 4–8 queries
    // at d = 32–64 (0.87–1.02×; a Zen 4, one process, order rotated).
    constexpr bool kFloat = std::is_same_v<T, float>;
    const bool grouped = kFloat && (kW == 16 ? nq > 2 && d <= 4 * kW : nq > 1);
    const int64_t groups = grouped ? (nq + kQG - 1) / kQG : 0;
    const int d4 = (d + 3) / 4;
    float* spare = scores + nq * kSplitKeys;
    float* X = spare + kSplitKeys;  // groups × d4 vectors of kW floats: dot_rows_group's X
    if (groups) interleave_queries(qpad, dq, nq, d4, X);
    for (int64_t jb = 0; jb < n_max; jb += kW) {
      ahead(jb, kW);
      for (int64_t gi = 0; gi < groups; ++gi) {
        float* s_at[kQG];  // the group's scores from key jb on
        int64_t seen = 0;  // the keys any of the group's queries sees
        for (int g = 0; g < kQG; ++g) {
          const int64_t i = gi * kQG + g;
          s_at[g] = (i < nq ? scores + i * kSplitKeys : spare) + jb;
          if (i < nq) seen = std::max(seen, n[i]);
        }
        if constexpr (kFloat)
          if (jb < seen) dot_rows_group(X + gi * d4 * kW, K + jb * p.k.sn, p.k.sn, d, s_at, std::min<int64_t>(kW, seen - jb));
      }
      for (int64_t i = 0; !groups && i < nq; ++i)
        if (jb < n[i]) {
          float* s = scores + i * kSplitKeys + jb;
          const int64_t keys = std::min<int64_t>(kW, n[i] - jb);
          if constexpr (!kFloat)
            if (bf16_dot) {
              dot_rows_bf16_dot(p.q.row<T>(b, h, i), K + jb * p.k.sn, p.k.sn, d, qscale, s, keys);
              continue;
            }
          dot_rows(qpad + i * dq, K + jb * p.k.sn, p.k.sn, d, s, keys);
        }
    }
    bool any = false;  // some query saw a key here
    for (int64_t i = 0; i < nq; ++i) {
      float* out = part_of(i);
      float m = kNegInf;
      const float l = n[i] ? softmax2_unnormalised(scores + i * kSplitKeys, n[i], &m) : 0.f;  // 0: nothing seen here
      out[0] = m, out[1] = l;
      std::fill(out + 2, out + 2 + d, 0.f);
      any |= l != 0.f;
    }
    for (int64_t jc = 0; any && jc < n_max; jc += kPvKeys) {
      ahead(n_max + jc, kPvKeys);
      // the queries that see keys of this chunk: their probabilities, key counts and outputs
      const float* ps[kDecodeRows];
      int64_t ns[kDecodeRows], ng = 0;
      float* os[kDecodeRows];
      for (int64_t i = 0; i < nq; ++i) {
        float* out = part_of(i);
        if (jc < n[i] && out[1] != 0.f)
          ps[ng] = scores + i * kSplitKeys + jc, ns[ng] = std::min(kPvKeys, n[i] - jc), os[ng++] = out + 2;
      }
      pv(ps, ns, ng, V + jc * p.v.sn, p.v.sn, d, os);
    }
  }, kDecodeSerialBelow);

  // Merge the spans of each (head, query): O = Σ 2^(m_s - m)·O_s / Σ 2^(m_s - m)·l_s.
  at::parallel_for(0, BH * nq, 64, [&](int64_t r0, int64_t r1) {
    // the merged row: in place for float, else in float32 here and rounded into the output
    std::vector<float> acc(std::is_same_v<T, float> ? 0 : d);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / nq, i = r % nq;
      const float* first = parts + (bh * spans * nq + i) * part;
      float m = kNegInf;
      for (int64_t sp = 0; sp < spans; ++sp) m = vmax(first[sp * nq * part], m);
      T* out = p.o.row<T>(bh / p.H, bh % p.H, i);
      float* o;
      if constexpr (std::is_same_v<T, float>)
        o = out;
      else
        o = acc.data();
      std::fill(o, o + d, 0.f);
      if (p.lse) p.lse[bh * nq + i] = kNegInf;  // for the backward; set below when keys were seen
      if (m == kNegInf) {  // saw no key: a zero row, as SDPA gives
        std::fill(out, out + d, T(0.f));
        continue;
      }
      float l = 0.f;
      for (int64_t sp = 0; sp < spans; ++sp) {
        const float* ps = first + sp * nq * part;
        if (ps[0] == kNegInf) continue;
        const float w = std::exp2(ps[0] - m);  // NaN max: NaN weight, a NaN row as in the tile path
        l += w * ps[1];
        for (int c = 0; c < d; ++c) o[c] += w * ps[2 + c];
      }
      normalise_row(o, o, l, d);
      if constexpr (!std::is_same_v<T, float>) std::copy(o, o + d, out);  // rounds to nearest even
      if (p.lse) p.lse[bh * nq + i] = lse_from(m, l);  // log Σ_j e^(s_ij)
    }
  });
}

// A float32 forward that keeps the LSE for a backward takes the tiles (attention.h's flash_path).
void flash_decode(const Problem& p) { p.bf16 ? decode<c10::BFloat16>(p) : decode<float>(p); }

}  // namespace nanogpt
