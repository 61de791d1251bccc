// The flash tile step in ISPC: same signature, layout and arithmetic as csrc/flash_tile.h
// (read the shapes there): scores kept transposed, keys × queries; K and V read in place.
// One varying float = programCount consecutive queries or features: 16 on avx512skx-x16,
// 8 on avx2-i32x8; ispc's multi-target build picks the target at run time.

#include "blocks.isph"  // VECS, kNegInf; SCORE_BLOCK, PV_BLOCK; kernel_common.h

// Raises the reference max of one vector of queries to at least `bmax` and rescales what was
// taken against the old one: the `done` probability rows above St and their sum. Returns the
// new reference (the rare path of SCORE_EXP_BLOCK, out of its registers).
static float raise_ref(uniform float St[], uniform int lds, uniform int done, uniform float mref[],
                       uniform float sum[], float bmax) {
  const float mold = mref[programIndex];
  const float mnew = vmax(bmax, mold);
  const float a = vexp2(mold - mnew);
  for (uniform int k = 1; k <= done; ++k) St[-k * lds + programIndex] *= a;
  sum[programIndex] *= a;
  mref[programIndex] = mnew;
  return mnew;
}

// Out[r, 0:W·NV] = 2^(S[r, :] − mref) and sum += Σ_r Out[r, :] for R keys: the score block
// with the softmax's exp in its epilogue, against a reference max per query (mref, log2 units)
// instead of the tile's own. P stays ≤ 2^kLazyMax: a block whose scores pass mref + kLazyMax
// raises mref (raise_ref) and rescales the tile's `done` rows above Out.
#define SCORE_EXP_BLOCK(NAME, R, NV)                                                          \
  static inline void NAME(const uniform float A[], uniform int64 lda, const uniform float Bt[],  \
                          uniform int ldb, uniform float Out[], uniform int ldo, uniform int d,  \
                          uniform float mref[], uniform float sum[], uniform int done) {       \
    SCORE_ACC(R, NV)                                                                          \
    _Pragma("unroll") for (uniform int v = 0; v < NV; ++v) {                                  \
      const uniform int c = v * programCount;                                                 \
      float mr = mref[c + programIndex];                                                      \
      float bmax = acc[0][v];                                                                 \
      _Pragma("unroll") for (uniform int r = 1; r < R; ++r) bmax = vmax(acc[r][v], bmax);     \
      if (any(bmax > mr + kLazyMax)) mr = raise_ref(Out + c, ldo, done, mref + c, sum + c, bmax); \
      float s = 0.f;                                                                          \
      _Pragma("unroll") for (uniform int r = 0; r < R; ++r) {                                 \
        const float e = vexp2(acc[r][v] - mr);                                                \
        Out[r * ldo + c + programIndex] = e;                                                  \
        s += e;                                                                               \
      }                                                                                       \
      sum[c + programIndex] += s;                                                             \
    }                                                                                         \
  }

SCORE_BLOCK(score_wide, kKeys, VECS)
SCORE_BLOCK(score_one, kKeys, 1)
SCORE_BLOCK(score_wide_tail, 1, VECS)
SCORE_BLOCK(score_one_tail, 1, 1)
SCORE_EXP_BLOCK(score_wide_exp, kKeys, VECS)
SCORE_EXP_BLOCK(score_one_exp, kKeys, 1)
SCORE_EXP_BLOCK(score_wide_tail_exp, 1, VECS)
SCORE_EXP_BLOCK(score_one_tail_exp, 1, 1)
PV_BLOCK(pv_one, 8, 1)      // 8 queries × 1 vector
PV_BLOCK(pv_two, 8, 2)  // 32-wide panels on avx512 (on avx2, two vectors are VECS)
#if VECS > 2
SCORE_BLOCK(score_two, kKeys, 2)  // two-vector blocks for 32-wide panels (d = 32 and tails)
SCORE_BLOCK(score_two_tail, 1, 2)
SCORE_EXP_BLOCK(score_two_exp, kKeys, 2)
SCORE_EXP_BLOCK(score_two_tail_exp, 1, 2)
#else
#define score_two score_wide
#define score_two_tail score_wide_tail
#define score_two_exp score_wide_exp
#define score_two_tail_exp score_wide_tail_exp
#endif

