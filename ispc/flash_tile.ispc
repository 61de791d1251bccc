// The flash tile step in ISPC: same signature, layout and arithmetic as csrc/flash_tile.h
// (read the shapes there): scores kept transposed, keys × queries; K and V read in place.
// One varying float = programCount consecutive queries or features: 16 on avx512skx-x16,
// 8 on avx2-i32x8; ispc's multi-target build picks the target at run time.

#include "blocks.isph"  // VECS, kNegInf; SCORE_BLOCK, PV_BLOCK; kernel_common.h

SCORE_BLOCK(score_wide, kKeys, VECS)
SCORE_BLOCK(score_one, kKeys, 1)
SCORE_BLOCK(score_wide_tail, 1, VECS)
SCORE_BLOCK(score_one_tail, 1, 1)
PV_BLOCK(pv_one, 8, 1)      // 8 queries × 1 vector
PV_BLOCK(pv_two, 8, 2)  // 32-wide panels on avx512 (on avx2, two vectors are VECS)
#if VECS > 2
SCORE_BLOCK(score_two, kKeys, 2)  // two-vector blocks for 32-wide panels (d = 32 and tails)
SCORE_BLOCK(score_two_tail, 1, 2)
#else
#define score_two score_wide
#define score_two_tail score_wide_tail
#endif

export void flash_tile(const uniform float Qt[], const uniform float K[], uniform int64 ldk,
                       const uniform float V[], uniform int64 ldv, uniform float St[],
                       uniform float O[], uniform float m[], uniform float l[], uniform float tmp[],
                       uniform int rows, uniform int cols, uniform int d, uniform int dp,
                       uniform int diag) {
  const uniform int nq = (rows + kPad - 1) / kPad * kPad;

  // 1. St = K·Qt: panels of up to kPanel queries, blocks of kKeys keys (1-key tail).
  for (uniform int i = 0; i < nq; i += kPanel) {
    const uniform int pend = min(nq, i + kPanel);
    for (uniform int c = i; c < pend;) {
      const uniform int nv = block_vecs((pend - c) / programCount);
      uniform int j = 0;
      for (; j + kKeys <= cols; j += kKeys) {
        if (nv == VECS) score_wide(K + j * ldk, ldk, Qt + c, nq, St + j * nq + c, nq, d);
        else if (nv == 2) score_two(K + j * ldk, ldk, Qt + c, nq, St + j * nq + c, nq, d);
        else score_one(K + j * ldk, ldk, Qt + c, nq, St + j * nq + c, nq, d);
      }
      for (; j < cols; ++j) {
        if (nv == VECS) score_wide_tail(K + j * ldk, ldk, Qt + c, nq, St + j * nq + c, nq, d);
        else if (nv == 2) score_two_tail(K + j * ldk, ldk, Qt + c, nq, St + j * nq + c, nq, d);
        else score_one_tail(K + j * ldk, ldk, Qt + c, nq, St + j * nq + c, nq, d);
      }
      c += nv * programCount;
    }
  }

  // 2. Causal mask: key j is hidden from queries r < j - diag + 1.
  for (uniform int j = max(0, diag); j < cols; ++j) {
    foreach (r = 0 ... min(nq, j - diag + 1)) St[j * nq + r] = kNegInf;
  }

  // 3. Online softmax, one lane per query. nq and dp are multiples of 16, so plain loops over
  //    whole vectors replace foreach (whose set-up per key row cost more than its body).
  uniform float* uniform msafe = tmp;
  uniform float* uniform alpha = tmp + nq;
  uniform float* uniform sum = tmp + 2 * nq;
  for (uniform int r = 0; r < nq; r += programCount) msafe[r + programIndex] = kNegInf;
  for (uniform int j = 0; j < cols; ++j) {
    const uniform float* uniform s = St + j * nq;
    for (uniform int r = 0; r < nq; r += programCount) {
      const float x = s[r + programIndex];
      msafe[r + programIndex] = vmax(x, msafe[r + programIndex]);
    }
  }
  for (uniform int r = 0; r < nq; r += programCount) {
    const int i = r + programIndex;
    const float mold = m[i];
    const float mnew = vmax(msafe[i], mold);
    const float ms = mnew == kNegInf ? 0.f : mnew;  // a query that sees nothing yet: P = 0, not NaN
    m[i] = mnew;
    msafe[i] = ms;
    alpha[i] = vexp2(mold - ms);  // 0 on a query's first visible block
    sum[i] = 0.f;
  }
  for (uniform int j = 0; j < cols; ++j) {
    uniform float* uniform s = St + j * nq;
    for (uniform int r = 0; r < nq; r += programCount) {
      const float e = vexp2(s[r + programIndex] - msafe[r + programIndex]);
      s[r + programIndex] = e;
      sum[r + programIndex] += e;
    }
  }
  for (uniform int r = 0; r < nq; r += programCount) {
    const int i = r + programIndex;
    l[i] = l[i] * alpha[i] + sum[i];
  }
  for (uniform int r = 0; r < nq; ++r) {
    const uniform float a = alpha[r];
    if (a != 1.f)
      for (uniform int c = 0; c < dp; c += programCount) O[r * dp + c + programIndex] *= a;
  }

  // 4. O += Pᵀ·V by chunks of keys whose V rows stay in L1 across all query blocks.
  const uniform int chunk = max(kPad, kChunkBytes / 4 / dp);
  for (uniform int j = 0; j < cols; j += chunk) {
    const uniform int n = min(chunk, cols - j);
    for (uniform int c = 0; c < dp;) {
      const uniform int nv = block_vecs((dp - c) / programCount);
      const uniform float* uniform Pt = St + j * nq;
      const uniform float* uniform Vj = V + j * ldv + c;
      if (nv == VECS) {  // blocks of kWideRows queries; narrower panels take 8 at a time
        pv_wide_rows(Pt, nq, Vj, ldv, O + c, dp, nq, n);
      } else if (nv == 2) {
        for (uniform int r = 0; r < nq; r += 8) pv_two(Pt + r, nq, Vj, ldv, O + r * dp + c, dp, n);
      } else {
        for (uniform int r = 0; r < nq; r += 8) pv_one(Pt + r, nq, Vj, ldv, O + r * dp + c, dp, n);
      }
      c += nv * programCount;
    }
  }
}

// What the runtime dispatch chose: lanes per varying, and ispc's version as major·100 + minor.
export void flash_ispc_info(uniform int* uniform lanes, uniform int* uniform version) {
  *lanes = programCount;
  *version = ISPC_MAJOR_VERSION * 100 + ISPC_MINOR_VERSION;
}
