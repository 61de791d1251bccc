// flash's decode path: a few queries (a KV-cache step: Nq <= kDecodeRows) against many keys.
// The tile path packs queries into vector lanes, so one query would fill 1 lane of 16; here
// each query's scores are dot products vectorised over d (native-width vectors, reduced
// kW keys at a time by a transpose-and-add tree), and P·V is vectorised over d too.
//
// Keys are split into fixed spans of kSplitKeys: work item (head, span) computes, for each of
// the head's queries, the span's max m, sum l = Σ 2^(s - m) and unnormalised O = Σ 2^(s - m)·v;
// the spans are then merged exactly (log-sum-exp). The span length depends on nothing but the
// constant, so a query's result is the same for any thread count, batch or head count, and any
// number of queries in the call that takes this path (the tile path, for more queries, rounds
// differently within float32 error). K and V are read in place, any row stride, as float32 or
// bfloat16 (widened as they are read: a bfloat16 cache is half the bytes, and this path is
// bound by the memory's speed, so it needs no bfloat16 arithmetic).
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

// a[0:NV] += p·v[0:NV·kW] (the last vector's rem elements only, where Tail): one key's row
template <bool Tail, int NV, class T>
inline void pv_key(vw (&a)[NV], float p, const T* v, int rem) {
  const vw pj = wsplat(p);
#pragma GCC unroll 8
  for (int i = 0; i < NV - 1; ++i) a[i] += pj * wload(v + i * kW);
  a[NV - 1] += pj * (Tail ? wload_part(v + (NV - 1) * kW, rem) : wload(v + (NV - 1) * kW));
}

// The key loop of pv_slice, its last vector partial (Tail) or not: decided once, outside the loop
// (a test per key kept GCC from holding the accumulators in registers across it).
template <bool Tail, int NV, class T>
void pv_keys(const float* p, const T* v, int64_t ldv, int64_t n, int rem, vw (&acc0)[NV], vw (&acc1)[NV]) {
  constexpr int kSets = 2 * NV <= (kW == 16 ? 16 : 8) ? 2 : 1;
  int64_t j = 0;
  if constexpr (kSets == 2)
    for (; j + 2 <= n; j += 2) {
      pv_key<Tail>(acc0, p[j], v + j * ldv, rem);
      pv_key<Tail>(acc1, p[j + 1], v + (j + 1) * ldv, rem);
    }
  for (; j < n; ++j) pv_key<Tail>(acc0, p[j], v + j * ldv, rem);
}

// o[0:d] += Σ_{j<n} p[j]·V[j, 0:d], NV vectors of features at a time held in registers; V's
// elements T are float or c10::BFloat16. Keys alternate between two sets of accumulators where
// the registers hold them (2·NV <= half the vector registers): with one set, few vectors (NV = 2
// at d = 32 on AVX-512) left the loop waiting on the FMA's latency.
template <int NV, class T>
void pv_slice(const float* p, const T* V, int64_t ldv, int64_t n, int c0, int d, float* o) {
  vw acc0[NV] = {}, acc1[NV] = {};
  const int rem = d - (c0 + (NV - 1) * kW);  // the last vector's elements: partial, loaded without over-read
  if (rem < kW)
    pv_keys<true>(p, V + c0, ldv, n, rem, acc0, acc1);
  else
    pv_keys<false>(p, V + c0, ldv, n, rem, acc0, acc1);
  for (int i = 0; i < NV; ++i) {
    const int n_out = std::min(kW, d - (c0 + i * kW));
    vw sum = acc0[i] + acc1[i];
    if (n_out == kW)
      sum += wload(o + c0 + i * kW);
    else
      sum += wload_part(o + c0 + i * kW, n_out);
    std::memcpy(o + c0 + i * kW, &sum, n_out * sizeof(float));
  }
}

