// The flash tile step in ISPC: same signature, layout and arithmetic as csrc/flash_tile.h
// (read the shapes there): scores kept transposed, keys × queries; K and V read in place.
// One varying float = programCount consecutive queries or features: 16 on avx512skx-x16,
// 8 on avx2-i32x8; ispc's multi-target build picks the target at run time.

#include "blocks.isph"  // VECS, kNegInf; SCORE_ACC, pv_panels; kernel_common.h (vexp2, kLazyMax)

// Raises the reference max of one vector of queries to at least `bmax` and rescales what was
// taken against the old one: the `done` probability rows above St and their sum. Returns the
// new reference (the rare path of SCORE_EXP_BLOCK, out of its registers).
static float raise_ref(uniform float St[], uniform int lds, uniform int done, uniform float mref[],
                       uniform float sum[], float bmax) {
  const float mold = mref[programIndex];
  const float mnew = vmax(bmax, mold);
  const float a = mnew > mold ? vexp2(mold - mnew) : 1.f;  // 0 from -inf (its rows held zeros)
  for (uniform int k = 1; k <= done; ++k) St[-k * lds + programIndex] *= a;
  sum[programIndex] *= a;
  mref[programIndex] = mnew;
  return mnew;
}

// Out[r, 0:W·NV] = P = 2^(S[r, :] − mref) and sum += Σ_r P[r, :] for R keys: the score block
// with the causal mask and the softmax's exp in its epilogue, while S is in registers. mref is a
// reference max per query (log2 units) that may trail the true one: a block whose scores pass
// mref + kLazyMax raises it (raise_ref, rescaling the tile's `done` rows above Out), so
// P ≤ 2^kLazyMax. Query lane q of vector v hides row r's key when v·W + q < hide + r.
#define SCORE_EXP_BLOCK(NAME, R, NV)                                                          \
  static inline void NAME(const uniform float A[], uniform int64 lda, const uniform float Bt[],  \
                          uniform int ldb, uniform float Out[], uniform int ldo, uniform int d,  \
                          uniform float mref[], uniform float sum[], uniform int done,         \
                          uniform int hide) {                                                 \
    if (hide >= NV * programCount) { /* every lane hides every row: P = 0 without the scores */ \
      _Pragma("unroll") for (uniform int r = 0; r < R; ++r)                                   \
        _Pragma("unroll") for (uniform int v = 0; v < NV; ++v)                                \
          Out[r * ldo + v * programCount + programIndex] = 0.f;                               \
      return;                                                                                 \
    }                                                                                         \
    SCORE_ACC(R, NV)                                                                          \
    _Pragma("unroll") for (uniform int v = 0; v < NV; ++v) {                                  \
      const uniform int c = v * programCount;                                                 \
      if (c < hide + R - 1)                                                                   \
        _Pragma("unroll") for (uniform int r = 0; r < R; ++r)                                 \
          if (c + programIndex < hide + r) acc[r][v] = kNegInf;                               \
      float mr = mref[c + programIndex];                                                      \
      float bmax = acc[0][v];                                                                 \
      _Pragma("unroll") for (uniform int r = 1; r < R; ++r) bmax = vmax(acc[r][v], bmax);     \
      if (any(bmax - mr > kLazyMax)) mr = raise_ref(Out + c, ldo, done, mref + c, sum + c, bmax); \
      const float ms = mr == kNegInf ? 0.f : mr; /* no key seen yet: P = 0, not NaN */        \
      float s = 0.f;                                                                          \
      _Pragma("unroll") for (uniform int r = 0; r < R; ++r) {                                 \
        const float e = vexp2(acc[r][v] - ms);                                                \
        Out[r * ldo + c + programIndex] = e;                                                  \
        s += e;                                                                               \
      }                                                                                       \
      sum[c + programIndex] += s;                                                             \
    }                                                                                         \
  }

SCORE_EXP_BLOCK(score_wide, kKeys, VECS)
SCORE_EXP_BLOCK(score_one, kKeys, 1)
SCORE_EXP_BLOCK(score_wide_tail, 1, VECS)
SCORE_EXP_BLOCK(score_one_tail, 1, 1)
#if VECS > 2
SCORE_EXP_BLOCK(score_two, kKeys, 2)  // two-vector blocks for 32-wide panels (d = 32 and tails)
SCORE_EXP_BLOCK(score_two_tail, 1, 2)
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
  uniform float* uniform mref = tmp;  // the running max that P is taken against, per query
  uniform float* uniform sum = tmp + nq;
  for (uniform int r = 0; r < nq; r += programCount) {
    mref[r + programIndex] = m[r + programIndex];
    sum[r + programIndex] = 0.f;
  }

  // 1. St = P = 2^(K·Qt − mref), masked: panels of up to kPanel queries, blocks of kKeys keys
  //    (1-key tail). Key j is hidden from queries r < j - diag + 1.
  for (uniform int i = 0; i < nq; i += kPanel) {
    const uniform int pend = min(nq, i + kPanel);
    for (uniform int c = i; c < pend;) {
      const uniform int nv = block_vecs((pend - c) / programCount);
      for (uniform int j = 0; j < cols;) {
        const uniform float* uniform Kj = K + j * ldk;
        uniform float* uniform Sj = St + j * nq + c;
        const uniform int hide = j - diag + 1 - c;
        if (j + kKeys > cols) {
          if (nv == VECS) score_wide_tail(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j, hide);
          else if (nv == 2) score_two_tail(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j, hide);
          else score_one_tail(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j, hide);
          ++j;
        } else {
          if (nv == VECS) score_wide(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j, hide);
          else if (nv == 2) score_two(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j, hide);
          else score_one(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j, hide);
          j += kKeys;
        }
      }
      c += nv * programCount;
    }
  }

  // 2. The running max becomes mref; l and O are rescaled where it rose (alpha: exactly 1 where
  //    it did not, 0 on a query's first visible block).
  uniform float* uniform alpha = tmp + 2 * nq;
  for (uniform int r = 0; r < nq; r += programCount) {
    const int i = r + programIndex;
    const float ms = mref[i] == kNegInf ? 0.f : mref[i];
    alpha[i] = vexp2(m[i] - ms);
    m[i] = mref[i];
    l[i] = l[i] * alpha[i] + sum[i];
  }
  for (uniform int r = 0; r < nq; ++r) {
    const uniform float a = alpha[r];
    if (a != 1.f)
      for (uniform int c = 0; c < dp; c += programCount) O[r * dp + c + programIndex] *= a;
  }

  // 3. O += Pᵀ·V by chunks of keys whose V rows stay in L1 across all query blocks. Each block
  //    of rows stops at the last key its last row sees (the causal triangle's zeros are skipped).
  const uniform int chunk = max(kPad, kChunkBytes / 4 / dp);
  for (uniform int j = 0; j < cols; j += chunk)
    pv_panels(St + j * nq, nq, V + j * ldv, ldv, O, dp, min(chunk, cols - j), diag - j);
}

// What the runtime dispatch chose: lanes per varying, and ispc's version as major·100 + minor.
export void flash_ispc_info(uniform int* uniform lanes, uniform int* uniform version) {
  *lanes = programCount;
  *version = ISPC_MAJOR_VERSION * 100 + ISPC_MINOR_VERSION;
}
