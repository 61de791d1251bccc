// The flash tile step in C++: the twin of ispc/flash_tile.ispc, with the same signature and
// the same arithmetic, used when the build has no ispc (and tested in that build).
//
// One step of the online softmax for a block of queries against one block of `cols` keys.
// Scores are kept transposed, keys × queries, so that K and V are read in place (a key's
// elements are broadcast, 16 queries form a vector) and the per-query running max and sum
// are plain vector operations. Only Qᵀ is packed, once per query block.
//   Qt (d × nq)      the block's queries, transposed and pre-multiplied by scale·log2(e);
//                    nq = round_up(rows, 16); lanes past `rows` are junk, never written out
//   K  (cols × d)    key rows, row stride ldk;  V (cols × dp) value rows, row stride ldv
//                    (dp = round_up(d, 16); V's columns past d must be readable and finite)
//   St (cols × nq)   scratch: probabilities P = 2^(S − m), masked entries 0
//   O  (nq × dp)     unnormalised output, rescaled here when a running max grows
//   m, l (nq)        running max and running sum per query, in log2 units; m may trail the
//                    true max by up to kLazyMax (P ≤ 2^8), since it rises only past that
//   tmp (3·nq)       scratch
// Query r sees the block's keys c < r + diag (the causal diagonal; diag ≥ cols: all).
#pragma once

#include <algorithm>
#include <type_traits>

#include "simd.h"

