// nanogpt-flash: the one kernel signature and the one dispatch table.
//
// Every variant computes O = softmax(Q Kᵀ·scale + mask) V for one problem:
//   q, o: (B, H, Nq, d)   k, v: (B, Hk, Nk, d)   float32 (or all bfloat16: Problem::bf16), last
//   dimension contiguous, other strides arbitrary (nanoGPT's q.view(B,T,H,hs).transpose(1,2) is
//   read in place).
// Grouped-query attention (SDPA's enable_gqa): Hk divides H and query head h reads kv head
// h / (H / Hk); View::group does that mapping, so no kernel copies or repeats K and V.
// Causal masks are aligned bottom-right: query i sees keys j <= i + (Nk - Nq), which is
// what KV-cache decoding needs (SDPA's is_causal aligns top-left; the two agree when
// Nq == Nk). A query that sees no key gets a zero output row, as SDPA gives.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace nanogpt {

// A (B, H, N, d) tensor whose last dimension is contiguous, indexed by query head: head h is
// stored head h / group (group > 1 only for k and v under grouped-query attention). Elements are
// float, or c10::BFloat16 in a bfloat16 Problem (row<c10::BFloat16>).
struct View {
  void* data;
  int64_t sb, sh, sn;  // strides in elements of batch, stored head and row
  int64_t group = 1;   // query heads per stored head
  template <class T = float>
  T* row(int64_t b, int64_t h, int64_t n) const {
    return static_cast<T*>(data) + b * sb + h / group * sh + n * sn;
  }
};

struct Problem {
  View q, k, v, o;
  int64_t B, H, Nq, Nk, d;
  float scale;
  bool causal;
  int64_t br, bc;  // tile sizes; 0 picks the variant's default
  // (B, H, Nq) contiguous, or null: forwards that keep it (flash, for its backward) write each
  // query's log-sum-exp of scale·scores in natural-log units; -inf for a row that sees no key.
  float* lse = nullptr;
  // q, k, v and o hold bfloat16 (softmax and accumulation still in float32). Only variants with
  // Variant::bf16 see such a Problem; run_in_float32 serves the others.
  bool bf16 = false;

  // Keys [0, key_end(i)) are visible to query row i.
  int64_t key_end(int64_t i) const {
    return causal ? std::clamp<int64_t>(i + 1 + Nk - Nq, 0, Nk) : Nk;
  }

  // The causal diagonal of the tile of queries [i0, i0 + rows) × keys [j0, j0 + cols): query
  // i0 + r sees key j0 + c iff c < r + diag, i.e. key j0 + c is hidden from rows r < c - diag + 1.
  // In [-rows, cols]: -rows hides the whole tile, cols (always, without a mask) shows it all.
  int64_t diag(int64_t i0, int64_t rows, int64_t j0, int64_t cols) const {
    return causal ? std::clamp<int64_t>(i0 + 1 + Nk - Nq - j0, -rows, cols) : cols;
  }
};

using Kernel = void (*)(const Problem&);

// A backward pass reads the Problem (q, k, v, and in o the forward's output) and these.
struct Grad {
  View dout;         // (B, H, Nq, d): dL/dO, last dimension contiguous
  const float* lse;  // (B, H, Nq) as the forward wrote it (Problem::lse), for flash
  View dq, dk, dv;   // outputs, contiguous, every element written; dk and dv (B, H, Nk, d): one per
                     // query head (grouped kv heads: attention_backward sums each group's)
};
using Backward = void (*)(const Problem&, const Grad&);

struct Variant {
  const char* name;
  Kernel run;
  const char* adds;   // the optimisation this variant adds over the previous one
  Backward backward;  // the backward this variant trains with (its own or another's)
  bool keeps_lse;     // its forward writes Problem::lse and its backward reads it
  bool tiled;         // it reads Problem::br and bc (tile sizes); the others ignore them
  bool bf16;          // it reads bfloat16 Problems itself; the others run on float32 copies
};

// The dispatch table: nanogpt.VARIANTS, and so the CLI, tests and benchmarks, read it.
extern const Variant kVariants[];
const Variant* find_variant(const std::string& name);

void naive_attention(const Problem& p);
void blocked_attention(const Problem& p);
void fused_attention(const Problem& p);
void flash_attention(const Problem& p);
void naive_attention_backward(const Problem& p, const Grad& g);  // naive_backward.cpp
void flash_attention_backward(const Problem& p, const Grad& g);  // flash_backward.cpp