export void flash_tile(const uniform float Qt[], const uniform float K[], uniform int64 ldk,
                       const uniform float V[], uniform int64 ldv, uniform float St[],
                       uniform float O[], uniform float m[], uniform float l[], uniform float tmp[],
                       uniform int rows, uniform int cols, uniform int d, uniform int dp,
                       uniform int diag) {
  const uniform int nq = (rows + kPad - 1) / kPad * kPad;

  uniform float* uniform mref = tmp;  // the max that P is taken against, per query
  uniform float* uniform alpha = tmp + nq;
  uniform float* uniform sum = tmp + 2 * nq;

  // A tile without a mask, for queries whose running max is finite (every tile after their
  // first, unless a score was ±inf or NaN), takes P = 2^(S − m) in the score blocks against the
  // running max m itself, raised only when a score passes it by kLazyMax: no pass over St for
  // the max, none for the exp, and O is rarely rescaled.
  uniform bool lazy = diag >= cols;
  for (uniform int r = 0; r < nq; r += programCount) {
    const int i = r + programIndex;
    lazy = lazy && all(abs(m[i]) < -kNegInf);
    mref[i] = m[i];
    sum[i] = 0.f;
  }

  // 1. St = K·Qt (lazy: P): panels of up to kPanel queries, blocks of kKeys keys (1-key tail).
  for (uniform int i = 0; i < nq; i += kPanel) {
    const uniform int pend = min(nq, i + kPanel);
    for (uniform int c = i; c < pend;) {
      const uniform int nv = block_vecs((pend - c) / programCount);
      for (uniform int j = 0; j < cols;) {
        const uniform float* uniform Kj = K + j * ldk;
        uniform float* uniform Sj = St + j * nq + c;
        if (j + kKeys > cols) {
          if (lazy && nv == VECS) score_wide_tail_exp(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j);
          else if (lazy && nv == 2) score_two_tail_exp(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j);
          else if (lazy) score_one_tail_exp(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j);
          else if (nv == VECS) score_wide_tail(Kj, ldk, Qt + c, nq, Sj, nq, d);
          else if (nv == 2) score_two_tail(Kj, ldk, Qt + c, nq, Sj, nq, d);
          else score_one_tail(Kj, ldk, Qt + c, nq, Sj, nq, d);
          ++j;
        } else {
          if (lazy && nv == VECS) score_wide_exp(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j);
          else if (lazy && nv == 2) score_two_exp(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j);
          else if (lazy) score_one_exp(Kj, ldk, Qt + c, nq, Sj, nq, d, mref + c, sum + c, j);
          else if (nv == VECS) score_wide(Kj, ldk, Qt + c, nq, Sj, nq, d);
          else if (nv == 2) score_two(Kj, ldk, Qt + c, nq, Sj, nq, d);
          else score_one(Kj, ldk, Qt + c, nq, Sj, nq, d);
          j += kKeys;
        }
      }
      c += nv * programCount;
    }
  }

  if (lazy) {
    for (uniform int r = 0; r < nq; r += programCount) {
      const int i = r + programIndex;
      alpha[i] = vexp2(m[i] - mref[i]);  // exactly 1 unless mref rose
      m[i] = mref[i];
    }
  } else {
    // 2. Causal mask: key j is hidden from queries r < j - diag + 1.
    for (uniform int j = max(0, diag); j < cols; ++j) {
      foreach (r = 0 ... min(nq, j - diag + 1)) St[j * nq + r] = kNegInf;
    }

    // 3. Online softmax, one lane per query. nq and dp are multiples of 16, so plain loops over
    //    whole vectors replace foreach (whose set-up per key row cost more than its body).
    for (uniform int r = 0; r < nq; r += programCount) mref[r + programIndex] = kNegInf;
    for (uniform int j = 0; j < cols; ++j) {
      const uniform float* uniform s = St + j * nq;
      for (uniform int r = 0; r < nq; r += programCount) {
        const float x = s[r + programIndex];
        mref[r + programIndex] = vmax(x, mref[r + programIndex]);
      }
    }
    for (uniform int r = 0; r < nq; r += programCount) {
      const int i = r + programIndex;
      const float mold = m[i];
      const float mnew = vmax(mref[i], mold);
      const float ms = mnew == kNegInf ? 0.f : mnew;  // a query that sees nothing yet: P = 0, not NaN
      m[i] = mnew;
      mref[i] = ms;
      alpha[i] = vexp2(mold - ms);  // 0 on a query's first visible block
    }
    for (uniform int j = 0; j < cols; ++j) {
      uniform float* uniform s = St + j * nq;
      for (uniform int r = 0; r < nq; r += programCount) {
        const float e = vexp2(s[r + programIndex] - mref[r + programIndex]);
        s[r + programIndex] = e;
        sum[r + programIndex] += e;
      }
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
