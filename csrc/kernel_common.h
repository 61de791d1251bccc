// The constants and the math that the C++ kernels and ispc/flash_tile.ispc share, written once
// in the subset of C++17 and ISPC that both compile (ispc's preprocessor includes this file).
// The functions are templates over the float type: vf in C++, varying float in ISPC (the
// diagonal's bounds over the integer type: int, uniform int in ISPC). The
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
  kLazyMax = 8,         // P may be taken against a running max that trails the tile's by up
                        // to this (log2 units): P ≤ 2^8, so O and l stay far from overflow
};

// The causal diagonal inside a tile, where query r sees keys c < r + vis (vis = diag, less the
// first key of a P·V chunk; vis ≥ cols: all keys). The tile's P (and the backward's dS) holds
// exact zeros at hidden entries, so a register block may stop, or start, where its last (first)
// row's visible keys do, and its other rows read their hidden entries as zeros.
// Of `cols` keys, those a block of R query rows from row r reads: its last row's, c < r + R - 1 + vis.
template <typename I>
inline I keys_seen(I cols, I r, I R, I vis) {
  const I n = r + R - 1 + vis;
  return n < cols ? n : cols;
}
// The first query row that sees key c: a block of keys from c starts there.
template <typename I>
inline I first_row(I c, I diag) {
  const I r = c - diag + 1;
  return r > 0 ? r : 0;
}

// max(x, m) that propagates NaN: a NaN score makes its query's output NaN, as in SDPA's
// vectorised softmax (SDPA's scalar tail, for rows of under 16 keys, skips NaN instead).
template <typename F>
inline F vmax(F x, F m) {
  return (x > m) | (x != x) ? x : m;
}

// 2^f for f in [-0.5, 0.5]: a degree-6 Taylor polynomial (truncation error (ln2/2)^7/7! ≈ 1.2e-7).
template <typename F>
inline F exp2_frac(F f) {
  F p = 1.5403530393381606e-4f * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  return p * f + 1.f;
}

// 2^x = 2^n · 2^f, n = round(x), through AVX-512's vscalefps: the including file's scalef(p, n)
// = p·2^n and round_even(x), where its vectors have them. scalef underflows gradually to 0 and
// keeps NaN, so no select is needed: x below -150 (and -inf) gives 0, NaN stays NaN. About
// 10 instructions where vexp2's bit path below takes 16 (the flash tile's softmax is mostly this).
#if !defined(ISPC) || defined(ISPC_TARGET_AVX512SKX)
template <typename F>
inline F vexp2_scalef(F x) {
  const F xc = x < -150.f ? -150.f : x;  // NaN < -150 is false: NaN stays
  const F n = round_even(xc);
  return scalef(exp2_frac(xc - n), n);
}
#endif

// 2^x, relative error ~1e-7. x below -125 (and -inf) gives 0 (vexp2_scalef: a subnormal down to
// -150), NaN stays NaN. Round-to-nearest by the 1.5·2^23 trick, then 2^x = 2^n · 2^f with f in
// [-0.5, 0.5], 2^n from the exponent bits (the including file's pow2i). ispc's avx512 target
// takes vexp2_scalef; C++ overloads vexp2 for its AVX-512 vectors in simd.h.
template <typename F>
inline F vexp2(F x) {
#if defined(ISPC_TARGET_AVX512SKX)
  return vexp2_scalef(x);
#else
  const F xc = x < -125.f ? -125.f : x;
  const F n = (xc + 12582912.f) - 12582912.f;
  const F r = exp2_frac(xc - n) * pow2i(n);  // NaN · anything = NaN
  return x < -125.f ? 0.f : r;
#endif
}

#ifndef ISPC
}  // namespace nanogpt
#endif

#endif  // NANOGPT_KERNEL_COMMON_H
