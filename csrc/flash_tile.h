// The flash tile step in C++: the twin of ispc/flash_tile.ispc, with the same signature and
// the same arithmetic, used when the build has no ispc (and tested in that build).
//
// One step of the online softmax for `rows` query rows against one block of `cols` keys:
//   Qp (rows6 × dp)  query rows, pre-multiplied by scale·log2(e), rows6 = round_up(rows, 6);
//                    rows past `rows` hold finite junk (never written out)
//   Kt (d × bcp)     the key block transposed, so 16 keys form one vector
//   Vp (cols × dp)   the value block, columns past d zero
//   S  (rows6 × bcp) scratch for scores, then probabilities
//   O  (rows6 × dp)  unnormalised output, rescaled here when the running max grows
//   m, l (rows)      running max and running sum, in log2 units
// Row r sees the block's columns c < clamp(r + diag, 0, cols) (the causal diagonal).
#pragma once

#include <algorithm>

#include "simd.h"

namespace nanogpt::cpp {

constexpr int kRows = 6;     // query rows per register block
constexpr int kMaxVecs = 4;  // 16-float vectors per register block: 6×4 = 24 accumulators

// S[r, 0:16·NV] = Σ_k Q[r, k]·Kt[k, 0:16·NV] for kRows rows.
template <int NV>
inline void qk_block(const float* Q, int ldq, const float* Kt, int ldk, float* S, int lds, int d) {
  vf acc[kRows][NV] = {};
  for (int k = 0; k < d; ++k) {
    vf kv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) kv[v] = vload(Kt + k * ldk + v * kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const vf q = vsplat(Q[r * ldq + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += q * kv[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) vstore(S + r * lds + v * kLanes, acc[r][v]);
}

// O[r, 0:16·NV] += Σ_{j < cols} P[r, j]·V[j, 0:16·NV] for kRows rows.
template <int NV>
inline void pv_block(const float* P, int ldp, const float* V, int ldv, float* O, int ldo, int cols) {
  vf acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload(O + r * ldo + v * kLanes);
  for (int j = 0; j < cols; ++j) {
    vf vv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vv[v] = vload(V + j * ldv + v * kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const vf pr = vsplat(P[r * ldp + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += pr * vv[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) vstore(O + r * ldo + v * kLanes, acc[r][v]);
}

// Calls block<NV> for nv in 1..kMaxVecs (register blocks need compile-time widths).
#define NANOGPT_BY_WIDTH(nv, block, ...)       \
  switch (nv) {                                \
    case 1: block<1>(__VA_ARGS__); break;      \
    case 2: block<2>(__VA_ARGS__); break;      \
    case 3: block<3>(__VA_ARGS__); break;      \
    default: block<4>(__VA_ARGS__); break;     \
  }

inline void flash_tile(const float* Qp, const float* Kt, const float* Vp, float* S, float* O,
                       float* m, float* l, int rows, int cols, int d, int dp, int bcp, int diag) {
  const int rows6 = int(round_up(rows, kRows));
  const int width = int(round_up(cols, kLanes));  // columns computed; ≤ bcp

  // 1. S = Qp·Kt, one panel of up to 64 keys at a time so the panel stays in L1.
  for (int c = 0; c < width; c += kMaxVecs * kLanes) {
    const int nv = std::min(kMaxVecs, (width - c) / kLanes);
    for (int r = 0; r < rows6; r += kRows)
      NANOGPT_BY_WIDTH(nv, qk_block, Qp + r * dp, dp, Kt + c, bcp, S + r * bcp + c, bcp, d);
  }

  // 2. Online softmax, row by row: mask, new max, P = 2^(S - max), rescale l and O.
  for (int r = 0; r < rows; ++r) {
    float* s = S + r * bcp;
    std::fill(s + std::clamp(r + diag, 0, cols), s + width, kNegInf);
    vf vm = vsplat(kNegInf);
    for (int c = 0; c < width; c += kLanes) vm = vmax(vm, vload(s + c));
    const float mnew = std::max(m[r], hmax(vm));
    if (mnew == kNegInf) {  // nothing visible to this row yet
      std::fill(s, s + width, 0.f);
      continue;
    }
    vf vs = {};
    for (int c = 0; c < width; c += kLanes) {
      const vf e = vexp2(vload(s + c) - mnew);
      vstore(s + c, e);
      vs += e;
    }
    const float alpha = std::exp2(m[r] - mnew);  // 0 on the first visible block
    l[r] = l[r] * alpha + hsum(vs);
    m[r] = mnew;
    if (alpha != 1.f)
      for (int k = 0; k < dp; ++k) O[r * dp + k] *= alpha;
  }
  for (int r = rows; r < rows6; ++r) std::fill(S + r * bcp, S + r * bcp + width, 0.f);

  // 3. O += P·V, in column panels of up to 64 output features.
  for (int c = 0; c < dp; c += kMaxVecs * kLanes) {
    const int nv = std::min(kMaxVecs, (dp - c) / kLanes);
    for (int r = 0; r < rows6; r += kRows)
      NANOGPT_BY_WIDTH(nv, pv_block, S + r * bcp, bcp, Vp + c, dp, O + r * dp + c, dp, cols);
  }
}

#undef NANOGPT_BY_WIDTH

}  // namespace nanogpt::cpp