// K transposed, (B, Hk, d, ldk) with keys in [0, Nk): one copy, so that the row-wise variants
// compute a query's scores as d vectorised passes over keys instead of Nk short dot products.
// ldk is padded past a multiple of 16: with a power-of-two stride (Nk = 1024: 4 KiB) a walk
// down the d rows of one column would land in a single L1 set.
inline at::Tensor keys_transposed(const Problem& p) {
  const int64_t ldk = (p.Nk + 15) / 16 * 16 + 16, Hk = p.H / p.k.group;
  at::Tensor kt = at::empty({p.B, Hk, p.d, ldk}, at::kFloat);
  kt.narrow(3, 0, p.Nk).copy_(
      at::from_blob(p.k.data, {p.B, Hk, p.Nk, p.d}, {p.k.sb, p.k.sh, p.k.sn, 1}, at::kFloat).transpose(2, 3));
  return kt;
}

// Which of flash's code paths serves an inference problem: "decode" (a few queries, as in a
// KV-cache step, decode.cpp) unless tiles were asked for, else "tiles" (flash.cpp). A float32
// forward that keeps the LSE for a backward takes the tiles whatever Nq: the backward recomputes
// P = exp(s − LSE) with the tiles' sums, and an LSE from the decode path's sums (another order:
// other rounding) put gradients 2.2× further from float64 at the median of 120 problems with
// large scores. A bfloat16 one still takes the decode path: its backward runs on float32 copies,
// and the bfloat16 tiles' LSE sums a polynomial's exponentials (relative error 1e-4), further from it.
const char* flash_path(int64_t Nq, int64_t br, int64_t bc);
void flash_decode(const Problem& p);  // float32 or bfloat16; the LSE too where p.lse is set

// bfloat16 (bf16.cpp). flash's tile path in bfloat16: both matmuls on AMX where the CPU has it,
// else on AVX-512 BF16 (vdpbf16ps) where this CPU has it and it outruns the FMA there (all
// checked at run time), else run_in_float32.
void flash_tiles_bf16(const Problem& p);
bool has_bf16_dot();  // the bfloat16 tiles run on vdpbf16ps
// nullopt: where it outruns the FMA (the default); true or false: wherever the CPU has it, or
// never (tests run both paths on any CPU with AVX-512 BF16)
void set_bf16_dot(std::optional<bool> on);
bool bf16_dot_outruns_fma();  // peak.cpp: measured once
// The decode path's scores on vdpbf16ps, where has_bf16_dot(): s[j] = scale·Σ_c q[c]·K[j, c] for
// j < n, q and K's rows (ldk apart) bfloat16 with d <= kBf16DotMaxD elements.
constexpr int kBf16DotMaxD = 128;
void dot_rows_bf16_dot(const c10::BFloat16* q, const c10::BFloat16* K, int64_t ldk, int d, float scale, float* s,
                       int64_t n);
bool has_bf16_amx();          // before either: the bfloat16 tiles run on AMX (where the CPU has it)
void set_bf16_amx(bool on);   // false: never (tests run the other paths on an AMX CPU)
// Runs a float32 kernel on a bfloat16 Problem: q, k, v converted to float32 copies, the output
// rounded back into p.o (p.lse, float32 anyway, written in place).
void run_in_float32(const Problem& p, Kernel run);

// Runs a variant's forward on p, in float32 copies if p is bfloat16 and the variant does not read it.
inline void run_variant(const Variant& var, const Problem& p) {
  if (p.bf16 && !var.bf16)
    run_in_float32(p, var.run);
  else
    var.run(p);
}

// Default flash tiles for a shape on this host (tiles.cpp): tuned by nanogpt.tune() if it
// measured this CPU, else from a model of the cache sizes.
std::pair<int64_t, int64_t> flash_default_tiles(int64_t Nq, int64_t Nk, int64_t d);
std::pair<int64_t, int64_t> flash_model_tiles(int64_t Nq, int64_t d);
void set_tuned_tiles(const std::vector<std::tuple<int64_t, int64_t, int64_t>>& rules);

// y[m, n] = b[n] + Σ_k x[m, k]·W[n, k] for m < M, n < N: x rows of K floats zero-padded to
// round_up(K, kW) (vector_dot.h), W (N, K) contiguous, b null or N values, y rows of N floats.
// The decoding step's matrix-vector products, W's rows split over the threads (linear.cpp).
// T: float, or c10::BFloat16 (weights widened as they are read).
template <class T>
void project(const float* x_padded, int64_t M, const T* W, int64_t N, int64_t K, const T* b, float* y);

// Validates the arguments (errors name them) and runs one variant; returns (B, H, Nq, d).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     c10::string_view variant, bool causal, std::optional<double> scale,
                     int64_t br, int64_t bc, bool enable_gqa);

}  // namespace nanogpt