namespace nanogpt::cpp {

// kKeys, kPanel, kChunkBytes and the diagonal's bounds (keys_seen, first_row) come from
// kernel_common.h (through simd.h), shared with ispc.
constexpr int kMaxVecs = 4;  // vectors per register block: kKeys×4 = 24 accumulators
static_assert(kPanel == kMaxVecs * kLanes, "a score panel is one register block wide");

// acc[r][0:NV] = Σ_k K[r, k]·Qt[k, 0:16·NV] for R keys: the score blocks' loop.
template <int R, int NV>
NANOGPT_INLINE void score_acc(const float* K, int64_t ldk, const float* Qt, int ldq, int d, vf (&acc)[R][NV]) {
  for (int k = 0; k < d; ++k) {
    vf qv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) qv[v] = vload(Qt + k * ldq + v * kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const vf kr = vsplat(K[r * ldk + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += kr * qv[v];
    }
  }
}

// St[r, 0:16·NV] = Σ_k K[r, k]·Qt[k, 0:16·NV] for R keys.
template <int R, int NV>
inline void score_block(const float* K, int64_t ldk, const float* Qt, int ldq, float* St, int lds, int d) {
  vf acc[R][NV] = {};
  score_acc(K, ldk, Qt, ldq, d, acc);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(St + r * lds + v * kLanes, acc[r][v]);
}

// Whether a lane of x passes t (a NaN lane does not: its query's output is NaN either way).
inline bool any_above(vf x, float t) {
  bool any = false;
  for (int i = 0; i < kLanes; ++i) any |= x[i] > t;
  return any;
}

// Raises the reference max of 16 queries to at least `bmax` and rescales what was taken
// against the old one: the `done` probability rows above St and their sum (ispc's raise_ref).
inline vf raise_ref(float* St, int lds, int done, float* mref, float* sum, vf bmax) {
  const vf mold = vload(mref), mnew = vmax(bmax, mold);
  const vf a = mnew > mold ? vexp2(mold - mnew) : 1.f;  // 0 from -inf (its rows held zeros)
  for (int k = 1; k <= done; ++k) vstore(St - k * lds, vload(St - k * lds) * a);
  vstore(sum, vload(sum) * a);
  vstore(mref, mnew);
  return mnew;
}

// St[r, 0:16·NV] = P = 2^(S[r, :] − mref) and sum += Σ_r P[r, :] for R keys: score_block with
// the causal mask and the softmax's exp in its epilogue (ispc's SCORE_EXP_BLOCK: mref may trail
// the true max by kLazyMax before raise_ref raises it). Query lane q of vector v hides row r's key
// when 16·v + q < hide + r.
template <int R, int NV>
inline void score_exp_block(const float* K, int64_t ldk, const float* Qt, int ldq, float* St, int lds, int d,
                            float* mref, float* sum, int done, int hide) {
  if (hide >= NV * kLanes) {  // every lane hides every row: P = 0 without the scores
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) vstore(St + r * lds + v * kLanes, vf{});
    return;
  }
  vf acc[R][NV] = {};
  score_acc(K, ldk, Qt, ldq, d, acc);
  for (int v = 0; v < NV; ++v) {
    const int c = v * kLanes;
    if (c < hide + R - 1)
      for (int r = 0; r < R; ++r)
        for (int q = 0; q < std::min(kLanes, hide + r - c); ++q) acc[r][v][q] = kNegInf;
    vf mr = vload(mref + c), bmax = acc[0][v], s = {};
    for (int r = 1; r < R; ++r) bmax = vmax(acc[r][v], bmax);
    if (any_above(bmax - mr, kLazyMax)) mr = raise_ref(St + c, lds, done, mref + c, sum + c, bmax);
    const vf ms = mr == kNegInf ? vf{} : mr;  // no key seen yet: P = 0, not NaN
    for (int r = 0; r < R; ++r) {
      const vf e = vexp2(acc[r][v] - ms);
      vstore(St + r * lds + c, e);
      s += e;
    }
    vstore(sum + c, vload(sum + c) + s);
  }
}

// O[r, 0:16·NV] += Σ_{j < cols} Pt[j, r]·V[j, 0:16·NV] for R queries. kPRows: P is read the other
// way, Pt[r, j] (the backward's dV += Pᵀ·dO and dK += dSᵀ·Q, whose output rows are keys).
template <int R, int NV, bool kPRows = false>
inline void pv_block(const float* Pt, int ldp, const float* V, int64_t ldv, float* O, int ldo, int cols) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload(O + r * ldo + v * kLanes);
  for (int j = 0; j < cols; ++j) {
    vf vv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vv[v] = vload(V + j * ldv + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf pr = vsplat(kPRows ? Pt[r * ldp + j] : Pt[j * ldp + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += pr * vv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(O + r * ldo + v * kLanes, acc[r][v]);
}

// Calls block<R, nv> for nv in 1..kMaxVecs (register blocks need compile-time widths).
#define NANOGPT_BY_WIDTH(nv, block, R, ...)       \
  switch (nv) {                                   \
    case 1: block<R, 1>(__VA_ARGS__); break;      \
    case 2: block<R, 2>(__VA_ARGS__); break;      \
    case 3: block<R, 3>(__VA_ARGS__); break;      \
    default: block<R, 4>(__VA_ARGS__); break;     \
  }

// Out (nq × dp) += Σ_{c < cols} Pt[c, r]·X[c, 0:dp] for every query r < nq (a multiple of 16),
// where Pt is 0 for c ≥ r + vis: 4×4 accumulators, narrower feature panels 8 queries at a time.
// The forward's O += Pᵀ·V and the backward's dQ += dS·K (ispc's pv_panels).
inline void pv_panels(const float* Pt, int nq, const float* X, int64_t ldx, float* Out, int dp, int cols, int vis) {
  for (int f = 0; f < dp; f += kPanel) {
    const int nv = std::min(kMaxVecs, (dp - f) / kLanes), rows_per = nv == kMaxVecs ? 4 : 8;
    for (int r = 0; r < nq; r += rows_per) {
      const int seen = keys_seen(cols, r, rows_per, vis);
      if (seen <= 0) continue;
      if (nv == kMaxVecs) pv_block<4, 4>(Pt + r, nq, X + f, ldx, Out + r * dp + f, dp, seen);
      else NANOGPT_BY_WIDTH(nv, pv_block, 8, Pt + r, nq, X + f, ldx, Out + r * dp + f, dp, seen);
    }
  }
}

// Calls block(R, i, j, nv) for the register blocks of a (cols × nq) score tile: panels of kPanel
// queries from column i (Bt's panel stays in L1), nv vectors wide, blocks of R = kKeys keys from
// row j (a 1-key tail); R comes as a std::integral_constant, for the templates.
template <class Block>
inline void score_panels(int nq, int cols, const Block& block) {
  for (int i = 0; i < nq; i += kPanel) {
    const int nv = std::min(kMaxVecs, (nq - i) / kLanes);
    int j = 0;
    for (; j + kKeys <= cols; j += kKeys) block(std::integral_constant<int, kKeys>{}, i, j, nv);
    for (; j < cols; ++j) block(std::integral_constant<int, 1>{}, i, j, nv);
  }
}

// Out (cols × nq) = A (cols × d, row stride lda) · Bt (d × nq): the backward's score kernel.
inline void keys_by_queries(const float* A, int64_t lda, const float* Bt, float* Out, int nq, int cols, int d) {
  score_panels(nq, cols, [&](auto r, int i, int j, int nv) {
    NANOGPT_BY_WIDTH(nv, score_block, decltype(r)::value, A + j * lda, lda, Bt + i, nq, Out + j * nq + i, nq, d);
  });
}

inline void flash_tile(const float* Qt, const float* K, int64_t ldk, const float* V, int64_t ldv,
                       float* St, float* O, float* m, float* l, float* tmp, int rows, int cols,
                       int d, int dp, int diag) {
  const int nq = int(round_up(rows, kLanes));
  float *mref = tmp, *sum = tmp + nq, *alpha = tmp + 2 * nq;  // mref: the running max P is taken against
  std::copy(m, m + nq, mref);
  std::fill(sum, sum + nq, 0.f);

  // 1. St = P = 2^(K·Qt − mref), masked (key j is hidden from queries r < j - diag + 1): panels
  //    and blocks as score_panels.
  score_panels(nq, cols, [&](auto r, int i, int j, int nv) {
    NANOGPT_BY_WIDTH(nv, score_exp_block, decltype(r)::value, K + j * ldk, ldk, Qt + i, nq, St + j * nq + i, nq, d,
                     mref + i, sum + i, j, j - diag + 1 - i);
  });

  // 2. The running max becomes mref; l and O are rescaled where it rose (alpha: exactly 1 where
  //    it did not, 0 on a query's first visible block).
  for (int i = 0; i < nq; i += kLanes) {
    const vf mr = vload(mref + i), ms = mr == kNegInf ? vf{} : mr;
    vstore(alpha + i, vexp2(vload(m + i) - ms));
    vstore(m + i, mr);
    vstore(l + i, vload(l + i) * vload(alpha + i) + vload(sum + i));
  }
  for (int r = 0; r < nq; ++r)
    if (alpha[r] != 1.f)
      for (int c = 0; c < dp; ++c) O[r * dp + c] *= alpha[r];

  // 3. O += Pᵀ·V by chunks of keys whose V rows stay in L1 across all query blocks. Each block
  //    of rows stops at the last key its last row sees (the causal triangle's zeros are skipped).
  const int chunk = std::max(kLanes, kChunkBytes / int(sizeof(float)) / dp);
  for (int j = 0; j < cols; j += chunk)
    pv_panels(St + j * nq, nq, V + j * ldv, ldv, O, dp, std::min(chunk, cols - j), diag - j);
}

}  // namespace nanogpt::cpp
