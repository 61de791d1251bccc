// naive and blocked: both materialise the full Nq×Nk score matrix for one (batch, head) at
// a time, then run three separate passes over it: scores, row softmax, P·V.
#include <unistd.h>

#include "attention.h"
#include "parallel.h"
#include "simd.h"

namespace nanogpt {
namespace {

// The Nq×Nk scratch, refused with a clear error (and a pointer to flash) when it could not
// safely fit in this machine's memory: with overcommit the allocation itself would succeed
// and the OS would kill the process while the matrix is written.
at::Tensor score_matrix(const Problem& p, const char* variant) {
  const double bytes = double(p.Nq) * double(p.Nk) * sizeof(float);
  const double ram = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE));
  TORCH_CHECK_WITH(OutOfMemoryError, bytes <= 0.25 * ram, "variant '", variant,
                   "' materialises the Nq×Nk score matrix (", p.Nq, "×", p.Nk, " floats = ",
                   bytes / double(1 << 30), " GiB), more than a quarter of this machine's ",
                   ram / double(1 << 30), " GiB; use variant='flash', whose memory is O(N)");
  return at::empty({p.Nq, p.Nk}, at::kFloat);
}

// S[i, j] = (q_i · k_j)·scale·log2(e) for visible keys, -inf above the causal diagonal;
// rows [i0, i1) by keys [j0, j1). Kt: this head's keys transposed (d × ldk).
void scores(const Problem& p, int64_t b, int64_t h, const float* Kt, int64_t ldk, float* S,
            int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t i = i0; i < i1; ++i) {
    float* s = S + i * p.Nk;
    const int64_t end = std::clamp(p.key_end(i), j0, j1);
    scores_row(p.q.row(b, h, i), Kt + j0, ldk, p.d, p.scale * kLog2e, s + j0, end - j0);
    std::fill(s + end, s + j1, kNegInf);
  }
}

// blocked's register tile: S[r, 0:W] = c·Σ_k Q[r, k]·Kt[k, 0:W] for 8 query rows (rows past
// `rows` repeat row 0 and are not stored) and W keys, accumulated in eight W-float registers.
// W = 8 is one 8×8 tile; W = 16 is two neighbouring 8×8 tiles in one pass (a full AVX-512
// register), which is how the default tiling runs where a second tile exists.
template <class Vec>
void score_tile8(const Problem& p, int64_t b, int64_t h, const float* Kt, int64_t ldk, float* S,
                 int64_t i0, int rows, int64_t j0) {
  constexpr int W = sizeof(Vec) / sizeof(float);
  const float* q[8];
  for (int r = 0; r < 8; ++r) q[r] = p.q.row(b, h, i0 + (r < rows ? r : 0));
  Vec acc[8] = {};
  for (int64_t k = 0; k < p.d; ++k) {
    Vec kv;
    std::memcpy(&kv, Kt + k * ldk + j0, sizeof kv);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) acc[r] += q[r][k] * kv;
  }
  const float c = p.scale * kLog2e;
  for (int r = 0; r < rows; ++r) {
    const Vec sr = acc[r] * c;
    std::memcpy(S + (i0 + r) * p.Nk + j0, &sr, sizeof sr);
    const int64_t end = p.key_end(i0 + r);  // causal: hide keys past the row's diagonal
    for (int64_t j = std::max(end, j0); j < j0 + W; ++j) S[(i0 + r) * p.Nk + j] = kNegInf;
  }
}

// o_i += Σ_j P[i, j]·v_j for rows [i0, i1) and keys [j0, j1).
void accumulate_pv(const Problem& p, int64_t b, int64_t h, const float* P, int64_t i0,
                   int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t end = std::min(j1, p.key_end(i));  // masked keys contribute nothing
    if (end > j0) pv_row(P + i * p.Nk + j0, p.v.row(b, h, j0), p.v.sn, end - j0, p.d, p.o.row(b, h, i));
  }
}

