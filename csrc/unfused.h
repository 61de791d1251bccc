// What naive.cpp and blocked.cpp share: both materialise the full Nq×Nk score matrix of one
// (batch, head) at a time and run three separate passes over it: scores, row softmax, P·V.
// Only pass 1 differs (naive: one row against all keys; blocked: register tiles).
#pragma once

#include <unistd.h>

#include "attention.h"
#include "parallel.h"
#include "simd.h"

namespace nanogpt::unfused {

// One (batch, head) of the problem and its scratch: Kt (d × ldk) its keys transposed,
// S (Nq × Nk) its score matrix.
struct Head {
  int64_t b, h;
  const float* Kt;
  int64_t ldk;
  float* S;
};

// The Nq×Nk scratch, refused with a clear error (and a pointer to flash) when it could not
// safely fit in this machine's memory: with overcommit the allocation itself would succeed
// and the OS would kill the process while the matrix is written.
inline at::Tensor score_matrix(const Problem& p, const char* variant) {
  const double bytes = double(p.Nq) * double(p.Nk) * sizeof(float);
  const double ram = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE));
  TORCH_CHECK_WITH(OutOfMemoryError, bytes <= 0.25 * ram, "variant '", variant,
                   "' materialises the Nq×Nk score matrix (", p.Nq, "×", p.Nk, " floats = ",
                   bytes / double(1 << 30), " GiB), more than a quarter of this machine's ",
                   ram / double(1 << 30), " GiB; use variant='flash', whose memory is O(N)");
  return at::empty({p.Nq, p.Nk}, at::kFloat);
}

// S[i, j] = (q_i · k_j)·scale·log2(e) for visible keys, -inf above the causal diagonal;
// rows [i0, i1) by keys [j0, j1), one row at a time.
inline void scores(const Problem& p, const Head& x, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t i = i0; i < i1; ++i) {
    float* s = x.S + i * p.Nk;
    const int64_t end = std::clamp(p.key_end(i), j0, j1);
    scores_row(p.q.row(x.b, x.h, i), x.Kt + j0, x.ldk, p.d, p.scale * kLog2e, s + j0, end - j0);
    std::fill(s + end, s + j1, kNegInf);
  }
}

// o_i += Σ_j P[i, j]·v_j for rows [i0, i1) and keys [j0, j1).
inline void accumulate_pv(const Problem& p, const Head& x, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t end = std::min(j1, p.key_end(i));  // masked keys contribute nothing
    if (end > j0) pv_row(x.S + i * p.Nk + j0, p.v.row(x.b, x.h, j0), p.v.sn, end - j0, p.d, p.o.row(x.b, x.h, i));
  }
}

// The three passes, each over tiles of tr query rows (threads take tiles, heaviest first);
// P·V walks keys in tiles of tc. score_tile(head, i0, i1) is the variant's pass 1: S for rows
// [i0, i1) against every key.
template <class ScoreTile>
void run(const Problem& p, const char* name, int64_t tr, int64_t tc, const ScoreTile& score_tile) {
  at::Tensor S_t = score_matrix(p, name), rowsum_t = at::empty({p.Nq}, at::kFloat);
  at::Tensor Kt_t = keys_transposed(p);  // (B, Hk, d, ldk)
  float* rowsum = rowsum_t.data_ptr<float>();
  const int64_t threads = at::get_num_threads(), tiles = (p.Nq + tr - 1) / tr;
  const int64_t matmul_cost = tr * p.Nk * p.d;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const Head x{b, h, Kt_t[b][h / p.k.group].data_ptr<float>(), Kt_t.size(3), S_t.data_ptr<float>()};
      // Calls f(i0, i1) for every row tile of this head.
      const auto each_tile = [&](int64_t cost, const auto& f) {
        parallel_blocks(1, 1, tiles, threads, cost, [&](int64_t, int64_t, int64_t t, int64_t) {
          f(t * tr, std::min(p.Nq, t * tr + tr));
        });
      };
      each_tile(matmul_cost, [&](int64_t i0, int64_t i1) { score_tile(x, i0, i1); });  // pass 1: S = QKᵀ
      each_tile(tr * p.Nk, [&](int64_t i0, int64_t i1) {  // pass 2: P = softmax(S), unnormalised
        for (int64_t i = i0; i < i1; ++i) rowsum[i] = softmax2_unnormalised(x.S + i * p.Nk, p.Nk);
      });
      each_tile(matmul_cost, [&](int64_t i0, int64_t i1) {  // pass 3: O = PV / rowsum
        for (int64_t i = i0; i < i1; ++i) std::fill(p.o.row(b, h, i), p.o.row(b, h, i) + p.d, 0.f);
        for (int64_t j0 = 0; j0 < p.Nk; j0 += tc) accumulate_pv(p, x, i0, i1, j0, std::min(p.Nk, j0 + tc));
        for (int64_t i = i0; i < i1; ++i) normalise_row(p.o.row(b, h, i), p.o.row(b, h, i), rowsum[i], p.d);
      });
    }
}

}  // namespace nanogpt::unfused
