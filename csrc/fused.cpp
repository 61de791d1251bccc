// fused: one query row at a time, scores → softmax → P·V without leaving the row, so the
// score scratch is one Nk×1 row per thread instead of the Nq×Nk matrix; threads take blocks
// of rows of every (batch, head), heaviest first (parallel.h). K is transposed once (a copy the
// size of K) to vectorise over keys.
#include "attention.h"
#include "parallel.h"
#include "simd.h"

namespace nanogpt {

void fused_attention(const Problem& p) {
  const int64_t threads = at::get_num_threads();
  at::Tensor rows_t = at::empty({threads, std::max<int64_t>(p.Nk, 1)}, at::kFloat);  // (threads, Nk)
  float* rows = rows_t.data_ptr<float>();
  const at::Tensor Kt_t = keys_transposed(p);  // (B, Hk, d, ldk)
  const float* Kt = Kt_t.data_ptr<float>();
  const int64_t ldk = Kt_t.size(3);
  const float c = p.scale * kLog2e;
  // A work item is a block of kRowsPerItem rows of one head, whose rows share the head's K
  // and V in cache.
  constexpr int64_t kRowsPerItem = 16;
  const int64_t blocks = (p.Nq + kRowsPerItem - 1) / kRowsPerItem;
  parallel_blocks(p.B, p.H, blocks, threads, kRowsPerItem * 2 * p.Nk * p.d, [&](int64_t b, int64_t h, int64_t blk, int64_t slot) {
    float* s = rows + slot * rows_t.size(1);
    const float* kt = Kt + (b * Kt_t.size(1) + h / p.k.group) * p.d * ldk;  // this query head's kv head
    for (int64_t i = blk * kRowsPerItem; i < std::min(p.Nq, (blk + 1) * kRowsPerItem); ++i) {
      const int64_t end = p.key_end(i);
      scores_row(p.q.row(b, h, i), kt, ldk, p.d, c, s, end);
      const float sum = softmax2_unnormalised(s, end);
      float* o = p.o.row(b, h, i);
      std::fill(o, o + p.d, 0.f);
      pv_row(s, p.v.row(b, h, 0), p.v.sn, end, p.d, o);
      normalise_row(o, o, sum, p.d);
    }
  });
}

}  // namespace nanogpt
