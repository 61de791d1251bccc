// This host's FMA peak, measured: the figure the benchmark's GFLOP/s are a share of, so a
// reader on another host can scale the README's numbers. Independent multiply-add chains on
// the native vectors (simd.h's vw: one zmm with AVX-512, one ymm with AVX2), 12 of them: the
// FMA latency (4 cycles) times the FMA pipes (2 on Zen 3 and Skylake-X) is 8 chains in
// flight, and 12 registers plus two constants still fit in AVX2's 16. Not the 16-lane vf:
// GCC spills an array of two-register vectors to the stack.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <chrono>

#include "simd.h"

namespace nanogpt {
namespace {

constexpr int kChains = 12;
constexpr int64_t kStepsPerCheck = int64_t(1) << 14;  // FMAs per chain between clock reads

// Runs the chains for about `seconds`; returns the multiply-adds done (per lane).
int64_t fma_chains(double seconds, float* sink) {
  using clock = std::chrono::steady_clock;
  vw acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = vw{} + (1.0f + 0.01f * c);
  // x ← x·m + a converges to a/(1-m) = 1: finite forever, and not foldable by the compiler
  // since the step count is only known at run time. -ffp-contract=fast makes it one FMA.
  const vw m = vw{} + 0.999f, a = vw{} + 0.001f;
  const auto end = clock::now() + std::chrono::duration<double>(seconds);
  int64_t steps = 0;
  do {
    for (int64_t s = 0; s < kStepsPerCheck; ++s) {
#pragma GCC unroll 16
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * m + a;  // all 12 stay in registers
    }
    steps += kStepsPerCheck;
  } while (clock::now() < end);
  float total = 0.f;
  for (int c = 0; c < kChains; ++c)
    for (int l = 0; l < kW; ++l) total += acc[c][l];
  *sink = total;
  return steps * kChains * kW;
}

// The same with vdpbf16ps (two bfloat16 multiply-adds per float32 lane): the ceiling of the
// bfloat16 flash tiles (bf16.cpp). x ← x + a·a + a·a with a = 2^-24: x stays near 1, as long as
// it runs.
NANOGPT_AVX512_BF16 int64_t bf16_dot_chains(double seconds, float* sink) {
  using clock = std::chrono::steady_clock;
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(1.0f + 0.01f * c);
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3380);  // bfloat16 2^-24 in every element
  const auto end = clock::now() + std::chrono::duration<double>(seconds);
  int64_t steps = 0;
  do {
    for (int64_t s = 0; s < kStepsPerCheck; ++s) {
#pragma GCC unroll 16
      for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, a);
    }
    steps += kStepsPerCheck;
  } while (clock::now() < end);
  float total = 0.f;
  for (int c = 0; c < kChains; ++c) total += _mm512_reduce_add_ps(acc[c]);
  *sink = total;
  return steps * kChains * 32;  // 32 multiply-adds per instruction
}

// The same with AMX's TDPBF16PS (16×32 by 32×16 bfloat16 into 16×16 float32: 8192 multiply-adds
// an instruction) into four independent accumulator tiles, of zero operands: the ceiling of the
// bfloat16 flash tiles on AMX (bf16.cpp).
NANOGPT_AMX int64_t amx_chains(double seconds, float* sink) {
  using clock = std::chrono::steady_clock;
  alignas(64) static const uint8_t zeros[16 * 64] = {};
  amx_begin();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, zeros, 64);
  _tile_loadd(5, zeros, 64);
  _tile_loadd(6, zeros, 64);
  const auto end = clock::now() + std::chrono::duration<double>(seconds);
  int64_t steps = 0;
  do {
    for (int64_t s = 0; s < kStepsPerCheck / 16; ++s) {
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 6, 4);
    }
    steps += kStepsPerCheck / 16;
  } while (clock::now() < end);
  alignas(64) float out[16 * 16];
  _tile_stored(0, out, 64);
  amx_end();
  *sink = out[0];
  return steps * 4 * 8192;
}

// GFLOP/s of `threads` threads each running `chains` for `seconds`, over the whole run's wall
// time; 0 for no chains (an instruction this CPU lacks).
double peak_gflops(int64_t threads, double seconds, int64_t (*chains)(double, float*)) {
  TORCH_CHECK_VALUE(threads >= 1 && threads <= 1024, "threads must be in [1, 1024], got ", threads);
  TORCH_CHECK_VALUE(seconds > 0 && seconds <= 10, "seconds must be in (0, 10], got ", seconds);
  if (!chains) return 0.0;
  std::atomic<int64_t> fmas{0};
  volatile float sink = 0.f;  // keeps the chains' results alive
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float s = 0.f;
      fmas += chains(seconds, &s);
      sink = sink + s;
    }
  });
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return 2.0 * double(fmas.load()) / wall / 1e9;
}

}  // namespace

// GFLOP/s (2 flops per multiply-add) of `threads` threads each running FMA chains for
// `seconds`, over the wall time of the whole run (torch's intra-op threads: asking for more
// than torch.get_num_threads() runs some of them one after the other, and the figure says so).
double fma_peak_gflops(int64_t threads, double seconds) { return peak_gflops(threads, seconds, fma_chains); }

// The same for vdpbf16ps; 0 on a CPU without AVX-512 BF16.
double bf16_dot_peak_gflops(int64_t threads, double seconds) {
  return peak_gflops(threads, seconds, cpu_has_avx512_bf16() ? bf16_dot_chains : nullptr);
}

// Whether vdpbf16ps does more multiply-adds per second than the FMA on this CPU, by a margin
// (1.25×) that noise does not cross: one thread, the best of five alternating 0.5 ms runs of
// each, measured once (a host of this machine kind ran at half speed for minutes at a time, so
// one run of each could be timed in different phases). It does twice as many on a Zen 4 (both
// run as two 256-bit halves, and a vdpbf16ps does two multiply-adds per lane), but fewer than the
// FMA on the Sapphire Rapids host seen (243 against 529 GFLOP/s), where the bfloat16 flash tiles
// on it ran at 0.7× the float32 kernel on widened copies.
bool bf16_dot_outruns_fma() {
  static const bool faster = [] {
    if (!cpu_has_avx512_bf16()) return false;
    float sink = 0.f;
    const auto rate = [&](int64_t (*chains)(double, float*)) {
      const auto start = std::chrono::steady_clock::now();
      const int64_t mads = chains(0.0005, &sink);
      return double(mads) / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    double fma = 0, dot = 0;
    for (int i = 0; i < 5; ++i) fma = std::max(fma, rate(fma_chains)), dot = std::max(dot, rate(bf16_dot_chains));
    return dot > 1.25 * fma;
  }();
  return faster;
}

// The same for AMX's TDPBF16PS; 0 on a CPU without it.
double amx_peak_gflops(int64_t threads, double seconds) {
  return peak_gflops(threads, seconds, bf16_amx_ready() ? amx_chains : nullptr);
}

void add_peak_entry_points(pybind11::module_& m) {
  using pybind11::arg;
  m.def("fma_peak_gflops", &fma_peak_gflops, arg("threads"), arg("seconds"),
        "measured FMA throughput in GFLOP/s of `threads` threads for about `seconds` each");
  m.def("bf16_dot_peak_gflops", &bf16_dot_peak_gflops, arg("threads"), arg("seconds"),
        "the same for AVX-512 BF16's vdpbf16ps (bfloat16 pairs into float32); 0 without it");
  m.def("amx_peak_gflops", &amx_peak_gflops, arg("threads"), arg("seconds"),
        "the same for AMX's TDPBF16PS (bfloat16 tiles into float32); 0 without it");
}

}  // namespace nanogpt
