// flash backward (FlashAttention-2's): P is recomputed tile by tile from Q, K and the forward's
// log-sum-exp, never stored, so memory stays O(N·d). With D = rowsum(dO∘O):
//   dV += Pᵀ dO,  dP = dO Vᵀ,  dS = P∘(dP − D),  dQ += scale·dS K,  dK += scale·dSᵀ Q.
// Loop order: the outer loop walks key blocks, holding that block's dK and dV in cache (L1/L2)
// while the inner loop streams the query blocks past it; dQ accumulates per head (see Threads).
// Causal as in the forward: bottom-right, query blocks wholly above the diagonal never visited.
// The tile step runs in ISPC when the build has ispc, else in its C++ twin (flash_backward_tile.h).
//
// Threads: a work item owns (head, every S-th key block): its dK and dV rows are its own, and
// its dQ goes to a buffer of its own, summed once at the end, so nothing is shared. When d is a
// multiple of 16 the tiles accumulate dK and dV in the outputs' rows, and dQ too when an item
// owns a whole head (S = 1) and Nq is a multiple of 16 (no lanes past Nq): no copies after. S = 1 (a
// thread owns whole heads) when the heads divide evenly among the threads; with fewer heads
// (B·H = 1, say) each head's key blocks are split S ways so every thread has work.
#include "attention.h"
#include "flash_backward_tile.h"
#include "parallel.h"
#include "simd.h"
#include "vector_dot.h"

#ifdef NANOGPT_WITH_ISPC
#include "flash_backward_ispc.h"
#define NANOGPT_BACKWARD_TILE ispc::flash_backward_tile
#else
#define NANOGPT_BACKWARD_TILE cpp::flash_backward_tile
#endif

