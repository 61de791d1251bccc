// flash: Br×Bc tiles with a running max and running sum per query row; O is rescaled as
// key blocks arrive, so memory is O(Br·Bc + (Br+Bc)·d) per thread and never O(N²).
// The tile step runs in ISPC when the build has ispc, else in its C++ twin (flash_tile.h).
// K and V are read in place (only Qᵀ is packed, once per query block: transposing K per key
// block cost about a quarter of the time at Br=48). Key blocks wholly above the causal diagonal are
// never visited; only blocks that cross it are masked, and in those the tile skips the score
// blocks wholly above it and, in P·V, the keys past each block of rows' last visible one.
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

namespace {

// One thread's scratch, carved from one ATen allocation (see flash_tile.h for the shapes).
struct Scratch {
  float *Qt, *St, *O, *m, *l, *tmp, *Vp;
  static int64_t floats(int64_t nq, int64_t bc, int64_t d, int64_t dp, bool v_copy) {
    return round_up(d * nq + bc * nq + nq * dp + 5 * nq + (v_copy ? bc * dp : 0), kLanes);
  }
  Scratch(float* base, int64_t nq, int64_t bc, int64_t d, int64_t dp)
      : Qt(base), St(Qt + d * nq), O(St + bc * nq), m(O + nq * dp), l(m + nq), tmp(l + nq),
        Vp(tmp + 3 * nq) {}
};

}  // namespace

void flash_attention(const Problem& p) {
  // a float32 forward that keeps the LSE takes the tiles: see flash_path
  if ((!p.lse || p.bf16) && flash_path(p.Nq, p.br, p.bc)[0] == 'd') return flash_decode(p);
  if (p.bf16) return flash_tiles_bf16(p);
  const auto [br0, bc0] = flash_default_tiles(p.Nq, p.Nk, p.d);
  const int64_t br = std::min(p.br ? p.br : br0, p.Nq), bc = std::min(p.bc ? p.bc : bc0, p.Nk);
  const int64_t nq_max = round_up(br, kLanes), dp = round_up(p.d, kLanes);
  const bool v_in_place = dp == p.d;  // else V rows are copied with zero padding to dp
  const int64_t per_thread = Scratch::floats(nq_max, bc, p.d, dp, !v_in_place);
  const int64_t threads = at::get_num_threads();
  const double bytes = double(threads) * double(per_thread) * sizeof(float);
  TORCH_CHECK_WITH(OutOfMemoryError, bytes <= double(1) * (1 << 30), "flash tiles br=", br, " bc=", bc,
                   " need ", bytes / double(1 << 30), " GiB of scratch (about threads × (br·(bc+2d))·4 bytes); "
                   "choose smaller br and bc (the defaults are ", br0, " and ", bc0, ")");
  // Zeroed once: Vp's padding columns must stay 0 (they meet real numbers in FMAs).
  at::Tensor scratch_t = at::zeros({threads, per_thread}, at::kFloat);
  float* scratch = scratch_t.data_ptr<float>();

  const float qscale = p.scale * kLog2e;  // folded into Q so the tile uses exp2
  const int64_t blocks = (p.Nq + br - 1) / br;
  parallel_blocks(p.B, p.H, blocks, threads, 2 * br * p.Nk * p.d, [&](int64_t b, int64_t h, int64_t blk, int64_t slot) {
    Scratch w(scratch + slot * per_thread, nq_max, bc, p.d, dp);
    const int64_t i0 = blk * br, rows = std::min(br, p.Nq - i0);
    const int64_t nq = round_up(rows, kLanes);
    const int64_t kend = p.key_end(i0 + rows - 1);  // keys past it are masked for every row

    pack_transposed(p.q.row(b, h, i0), p.q.sn, rows, p.d, qscale, w.Qt, nq);  // lanes past `rows`: harmless zeros
    std::fill(w.O, w.O + nq * dp, 0.f);
    std::fill(w.m, w.m + nq, kNegInf);
    std::fill(w.l, w.l + nq, 0.f);

    for (int64_t j0 = 0; j0 < kend; j0 += bc) {
      const int64_t cols = std::min(bc, kend - j0);
      const float* v = p.v.row(b, h, j0);
      int64_t ldv = p.v.sn;
      if (!v_in_place) {
        for (int64_t j = 0; j < cols; ++j) std::copy(v + j * p.v.sn, v + j * p.v.sn + p.d, w.Vp + j * dp);
        v = w.Vp;
        ldv = dp;
      }
      NANOGPT_TILE(w.Qt, p.k.row(b, h, j0), p.k.sn, v, ldv, w.St, w.O, w.m, w.l, w.tmp, int(rows),
                   int(cols), int(p.d), int(dp), int(p.diag(i0, rows, j0, cols)));
    }

    // Normalise straight into the caller's layout (a row that saw no key has l = 0: zeros); for
    // the backward, log Σ_j e^(s_ij) from the log2-unit running max and sum (-inf: no key).
    for (int64_t r = 0; r < rows; ++r) {
      normalise_row(p.o.row(b, h, i0 + r), w.O + r * dp, w.l[r], p.d);
      if (p.lse) p.lse[(b * p.H + h) * p.Nq + i0 + r] = lse_from(w.m[r], w.l[r]);
    }
  });
}

}  // namespace nanogpt
