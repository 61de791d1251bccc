// The flash tile step in ISPC: same signature and arithmetic as csrc/flash_tile.h (read the
// shapes there). One varying float = programCount consecutive columns: 16 on avx512skx-x16,
// 8 on avx2-i32x8; ispc's multi-target build picks the target at run time.

#define ROWS 6  // query rows per register block (the C++ twin's kRows; callers pad to it)
#if TARGET_WIDTH >= 16
#define VECS 4  // 6×4 accumulators of 32 zmm registers
#else
#define VECS 2  // 6×2 accumulators of 16 ymm registers
#endif

#define kNegInf (-floatbits(0x7f800000))

// 2^x as in the C++ twin: x below -125 (and -inf) gives 0, NaN stays NaN.
static inline float exp2_poly(float x) {
  const bool under = x < -125.f;
  x = under ? -125.f : x;
  const float n = (x + 12582912.f) - 12582912.f;
  const float f = x - n;
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const float r = p * floatbits(((int)n + 127) << 23);
  return under ? 0.f : r;
}

// S[r, 0:W·NV] = Σ_k Q[r, k]·Kt[k, 0:W·NV] for ROWS rows; NV = VECS or 1 (the tail).
#define QK_BLOCK(NAME, NV)                                                                   \
  static inline void NAME(const uniform float Q[], uniform int ldq, const uniform float Kt[], \
                          uniform int ldk, uniform float S[], uniform int lds, uniform int d) { \
    float acc[ROWS][NV];                                                                     \
    _Pragma("unroll") for (uniform int r = 0; r < ROWS; ++r)                                 \
      _Pragma("unroll") for (uniform int v = 0; v < NV; ++v) acc[r][v] = 0.f;                \
    for (uniform int k = 0; k < d; ++k) {                                                    \
      float kv[NV];                                                                          \
      _Pragma("unroll") for (uniform int v = 0; v < NV; ++v)                                 \
        kv[v] = Kt[k * ldk + v * programCount + programIndex];                               \
      _Pragma("unroll") for (uniform int r = 0; r < ROWS; ++r) {                             \
        const uniform float q = Q[r * ldq + k];                                              \
        _Pragma("unroll") for (uniform int v = 0; v < NV; ++v) acc[r][v] += q * kv[v];       \
      }                                                                                      \
    }                                                                                        \
    _Pragma("unroll") for (uniform int r = 0; r < ROWS; ++r)                                 \
      _Pragma("unroll") for (uniform int v = 0; v < NV; ++v)                                 \
        S[r * lds + v * programCount + programIndex] = acc[r][v];                            \
  }

// O[r, 0:W·NV] += Σ_{j < cols} P[r, j]·V[j, 0:W·NV] for ROWS rows.
#define PV_BLOCK(NAME, NV)                                                                   \
  static inline void NAME(const uniform float P[], uniform int ldp, const uniform float V[],  \
                          uniform int ldv, uniform float O[], uniform int ldo, uniform int cols) { \
    float acc[ROWS][NV];                                                                     \
    _Pragma("unroll") for (uniform int r = 0; r < ROWS; ++r)                                 \
      _Pragma("unroll") for (uniform int v = 0; v < NV; ++v)                                 \
        acc[r][v] = O[r * ldo + v * programCount + programIndex];                            \
    for (uniform int j = 0; j < cols; ++j) {                                                 \
      float vv[NV];                                                                          \
      _Pragma("unroll") for (uniform int v = 0; v < NV; ++v)                                 \
        vv[v] = V[j * ldv + v * programCount + programIndex];                                \
      _Pragma("unroll") for (uniform int r = 0; r < ROWS; ++r) {                             \
        const uniform float p = P[r * ldp + j];                                              \
        _Pragma("unroll") for (uniform int v = 0; v < NV; ++v) acc[r][v] += p * vv[v];       \
      }                                                                                      \
    }                                                                                        \
    _Pragma("unroll") for (uniform int r = 0; r < ROWS; ++r)                                 \
      _Pragma("unroll") for (uniform int v = 0; v < NV; ++v)                                 \
        O[r * ldo + v * programCount + programIndex] = acc[r][v];                            \
  }

QK_BLOCK(qk_wide, VECS)
QK_BLOCK(qk_one, 1)
PV_BLOCK(pv_wide, VECS)
PV_BLOCK(pv_one, 1)

export void flash_tile(const uniform float Qp[], const uniform float Kt[], const uniform float Vp[],
                       uniform float S[], uniform float O[], uniform float m[], uniform float l[],
                       uniform int rows, uniform int cols, uniform int d, uniform int dp,
                       uniform int bcp, uniform int diag) {
  const uniform int rows6 = (rows + ROWS - 1) / ROWS * ROWS;
  const uniform int width = (cols + 15) / 16 * 16;  // the twin's width: a multiple of both W

  // 1. S = Qp·Kt in panels of VECS vectors (one vector for the tail).
  for (uniform int c = 0; c < width;) {
    if (c + VECS * programCount <= width) {
      for (uniform int r = 0; r < rows6; r += ROWS) qk_wide(Qp + r * dp, dp, Kt + c, bcp, S + r * bcp + c, bcp, d);
      c += VECS * programCount;
    } else {
      for (uniform int r = 0; r < rows6; r += ROWS) qk_one(Qp + r * dp, dp, Kt + c, bcp, S + r * bcp + c, bcp, d);
      c += programCount;
    }
  }

  // 2. Online softmax, row by row.
  for (uniform int r = 0; r < rows; ++r) {
    uniform float* uniform s = S + r * bcp;
    foreach (c = clamp(r + diag, 0, cols)... width) s[c] = kNegInf;
    float vm = kNegInf;
    foreach (c = 0 ... width) vm = s[c] > vm ? s[c] : vm;
    const uniform float mnew = max(m[r], reduce_max(vm));
    if (mnew == kNegInf) {  // nothing visible to this row yet
      foreach (c = 0 ... width) s[c] = 0.f;
      continue;
    }
    float vs = 0.f;
    foreach (c = 0 ... width) {
      const float e = exp2_poly(s[c] - mnew);
      s[c] = e;
      vs += e;
    }
    const uniform float alpha = extract(exp2_poly(m[r] - mnew), 0);  // 0 on the first visible block
    l[r] = l[r] * alpha + reduce_add(vs);
    m[r] = mnew;
    if (alpha != 1.f) foreach (k = 0 ... dp) O[r * dp + k] *= alpha;
  }
  for (uniform int r = rows; r < rows6; ++r) foreach (c = 0 ... width) S[r * bcp + c] = 0.f;

  // 3. O += P·V in panels of VECS vectors of output features.
  for (uniform int c = 0; c < dp;) {
    if (c + VECS * programCount <= dp) {
      for (uniform int r = 0; r < rows6; r += ROWS) pv_wide(S + r * bcp, bcp, Vp + c, dp, O + r * dp + c, dp, cols);
      c += VECS * programCount;
    } else {
      for (uniform int r = 0; r < rows6; r += ROWS) pv_one(S + r * bcp, bcp, Vp + c, dp, O + r * dp + c, dp, cols);
      c += programCount;
    }
  }
}

// What the runtime dispatch chose: lanes per varying, and ispc's version as major·100 + minor.
export void flash_ispc_info(uniform int* uniform lanes, uniform int* uniform version) {
  *lanes = programCount;
  *version = ISPC_MAJOR_VERSION * 100 + ISPC_MINOR_VERSION;
}
