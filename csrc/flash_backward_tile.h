// The flash backward tile step in C++: the twin of ispc/flash_backward.ispc, with the same
// signature and the same arithmetic, used when the build has no ispc (and tested in that build).
//
// One block of `cols` keys against one block of `rows` queries (nq = round_up(rows, 16) lanes).
// As in the forward (flash_tile.h), scores are kept transposed, keys × queries, so K, V, Q and
// dO rows are read in place and per-query values (L, D) are plain vectors:
//   Qt  (d × nq)     queries transposed, × scale·log2(e); lanes past `rows` zero
//   Q   (rows × dp)  query rows, unscaled, row stride ldq        ─┐ dp = round_up(d, 16):
//   dOt (d × nq)     dL/dO transposed; lanes past `rows` zero      │ columns past d must be
//   dO  (rows × dp)  dL/dO rows, row stride ldo                    │ readable and finite (the
//   K   (cols × dp)  key rows, row stride ldk                     ─┘ caller pads copies)
//   V   (cols × d)   value rows, row stride ldv
//   L   (nq)         each query's log-sum-exp in log2 units; +inf for a query that sees no key
//                    and past `rows` (then P = 0)
//   D   (nq)         rowsum(dO∘O); 0 past `rows`
//   P, dS (cols × nq) scratch
//   dK, dV (cols × dp) this key block's accumulators: dK += scale·dSᵀQ, dV += PᵀdO (by rows < `rows`)
//   dQ  (nq × dp)    this query block's accumulator: dQ += scale·dS·K (lanes past `rows` get 0)
// Query r sees the block's keys c < r + diag (the causal diagonal; diag ≥ cols: all).
// With S = K·Qt the scores in log2 units: P = 2^(S − L), dP = V·dOt, dS = scale·P∘(dP − D)
// (scale folded into dS, so dK and dQ need no pass of their own).
#pragma once

#include <algorithm>

#include "flash_tile.h"
#include "simd.h"

namespace nanogpt::cpp {

// pv_block<R, nv, true> for nv in 1..kMaxVecs: P read as Pt[key, query].
#define NANOGPT_BY_WIDTH_P(nv, R, ...)                   \
  switch (nv) {                                          \
    case 1: pv_block<R, 1, true>(__VA_ARGS__); break;    \
    case 2: pv_block<R, 2, true>(__VA_ARGS__); break;    \
    case 3: pv_block<R, 3, true>(__VA_ARGS__); break;    \
    default: pv_block<R, 4, true>(__VA_ARGS__); break;   \
  }

// Out (cols × dp) += Pt (cols × nq) · X (rows × dp, row stride ldx), over rows < `rows`, where Pt
// is 0 for rows r < first_row(c, diag): a block of keys starts at its first key's first row.
inline void accumulate_keys(const float* Pt, int nq, const float* X, int64_t ldx, float* Out, int dp, int rows,
                            int cols, int diag) {
  for (int f = 0; f < dp; f += kPanel) {
    const int nv = std::min(kMaxVecs, (dp - f) / kLanes);
    for (int c = 0; c < cols;) {
      const int r0 = first_row(c, diag);
      if (r0 >= rows) break;  // this key and every later one: hidden from every row
      const float* pt = Pt + c * nq + r0;
      const float* x = X + r0 * ldx + f;
      float* out = Out + c * dp + f;
      if (nv == kMaxVecs && c + 4 <= cols) {  // 4×4 accumulators; narrower panels take 8 keys at a time
        pv_block<4, 4, true>(pt, nq, x, ldx, out, dp, rows - r0);
        c += 4;
      } else if (nv < kMaxVecs && c + 8 <= cols) {
        NANOGPT_BY_WIDTH_P(nv, 8, pt, nq, x, ldx, out, dp, rows - r0);
        c += 8;
      } else {
        NANOGPT_BY_WIDTH_P(nv, 1, pt, nq, x, ldx, out, dp, rows - r0);
        ++c;
      }
    }
  }
}

inline void flash_backward_tile(const float* Qt, const float* Q, int64_t ldq, const float* dOt, const float* dO,
                                int64_t ldo, const float* K, int64_t ldk, const float* V, int64_t ldv,
                                const float* L, const float* D, float* P, float* dS, float* dK, float* dV,
                                float* dQ, int rows, int cols, int d, int dp, int diag, float scale) {
  const int nq = int(round_up(rows, kLanes));

  // 1. P = 2^(K·Qt − L), hidden keys (c ≥ r + diag) first set to -inf so that they give 0.
  keys_by_queries(K, ldk, Qt, P, nq, cols, d);
  for (int c = std::max(0, diag); c < cols; ++c)
    std::fill(P + c * nq, P + c * nq + std::min(nq, c - diag + 1), kNegInf);
  for (int c = 0; c < cols; ++c)
    for (int i = 0; i < nq; i += kLanes) vstore(P + c * nq + i, vexp2(vload(P + c * nq + i) - vload(L + i)));

  // 2. dV += Pᵀ·dO.
  accumulate_keys(P, nq, dO, ldo, dV, dp, rows, cols, diag);

  // 3. dS = scale·P∘(V·dOt − D).
  keys_by_queries(V, ldv, dOt, dS, nq, cols, d);
  for (int c = 0; c < cols; ++c)
    for (int i = 0; i < nq; i += kLanes) {
      const vf ds = vload(P + c * nq + i) * (vload(dS + c * nq + i) - vload(D + i));
      vstore(dS + c * nq + i, ds * scale);
    }

  // 4. dK += dSᵀ·Q.
  accumulate_keys(dS, nq, Q, ldq, dK, dp, rows, cols, diag);

  // 5. dQ += dS·K: the forward's P·V kernel, with dS for P and K for V.
  pv_panels(dS, nq, K, ldk, dQ, dp, cols, diag);
}

#undef NANOGPT_BY_WIDTH_P

}  // namespace nanogpt::cpp
