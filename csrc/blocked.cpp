// blocked: adds tiling of both matmuls (br×bc, 8×8 by default) so a tile of K and V rows is
// reused from cache across br query rows; softmax is still a separate pass over N×N (the
// three passes are in unfused.h). The default 8×8 tiles run as register tiles.
#include <cstring>

#include "unfused.h"

namespace nanogpt {
namespace {

constexpr int kTile = 8;  // the default tile: 8 query rows × 8 keys

// S[i0 + r, j0 : j0 + W] = c·Σ_k Q[i0 + r, k]·Kt[k, j0 : j0 + W] for the tile's `rows` ≤ 8
// query rows (rows past `rows` repeat row 0 and are not stored) and the W keys of one Vec,
// accumulated in eight W-float registers: vf8 is one 8×8 tile, vf two neighbouring tiles in one
// pass (a full AVX-512 register). Keys above the causal diagonal get -inf.
template <class Vec>
void score_tile(const Problem& p, const unfused::Head& x, int64_t i0, int rows, int64_t j0) {
  constexpr int W = sizeof(Vec) / sizeof(float);
  const float* q[kTile];
  for (int r = 0; r < kTile; ++r) q[r] = p.q.row(x.b, x.h, i0 + (r < rows ? r : 0));
  Vec acc[kTile] = {};
  for (int64_t k = 0; k < p.d; ++k) {
    Vec kv;
    std::memcpy(&kv, x.Kt + k * x.ldk + j0, sizeof kv);
#pragma GCC unroll 8
    for (int r = 0; r < kTile; ++r) acc[r] += q[r][k] * kv;
  }
  const float c = p.scale * kLog2e;
  const int64_t diag = p.diag(i0, kTile, j0, W);
  for (int r = 0; r < rows; ++r) {
    float* s = x.S + (i0 + r) * p.Nk + j0;
    const Vec sr = acc[r] * c;
    std::memcpy(s, &sr, sizeof sr);
    for (int64_t j = std::max<int64_t>(0, r + diag); j < W; ++j) s[j] = kNegInf;
  }
}

// Pass 1 over whole W-key tiles from key j0 on; returns where the tiles stop.
template <class Vec>
int64_t score_tiles(const Problem& p, const unfused::Head& x, int64_t i0, int rows, int64_t j0) {
  constexpr int W = sizeof(Vec) / sizeof(float);
  for (; j0 + W <= p.Nk; j0 += W) score_tile<Vec>(p, x, i0, rows, j0);
  return j0;
}
static_assert(sizeof(vf) == 2 * sizeof(vf8) && sizeof(vf8) == kTile * sizeof(float));

}  // namespace

void blocked_attention(const Problem& p) {
  const int64_t br = p.br ? p.br : kTile, bc = p.bc ? p.bc : kTile;
  const int64_t tr = std::min(br, p.Nq), tc = std::min(bc, p.Nk);
  // The register tiles are chosen from the requested tile, not the one clamped to N, so that a
  // row's arithmetic (and its rounding) does not depend on how many rows the call has.
  if (br <= kTile && bc == kTile) {
    unfused::run(p, "blocked", tr, tc, [&](const unfused::Head& x, int64_t i0, int64_t i1) {
      const int rows = int(i1 - i0);
      int64_t j0 = score_tiles<vf>(p, x, i0, rows, 0);  // pairs of 8×8 tiles in one pass
      j0 = score_tiles<vf8>(p, x, i0, rows, j0);       // then at most one single tile
      if (j0 < p.Nk) unfused::scores(p, x, i0, i1, j0, p.Nk);  // the keys past the last tile
    });
  } else {
    unfused::run(p, "blocked", tr, tc, [&](const unfused::Head& x, int64_t i0, int64_t i1) {
      for (int64_t j0 = 0; j0 < p.Nk; j0 += tc) unfused::scores(p, x, i0, i1, j0, std::min(p.Nk, j0 + tc));
    });
  }
}

}  // namespace nanogpt