// Row softmax in place over all of S (the unfused pass); rowsum[i] = Σ_j 2^(s_ij - max).
void softmax_rows(const Problem& p, float* S, float* rowsum) {
  at::parallel_for(0, p.Nq, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) rowsum[i] = softmax2_unnormalised(S + i * p.Nk, p.Nk);
  });
}

// o_i /= rowsum_i (0 for a row that sees no key).
void normalise(const Problem& p, int64_t b, int64_t h, const float* rowsum, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    float* o = p.o.row(b, h, i);
    if (rowsum[i] == 0.f) {
      std::fill(o, o + p.d, 0.f);
      continue;
    }
    const float inv = 1.f / rowsum[i];  // NaN stays NaN
    for (int64_t c = 0; c < p.d; ++c) o[c] *= inv;
  }
}

// Shared skeleton; tr×tc tiles (naive: tr = 1, tc = Nk, one row against all keys at a time).
// tile8: pass 1 uses blocked's 8×8 register tiles wherever a full 8-key tile exists. It is
// decided from the requested tile, not the one clamped to N, so that a row's arithmetic (and
// its rounding) does not depend on how many rows the call has.
void unfused(const Problem& p, const char* name, int64_t tr, int64_t tc, bool tile8) {
  at::Tensor S_t = score_matrix(p, name), rowsum_t = at::empty({p.Nq}, at::kFloat);
  at::Tensor Kt_t = keys_transposed(p);  // (B, Hk, d, ldk)
  float* S = S_t.data_ptr<float>();
  float* rowsum = rowsum_t.data_ptr<float>();
  const int64_t row_tiles = (p.Nq + tr - 1) / tr;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const float* Kt = Kt_t[b][h / p.k.group].data_ptr<float>();
      const int64_t ldk = Kt_t.size(3);
      at::parallel_for(0, row_tiles, 1, [&](int64_t t0, int64_t t1) {  // pass 1: S = QKᵀ
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i0 = t * tr, i1 = std::min(p.Nq, i0 + tr);
          for (int64_t j0 = 0; j0 < p.Nk; j0 += tc) {
            const int64_t j1 = std::min(p.Nk, j0 + tc);
            if (tile8 && j0 + 16 <= p.Nk) {  // blocked's default tiles, two at once
              score_tile8<vf>(p, b, h, Kt, ldk, S, i0, int(i1 - i0), j0);
              j0 += tc;
            } else if (tile8 && j1 - j0 == 8) {
              score_tile8<vf8>(p, b, h, Kt, ldk, S, i0, int(i1 - i0), j0);
            } else {
              scores(p, b, h, Kt, ldk, S, i0, i1, j0, j1);
            }
          }
        }
      });
      softmax_rows(p, S, rowsum);  // pass 2: P = softmax(S)
      at::parallel_for(0, row_tiles, 1, [&](int64_t t0, int64_t t1) {  // pass 3: O = PV
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i0 = t * tr, i1 = std::min(p.Nq, i0 + tr);
          for (int64_t i = i0; i < i1; ++i) std::fill(p.o.row(b, h, i), p.o.row(b, h, i) + p.d, 0.f);
          for (int64_t j0 = 0; j0 < p.Nk; j0 += tc)
            accumulate_pv(p, b, h, S, i0, i1, j0, std::min(p.Nk, j0 + tc));
          normalise(p, b, h, rowsum, i0, i1);
        }
      });
    }
}

}  // namespace

// naive: S = QKᵀ as a full Nq×Nk matrix, one row at a time; row softmax; O = PV.
// The textbook algorithm; O(N²) memory.
void naive_attention(const Problem& p) { unfused(p, "naive", 1, p.Nk, false); }

// blocked: adds tiling of both matmuls (br×bc, 8×8 by default) so a tile of K and V rows
// is reused from cache across br query rows; softmax is still a separate pass over N×N.
void blocked_attention(const Problem& p) {
  const int64_t br = p.br ? p.br : 8, bc = p.bc ? p.bc : 8;
  unfused(p, "blocked", std::min(br, p.Nq), std::min(bc, p.Nk), br <= 8 && bc == 8);
}

}  // namespace nanogpt
