// fused: one query row at a time, scores → softmax → P·V without leaving the row, so the
// score scratch is one Nk×1 row per thread instead of the Nq×Nk matrix; threads take
// (batch, head, row) items from a shared counter (parallel.h). (K is transposed once, a copy the size of K, to vectorise over keys.)
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
  const int64_t BH = p.B * p.H;
  // Item t is a chunk of kRowsPerItem rows of head t%BH, the chunks with the longest causal
  // rows first; a chunk's rows share the head's K and V in cache.
  constexpr int64_t kRowsPerItem = 16;
  const int64_t chunks = (p.Nq + kRowsPerItem - 1) / kRowsPerItem;
  parallel_items(BH * chunks, threads, kRowsPerItem * 2 * p.Nk * p.d, [&](int64_t t, int64_t slot) {
    const int64_t bh = t % BH, b = bh / p.H, h = bh % p.H;
    const int64_t i0 = (chunks - 1 - t / BH) * kRowsPerItem;
    float* s = rows + slot * rows_t.size(1);
    for (int64_t i = i0; i < std::min(p.Nq, i0 + kRowsPerItem); ++i) {
      const int64_t end = p.key_end(i);
      const int64_t kv = b * Kt_t.size(1) + h / p.k.group;  // this query head's kv head
      scores_row(p.q.row(b, h, i), Kt + kv * p.d * ldk, ldk, p.d, c, s, end);
      const float sum = softmax2_unnormalised(s, end);
      float* o = p.o.row(b, h, i);
      std::fill(o, o + p.d, 0.f);
      if (sum == 0.f) continue;  // no visible key: a zero row, as SDPA gives
      pv_row(s, p.v.row(b, h, 0), p.v.sn, end, p.d, o);
      const float inv = 1.f / sum;
      for (int64_t k = 0; k < p.d; ++k) o[k] *= inv;
    }
  });
}

}  // namespace nanogpt
