// The flash backward tile step in ISPC: same signature, layout and arithmetic as
// csrc/flash_backward_tile.h (read the shapes there): scores kept transposed, keys × queries,
// so K, V, Q and dO rows are read in place. One varying float = programCount consecutive
// queries or features: 16 on avx512skx-x16, 8 on avx2-i32x8 (run-time dispatch picks).
// The score and P·V register blocks are the forward's (ispc/blocks.isph); KEY_BLOCK is the
// backward's own.

#include "blocks.isph"  // VECS, kNegInf; SCORE_BLOCK, pv_panels; kernel_common.h (vexp2, first_row)

// Out[c, 0:W·NV] += Σ_{r < rows} Pt[c, r]·X[r, 0:W·NV] for R keys (dV += Pᵀ·dO, dK += dSᵀ·Q).
#define KEY_BLOCK(NAME, R, NV)                                                                \
  static inline void NAME(const uniform float Pt[], uniform int ldp, const uniform float X[],   \
                          uniform int64 ldx, uniform float Out[], uniform int ldo, uniform int rows) { \
    float acc[R][NV];                                                                         \
    _Pragma("unroll") for (uniform int c = 0; c < R; ++c)                                     \
      _Pragma("unroll") for (uniform int v = 0; v < NV; ++v)                                  \
        acc[c][v] = Out[c * ldo + v * programCount + programIndex];                           \
    const uniform float* uniform pr = Pt; /* Pt[c, r] = pr[c·ldp], X[r, :] = x[:] */           \
    const uniform float* uniform x = X;                                                       \
    for (uniform int r = 0; r < rows; ++r, ++pr, x += ldx) {                                  \
      float xv[NV];                                                                           \
      _Pragma("unroll") for (uniform int v = 0; v < NV; ++v)                                  \
        xv[v] = x[v * programCount + programIndex];                                           \
      _Pragma("unroll") for (uniform int c = 0; c < R; ++c) {                                 \
        const uniform float p = pr[c * ldp];                                                  \
        _Pragma("unroll") for (uniform int v = 0; v < NV; ++v) acc[c][v] += p * xv[v];        \
      }                                                                                       \
    }                                                                                         \
    _Pragma("unroll") for (uniform int c = 0; c < R; ++c)                                     \
      _Pragma("unroll") for (uniform int v = 0; v < NV; ++v)                                  \
        Out[c * ldo + v * programCount + programIndex] = acc[c][v];                           \
  }

SCORE_BLOCK(score_wide, kKeys, VECS)
SCORE_BLOCK(score_one, kKeys, 1)
SCORE_BLOCK(score_wide_tail, 1, VECS)
SCORE_BLOCK(score_one_tail, 1, 1)
KEY_BLOCK(key_wide, kWideRows, VECS)  // kWideRows keys × VECS vectors (as pv_wide)
#if kWideRows == 4
#define key_four key_wide
#else
KEY_BLOCK(key_four, 4, VECS)
#endif
KEY_BLOCK(key_one, 8, 1)      // 8 keys × 1 vector
KEY_BLOCK(key_wide_tail, 1, VECS)
KEY_BLOCK(key_one_tail, 1, 1)
KEY_BLOCK(key_two, 8, 2)
KEY_BLOCK(key_two_tail, 1, 2)
#if VECS > 2
SCORE_BLOCK(score_two, kKeys, 2)  // two-vector blocks for 32-wide panels (d = 32 and tails)
SCORE_BLOCK(score_two_tail, 1, 2)
#else
#define score_two score_wide
#define score_two_tail score_wide_tail
#endif

// Out (cols × nq) = A (cols × d, row stride lda) · Bt (d × nq).
static void keys_by_queries(const uniform float A[], uniform int64 lda, const uniform float Bt[],
                            uniform float Out[], uniform int nq, uniform int cols, uniform int d) {
  for (uniform int i = 0; i < nq; i += kPanel) {
    const uniform int pend = min(nq, i + kPanel);
    for (uniform int c = i; c < pend;) {
      const uniform int nv = block_vecs((pend - c) / programCount);
      uniform int j = 0;
      for (; j + kKeys <= cols; j += kKeys) {
        if (nv == VECS) score_wide(A + j * lda, lda, Bt + c, nq, Out + j * nq + c, nq, d);
        else if (nv == 2) score_two(A + j * lda, lda, Bt + c, nq, Out + j * nq + c, nq, d);
        else score_one(A + j * lda, lda, Bt + c, nq, Out + j * nq + c, nq, d);
      }
      for (; j < cols; ++j) {
        if (nv == VECS) score_wide_tail(A + j * lda, lda, Bt + c, nq, Out + j * nq + c, nq, d);
        else if (nv == 2) score_two_tail(A + j * lda, lda, Bt + c, nq, Out + j * nq + c, nq, d);
        else score_one_tail(A + j * lda, lda, Bt + c, nq, Out + j * nq + c, nq, d);
      }
      c += nv * programCount;
    }
  }
}

