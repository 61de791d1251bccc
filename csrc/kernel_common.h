// The constants and the math that the C++ kernels and ispc/flash_tile.ispc share, written once
// in the subset of C++17 and ISPC that both compile (ispc's preprocessor includes this file).
// The functions are templates over the float type: vf in C++, varying float in ISPC. The
// including file first defines pow2i(F n) = 2^n for whole n in [-125, 0], from the exponent
// bits, which each language writes its own way.
#ifndef NANOGPT_KERNEL_COMMON_H
#define NANOGPT_KERNEL_COMMON_H

#ifndef ISPC
namespace nanogpt {
#endif

// The flash tile (csrc/flash_tile.h, ispc/flash_tile.ispc):
enum {
  kKeys = 6,            // keys per register block of the score kernel
  kPanel = 64,          // queries per score panel (its Qᵀ stays in L1)
  kChunkBytes = 16384,  // P·V walks keys in chunks of V this big (fits L1)
  kPad = 16,            // queries and features are padded to multiples of 16: the C++ vf's
                        // width, and a multiple of every ispc target's width
};

// max(x, m) that propagates NaN: a NaN score makes its query's output NaN, as in SDPA's
// vectorised softmax (SDPA's scalar tail, for rows of under 16 keys, skips NaN instead).
template <typename F>
inline F vmax(F x, F m) {
  return (x > m) | (x != x) ? x : m;
}

// 2^x, relative error ~1e-7. x below -125 (and -inf) gives exactly 0, NaN stays NaN.
// Round-to-nearest by the 1.5·2^23 trick, then 2^x = 2^n · 2^f with f in [-0.5, 0.5]
// and a degree-6 Taylor polynomial for 2^f (truncation error (ln2/2)^7/7! ≈ 1.2e-7).
template <typename F>
inline F vexp2(F x) {
  const F xc = x < -125.f ? -125.f : x;
  const F n = (xc + 12582912.f) - 12582912.f;
  const F f = xc - n;
  F p = 1.5403530393381606e-4f * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const F r = p * pow2i(n);  // NaN · anything = NaN
  return x < -125.f ? 0.f : r;
}

#ifndef ISPC
}  // namespace nanogpt
#endif

#endif  // NANOGPT_KERNEL_COMMON_H
