// flash: Br×Bc tiles with a running max and running sum per query row; O is rescaled as
// key blocks arrive, so memory is O(Br·Bc + (Br+Bc)·d) per thread and never O(N²).
// The tile step runs in ISPC when the build has ispc, else in its C++ twin (flash_tile.h).
// Key blocks wholly above the causal diagonal are never visited; only blocks that cross it
// are masked.
#include <climits>

#include "attention.h"
#include "flash_tile.h"
#include "parallel.h"
#include "simd.h"

#ifdef NANOGPT_WITH_ISPC
#include "flash_tile_ispc.h"
#define NANOGPT_TILE ispc::flash_tile
#else
#define NANOGPT_TILE cpp::flash_tile
#endif

namespace nanogpt {

std::pair<int64_t, int64_t> flash_default_tiles(int64_t /*Nq*/, int64_t /*Nk*/, int64_t /*d*/) {
  return {48, 256};
}

namespace {

// One thread's scratch, carved from one ATen allocation (see flash_tile.h for the shapes).
struct Scratch {
  float *Qp, *O, *Kt, *Vp, *S, *m, *l;
  static int64_t floats(int64_t brp, int64_t bcp, int64_t dp) {
    return round_up(2 * brp * dp + 2 * dp * bcp + brp * bcp + 2 * brp, kLanes);
  }
  Scratch(float* base, int64_t brp, int64_t bcp, int64_t dp)
      : Qp(base), O(Qp + brp * dp), Kt(O + brp * dp), Vp(Kt + dp * bcp), S(Vp + bcp * dp),
        m(S + brp * bcp), l(m + brp) {}
};

}  // namespace

void flash_attention(const Problem& p) {
  const auto [br0, bc0] = flash_default_tiles(p.Nq, p.Nk, p.d);
  const int64_t br = std::min(p.br ? p.br : br0, p.Nq), bc = std::min(p.bc ? p.bc : bc0, p.Nk);
  const int64_t brp = round_up(br, cpp::kRows), bcp = round_up(bc, kLanes), dp = round_up(p.d, kLanes);
  const int64_t per_thread = Scratch::floats(brp, bcp, dp);
  const int64_t threads = at::get_num_threads();
  // Zeroed once: padding columns of Qp and Vp must stay 0 (they meet real numbers in FMAs).
  at::Tensor scratch_t = at::zeros({threads, per_thread}, at::kFloat);
  float* scratch = scratch_t.data_ptr<float>();

  const float qscale = p.scale * kLog2e;  // folded into Q so the tile uses exp2
  const int64_t BH = p.B * p.H, blocks = (p.Nq + br - 1) / br;
  // Item t is query block blocks-1-t/BH of head t%BH: the longest causal blocks go first.
  parallel_items(BH * blocks, threads, [&](int64_t t, int64_t slot) {
    Scratch w(scratch + slot * per_thread, brp, bcp, dp);
    const int64_t bh = t % BH, b = bh / p.H, h = bh % p.H;
    const int64_t i0 = (blocks - 1 - t / BH) * br, rows = std::min(br, p.Nq - i0);
    const int64_t kend = p.key_end(i0 + rows - 1);  // keys past it are masked for every row

    for (int64_t r = 0; r < rows; ++r) {
      const float* q = p.q.row(b, h, i0 + r);
      for (int64_t c = 0; c < p.d; ++c) w.Qp[r * dp + c] = q[c] * qscale;
    }
    std::fill(w.O, w.O + round_up(rows, cpp::kRows) * dp, 0.f);
    std::fill(w.m, w.m + rows, kNegInf);
    std::fill(w.l, w.l + rows, 0.f);

    for (int64_t j0 = 0; j0 < kend; j0 += bc) {
      const int64_t cols = std::min(bc, kend - j0);
      for (int64_t j = 0; j < cols; ++j) {
        const float* k = p.k.row(b, h, j0 + j);
        const float* v = p.v.row(b, h, j0 + j);
        for (int64_t c = 0; c < p.d; ++c) w.Kt[c * bcp + j] = k[c];
        std::copy(v, v + p.d, w.Vp + j * dp);
      }
      // Row r sees block columns c < r + diag.
      const int64_t diag = p.causal ? std::clamp<int64_t>(i0 + 1 + p.Nk - p.Nq - j0, -rows, cols) : cols;
      NANOGPT_TILE(w.Qp, w.Kt, w.Vp, w.S, w.O, w.m, w.l, int(rows), int(cols), int(p.d), int(dp),
                   int(bcp), int(diag));
    }

    for (int64_t r = 0; r < rows; ++r) {  // normalise straight into the caller's layout
      float* o = p.o.row(b, h, i0 + r);
      const float inv = w.l[r] == 0.f ? 0.f : 1.f / w.l[r];  // 0: the row sees no key
      for (int64_t c = 0; c < p.d; ++c) o[c] = w.O[r * dp + c] * inv;
    }
  });
}

}  // namespace nanogpt