template <class T>
void pv(const float* p, const T* V, int64_t ldv, int64_t n, int d, float* o) {
  constexpr int kMaxNV = 8;  // 8 accumulators (2 × 8 with AVX-512's 32 registers) + operands
  for (int c0 = 0; c0 < d; c0 += kMaxNV * kW) {
    switch (std::min<int>(kMaxNV, (d - c0 + kW - 1) / kW)) {
      case 1: pv_slice<1, T>(p, V, ldv, n, c0, d, o); break;
      case 2: pv_slice<2, T>(p, V, ldv, n, c0, d, o); break;
      case 3: pv_slice<3, T>(p, V, ldv, n, c0, d, o); break;
      case 4: pv_slice<4, T>(p, V, ldv, n, c0, d, o); break;
      case 5: pv_slice<5, T>(p, V, ldv, n, c0, d, o); break;
      case 6: pv_slice<6, T>(p, V, ldv, n, c0, d, o); break;
      case 7: pv_slice<7, T>(p, V, ldv, n, c0, d, o); break;
      default: pv_slice<8, T>(p, V, ldv, n, c0, d, o); break;
    }
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

  parallel_items(BH * spans, at::get_num_threads(), 2 * nq * kSplitKeys * p.d, [&](int64_t t, int64_t) {
    const int64_t bh = t / spans, span = t % spans, b = bh / p.H, h = bh % p.H;
    const int64_t j0 = span * kSplitKeys, j1 = std::min(p.Nk, j0 + kSplitKeys);
    // This thread's padded queries and scores: kept across calls (an allocation per call
    // costs as much as a short step's keys).
    static thread_local std::vector<float> scratch;
    scratch.resize(std::max<size_t>(scratch.size(), nq * (dq + kSplitKeys)));
    float* qpad = scratch.data();
    float* scores = qpad + nq * dq;  // query i's: scores + i·kSplitKeys
    int64_t n[kDecodeRows], n_max = 0;  // keys [j0, j0 + n[i]) visible to query i
    const auto part_of = [&](int64_t i) { return parts + ((bh * spans + span) * nq + i) * part; };  // m, l, O[0:d]
    for (int64_t i = 0; i < nq; ++i) {
      n[i] = std::max<int64_t>(0, std::min(j1, p.key_end(i)) - j0);
      n_max = std::max(n_max, n[i]);
      const T* q = p.q.row<T>(b, h, i);
      float* qi = qpad + i * dq;  // zero past d: dot_rows multiplies it by K's masked-off tail
      for (int c = 0; c < d; ++c) qi[c] = float(q[c]) * qscale;
      std::fill(qi + d, qi + dq, 0.f);
    }
    // The queries share each read of K and V: a block of kW keys (a chunk of kPvKeys for V)
    // stays in L1 while every query takes it, so the span comes from memory once, not nq times.
    // The blocks depend on nothing but j0, so each query's sums are the same in any company.
    const T* K = p.k.row<T>(b, h, j0);
    for (int64_t jb = 0; jb < n_max; jb += kW)
      for (int64_t i = 0; i < nq; ++i)
        if (jb < n[i]) dot_rows(qpad + i * dq, K + jb * p.k.sn, p.k.sn, d, scores + i * kSplitKeys + jb, std::min<int64_t>(kW, n[i] - jb));
    bool any = false;  // some query saw a key here
    for (int64_t i = 0; i < nq; ++i) {
      float* out = part_of(i);
      float m = kNegInf;
      const float l = n[i] ? softmax2_unnormalised(scores + i * kSplitKeys, n[i], &m) : 0.f;  // 0: nothing seen here
      out[0] = m, out[1] = l;
      std::fill(out + 2, out + 2 + d, 0.f);
      any |= l != 0.f;
    }
    const T* V = p.v.row<T>(b, h, j0);
    for (int64_t jc = 0; any && jc < n_max; jc += kPvKeys)
      for (int64_t i = 0; i < nq; ++i) {
        float* out = part_of(i);
        if (jc < n[i] && out[1] != 0.f)
          pv(scores + i * kSplitKeys + jc, V + jc * p.v.sn, p.v.sn, std::min(kPvKeys, n[i] - jc), d, out + 2);
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

void flash_decode(const Problem& p) { p.bf16 ? decode<c10::BFloat16>(p) : decode<float>(p); }

}  // namespace nanogpt
