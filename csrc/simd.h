// 16-lane float vectors through GCC vector extensions: one zmm register with AVX-512,
// two ymm with AVX2, so the C++ kernels stay portable and the compiler picks the ISA
// from -march. Loads and stores are unaligned (memcpy compiles to vmovups).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace nanogpt {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vsplat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // a NaN lane yields b

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// 2^x, relative error ~1e-7. x below -125 (and -inf) gives exactly 0, NaN stays NaN.
// Round-to-nearest by the 1.5·2^23 trick, then 2^x = 2^n · 2^f with f in [-0.5, 0.5]
// and a degree-6 Taylor polynomial for 2^f (truncation error (ln2/2)^7/7! ≈ 1.2e-7).
inline vf vexp2(vf x) {
  const vi under = x < -125.f;
  x = under ? vsplat(-125.f) : x;
  const vf n = (x + 12582912.f) - 12582912.f;
  const vf f = x - n;
  vf p = vsplat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n, n in [-125, 0]
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const vf r = p * scale;  // NaN · anything = NaN
  return under ? vf{} : r;
}

// ---------------------------------------------------------------------------------------
// Row helpers shared by the unfused variants (naive, blocked) and the fused one.

// Σ a[i]·b[i]
inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a·x
inline void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// In place: s[j] = 2^(s[j] - max s) for a row of n log2-scaled scores; returns Σ s[j].
// A row whose scores are all -inf (fully masked) becomes all zeros and returns 0.
inline float softmax2_unnormalised(float* s, int64_t n) {
  vf vm = vsplat(kNegInf);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) vm = vmax(vm, vload(s + j));
  float m = hmax(vm);
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  if (m == kNegInf) {
    std::fill(s, s + n, 0.f);
    return 0.f;
  }
  vf vs = {};
  for (j = 0; j + kLanes <= n; j += kLanes) {
    const vf e = vexp2(vload(s + j) - m);
    vstore(s + j, e);
    vs += e;
  }
  float sum = hsum(vs);
  for (; j < n; ++j) {
    s[j] = s[j] - m < -125.f ? 0.f : std::exp2(s[j] - m);
    sum += s[j];
  }
  return sum;
}

}  // namespace nanogpt