namespace nanogpt {
namespace {

// Backward tiles, reasoned rather than measured (the lead sweeps them): per key block the tile
// keeps K, V, dK, dV (4·Bc·d floats) and P, dS (2·Bc·Br) in L2 while the query blocks stream by;
// 64 keys on short or wide problems waste less on the causal diagonal.
std::pair<int64_t, int64_t> backward_default_tiles(int64_t /*Nq*/, int64_t Nk, int64_t d) {
  return {64, Nk <= 512 || d > 64 ? 64 : 128};
}

// Per head, packed once before the main loop (blocks of br queries, the last one nq lanes):
//   Qt, dOt (Nqp × d as one d × nq block per query block): Q·scale·log2(e) and dO, transposed
//   L, D (Nqp): log-sum-exp in log2 units (+inf: sees no key, or past Nq) and rowsum(dO∘O)
//   Qp, dOp (Nqp × dp): Q and dO rows padded to dp, only when d is not a multiple of 16
struct Packed {
  float *Qt, *dOt, *L, *D, *Qp, *dOp;
  Packed(float* base, int64_t BH, int64_t Nqp, int64_t d, int64_t dp, bool pad)
      : Qt(base), dOt(Qt + BH * Nqp * d), L(dOt + BH * Nqp * d), D(L + BH * Nqp),
        Qp(pad ? D + BH * Nqp : nullptr), dOp(pad ? Qp + BH * Nqp * dp : nullptr) {}
  static int64_t floats(int64_t BH, int64_t Nqp, int64_t d, int64_t dp, bool pad) {
    return BH * Nqp * (2 * d + 2 + (pad ? 2 * dp : 0));
  }
};

// One thread's scratch: P, dS (bc × br), dK, dV, Kp (bc × dp; used only when d % 16 != 0: the
// padded dK, dV copied out after each key block, and K padded to dp).
struct Scratch {
  float *P, *dS, *dK, *dV, *Kp;
  static int64_t floats(int64_t br, int64_t bc, int64_t dp) { return round_up(2 * bc * br + 3 * bc * dp, kLanes); }
  Scratch(float* base, int64_t br, int64_t bc, int64_t dp)
      : P(base), dS(P + bc * br), dK(dS + bc * br), dV(dK + bc * dp), Kp(dV + bc * dp) {}
};

}  // namespace

void flash_attention_backward(const Problem& p, const Grad& g) {
  const auto [br0, bc0] = backward_default_tiles(p.Nq, p.Nk, p.d);
  // br a multiple of 16: every query block starts on a lane group, so blocks never share dQ rows.
  const int64_t br = std::min(round_up(p.br ? p.br : br0, kLanes), round_up(p.Nq, kLanes));
  const int64_t bc = std::min(p.bc ? p.bc : bc0, p.Nk);
  const int64_t dp = round_up(p.d, kLanes), Nqp = round_up(p.Nq, kLanes);
  const bool pad = dp != p.d;  // then Q, dO and K rows are copied, zero-padded to dp
  const int64_t BH = p.B * p.H, qblocks = (p.Nq + br - 1) / br, kblocks = (p.Nk + bc - 1) / bc;
  const int64_t threads = at::get_num_threads();

  const int64_t per_thread = Scratch::floats(br, bc, dp);
  const double bytes = double(threads) * double(per_thread) * sizeof(float);
  TORCH_CHECK_WITH(OutOfMemoryError, bytes <= double(1) * (1 << 30), "flash backward tiles br=", br, " bc=", bc,
                   " need ", bytes / double(1 << 30), " GiB of scratch (about threads × 2·bc·(br+2d)·4 bytes); "
                   "choose smaller br and bc (the backward's defaults are ", br0, " and ", bc0, ")");
  // Key-block splits per head; each split's dQ buffer costs a dQ's size, so at most 256 MiB of them.
  int64_t S = 1;
  if (threads > 1 && BH % threads != 0 && BH < 4 * threads) {
    S = std::min(kblocks, (4 * threads + BH - 1) / BH);
    S = std::max<int64_t>(1, std::min(S, (int64_t(1) << 26) / (BH * Nqp * dp)));
  }

  // The outputs are contiguous (attention_backward allocates them): dK, dV and dQ rows of stride d.
  TORCH_INTERNAL_ASSERT(g.dq.sn == p.d && g.dk.sn == p.d && g.dv.sn == p.d);
  const bool dq_in_place = !pad && S == 1 && Nqp == p.Nq;
  at::Tensor packed_t = at::empty({Packed::floats(BH, Nqp, p.d, dp, pad)}, at::kFloat);
  const Packed w(packed_t.data_ptr<float>(), BH, Nqp, p.d, dp, pad);
  at::Tensor dq_t;  // (split, head, query, feature)
  if (!dq_in_place) dq_t = at::zeros({S, BH, Nqp, dp}, at::kFloat);
  at::Tensor scratch_t = at::zeros({threads, per_thread}, at::kFloat);  // zeroed: Kp's padding stays 0
  float* dq_part = dq_in_place ? nullptr : dq_t.data_ptr<float>();
  float* scratch = scratch_t.data_ptr<float>();
  const float qscale = p.scale * kLog2e;

  // 1. Pack each query block: Qᵀ (scaled) and dOᵀ, L and D; padded rows when d % 16 != 0.
  at::parallel_for(0, BH * qblocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / qblocks, b = bh / p.H, h = bh % p.H;
      const int64_t i0 = t % qblocks * br, rows = std::min(br, p.Nq - i0), nq = round_up(rows, kLanes);
      float *qt = w.Qt + (bh * Nqp + i0) * p.d, *dOt = w.dOt + (bh * Nqp + i0) * p.d;
      float *L = w.L + bh * Nqp + i0, *D = w.D + bh * Nqp + i0;
      pack_transposed(p.q.row(b, h, i0), p.q.sn, rows, p.d, qscale, qt, nq);
      pack_transposed(g.dout.row(b, h, i0), g.dout.sn, rows, p.d, 1.f, dOt, nq);
      std::fill(L + rows, L + nq, INFINITY);
      std::fill(D + rows, D + nq, 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        const float *q = p.q.row(b, h, i0 + r), *dout = g.dout.row(b, h, i0 + r);
        if (pad) {
          float *qp = w.Qp + (bh * Nqp + i0 + r) * dp, *dop = w.dOp + (bh * Nqp + i0 + r) * dp;
          std::copy(q, q + p.d, qp);
          std::fill(qp + p.d, qp + dp, 0.f);
          std::copy(dout, dout + p.d, dop);
          std::fill(dop + p.d, dop + dp, 0.f);
          dout = dop;  // zero-padded to dp, as dot_rows reads its vector
        }
        dot_rows(dout, p.o.row(b, h, i0 + r), 0, int(p.d), D + r, 1);  // D = rowsum(dO∘O)
        const float lse = g.lse[bh * p.Nq + i0 + r];
        L[r] = lse == kNegInf ? INFINITY : lse * kLog2e;  // a row that sees no key: P = 0
      }
    }
  });

  // 2. Item t: head t / S, key blocks s, s + S, s + 2S, ... (s = t % S), against every query
  //    block that sees them; padded dK and dV of each key block copied out once it is done.
  const int64_t cost = 5 * p.Nq * p.Nk * p.d / (p.causal ? 2 : 1) / S;
  parallel_items(BH * S, threads, cost, [&](int64_t t, int64_t slot) {
    Scratch sc(scratch + slot * per_thread, br, bc, dp);
    const int64_t bh = t / S, s = t % S, b = bh / p.H, h = bh % p.H;
    float* dq = dq_in_place ? g.dq.row(b, h, 0) : dq_part + (s * BH + bh) * Nqp * dp;
    if (dq_in_place) std::fill(dq, dq + p.Nq * dp, 0.f);
    for (int64_t j0 = s * bc; j0 < p.Nk; j0 += S * bc) {
      const int64_t cols = std::min(bc, p.Nk - j0);
      const float* K = p.k.row(b, h, j0);
      int64_t ldk = p.k.sn;
      if (pad) {
        for (int64_t c = 0; c < cols; ++c) std::copy(K + c * p.k.sn, K + c * p.k.sn + p.d, sc.Kp + c * dp);
        K = sc.Kp;
        ldk = dp;
      }
      float *dK = pad ? sc.dK : g.dk.row(b, h, j0), *dV = pad ? sc.dV : g.dv.row(b, h, j0);
      std::fill(dK, dK + cols * dp, 0.f);
      std::fill(dV, dV + cols * dp, 0.f);
      // Query i sees key j0 from i = j0 + Nq − Nk on; earlier query blocks see none of these keys.
      const int64_t i_first = p.causal ? std::max<int64_t>(0, j0 + p.Nq - p.Nk) : 0;
      for (int64_t i0 = i_first / br * br; i0 < p.Nq; i0 += br) {
        const int64_t rows = std::min(br, p.Nq - i0);
        const int64_t diag = p.causal ? std::clamp<int64_t>(i0 + 1 + p.Nk - p.Nq - j0, -rows, cols) : cols;
        const float *Q = p.q.row(b, h, i0), *dO = g.dout.row(b, h, i0);
        int64_t ldq = p.q.sn, ldo = g.dout.sn;
        if (pad) {
          Q = w.Qp + (bh * Nqp + i0) * dp, dO = w.dOp + (bh * Nqp + i0) * dp;
          ldq = ldo = dp;
        }
        NANOGPT_BACKWARD_TILE(w.Qt + (bh * Nqp + i0) * p.d, Q, ldq, w.dOt + (bh * Nqp + i0) * p.d, dO, ldo, K, ldk,
                              p.v.row(b, h, j0), p.v.sn, w.L + bh * Nqp + i0, w.D + bh * Nqp + i0, sc.P, sc.dS,
                              dK, dV, dq + i0 * dp, int(rows), int(cols), int(p.d), int(dp), int(diag),
                              p.scale);
      }
      for (int64_t c = 0; c < cols && pad; ++c) {
        std::copy(sc.dK + c * dp, sc.dK + c * dp + p.d, g.dk.row(b, h, j0 + c));
        std::copy(sc.dV + c * dp, sc.dV + c * dp + p.d, g.dv.row(b, h, j0 + c));
      }
    }
  });

  // 3. dQ = the sum of the S splits' buffers, cropped to Nq × d.
  if (!dq_in_place) at::parallel_for(0, BH * p.Nq, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / p.Nq, i = t % p.Nq;
      float* out = g.dq.row(bh / p.H, bh % p.H, i);
      const float* part = dq_part + (bh * Nqp + i) * dp;
      std::copy(part, part + p.d, out);
      for (int64_t s = 1; s < S; ++s)
        for (int64_t c = 0; c < p.d; ++c) out[c] += part[s * BH * Nqp * dp + c];
    }
  });
}

}  // namespace nanogpt