// Out (cols × dp) += Pt (cols × nq) · X (rows × dp, row stride ldx), over rows < `rows`, where Pt
// is 0 for rows r < first_row(c, diag): a block of keys starts at its first key's first row.
static void accumulate_keys(const uniform float Pt[], uniform int nq, const uniform float X[], uniform int64 ldx,
                            uniform float Out[], uniform int dp, uniform int rows, uniform int cols,
                            uniform int diag) {
  for (uniform int f = 0; f < dp;) {
    const uniform int nv = block_vecs((dp - f) / programCount);
    for (uniform int c = 0; c < cols;) {
      const uniform int r0 = first_row(c, diag);
      if (r0 >= rows) break;  // this key and every later one: hidden from every row
      const uniform float* uniform pt = Pt + c * nq + r0;
      const uniform float* uniform x = X + r0 * ldx + f;
      uniform float* uniform out = Out + c * dp + f;
      const uniform int n = rows - r0;
      if (nv == VECS) {
        if (c + kWideRows <= cols) { key_wide(pt, nq, x, ldx, out, dp, n); c += kWideRows; }
        else if (c + 4 <= cols) { key_four(pt, nq, x, ldx, out, dp, n); c += 4; }
        else { key_wide_tail(pt, nq, x, ldx, out, dp, n); ++c; }
      } else if (nv == 2) {
        if (c + 8 <= cols) { key_two(pt, nq, x, ldx, out, dp, n); c += 8; }
        else { key_two_tail(pt, nq, x, ldx, out, dp, n); ++c; }
      } else {
        if (c + 8 <= cols) { key_one(pt, nq, x, ldx, out, dp, n); c += 8; }
        else { key_one_tail(pt, nq, x, ldx, out, dp, n); ++c; }
      }
    }
    f += nv * programCount;
  }
}

export void flash_backward_tile(const uniform float Qt[], const uniform float Q[], uniform int64 ldq,
                                const uniform float dOt[], const uniform float dO[], uniform int64 ldo,
                                const uniform float K[], uniform int64 ldk, const uniform float V[],
                                uniform int64 ldv, const uniform float L[], const uniform float D[],
                                uniform float P[], uniform float dS[], uniform float dK[], uniform float dV[],
                                uniform float dQ[], uniform int rows, uniform int cols, uniform int d,
                                uniform int dp, uniform int diag, uniform float scale) {
  const uniform int nq = (rows + 15) / 16 * 16;

  // 1. P = 2^(K·Qt − L), hidden keys (c ≥ r + diag) first set to -inf so that they give 0.
  keys_by_queries(K, ldk, Qt, P, nq, cols, d);
  for (uniform int c = max(0, diag); c < cols; ++c) {
    foreach (r = 0 ... min(nq, c - diag + 1)) P[c * nq + r] = kNegInf;
  }
  for (uniform int c = 0; c < cols; ++c)
    for (uniform int r = 0; r < nq; r += programCount)
      P[c * nq + r + programIndex] = vexp2(P[c * nq + r + programIndex] - L[r + programIndex]);

  // 2. dV += Pᵀ·dO.
  accumulate_keys(P, nq, dO, ldo, dV, dp, rows, cols, diag);

  // 3. dS = scale·P∘(V·dOt − D).
  keys_by_queries(V, ldv, dOt, dS, nq, cols, d);
  for (uniform int c = 0; c < cols; ++c)
    for (uniform int r = 0; r < nq; r += programCount) {
      const int i = c * nq + r + programIndex;
      dS[i] = P[i] * (dS[i] - D[r + programIndex]) * scale;
    }

  // 4. dK += dSᵀ·Q.
  accumulate_keys(dS, nq, Q, ldq, dK, dp, rows, cols, diag);

  // 5. dQ += dS·K: the forward's P·V kernel, with dS for P and K for V.
  pv_panels(dS, nq, K, ldk, dQ, dp, cols, diag);
}
